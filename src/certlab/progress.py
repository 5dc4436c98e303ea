"""Progress of long loops: a tqdm bar on a terminal, periodic log lines everywhere else.

Under ``nohup``, a batch scheduler or a pipe into a log file stderr is not a terminal and a bar would print nothing
useful; there :func:`bar` prints one line at most every ``interval`` seconds (default 10; the environment variable
``CERTLAB_PROGRESS_INTERVAL`` sets it), e.g.

    epoch 3/40: step 120/500 (24%), elapsed 0:42, ETA 2:13, loss=0.310 acc=0.912

Work that ends within the first interval prints nothing; work that printed lines ends with a ``done`` line.
:func:`heartbeat` is the same for one long call whose steps are not known: it prints the elapsed time.
"""

from __future__ import annotations

import os
import sys
import threading
import time

INTERVAL_VAR = "CERTLAB_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def interval() -> float:
    """Seconds between two log lines (``CERTLAB_PROGRESS_INTERVAL``, default 10; at least 0.05)."""
    try:
        return max(0.05, float(os.environ.get(INTERVAL_VAR, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(max(0.0, seconds) + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class _Null:
    """A disabled bar."""

    n = 0

    def update(self, n=1):
        pass

    def set_postfix(self, ordered_dict=None, **kw):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogBar(_Null):
    """Counts steps like tqdm; a background thread writes the state every ``every`` seconds. ``inline``: rewrite one
    terminal line (``\\r``) instead of appending lines."""

    def __init__(self, total=None, desc="", unit="it", every=None, stream=None, inline=False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.every = interval() if every is None else float(every)
        self.stream = sys.stderr if stream is None else stream
        self.inline, self.postfix, self.lines = inline, "", 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"certlab-progress-{desc}", daemon=True)
        self._thread.start()

    def update(self, n=1):
        self.n += n

    def set_postfix(self, ordered_dict=None, **kw):
        d = {**(ordered_dict or {}), **kw}
        self.postfix = " ".join(f"{k}={v}" for k, v in d.items())

    def set_description(self, desc):
        self.desc = desc

    def line(self, done=False) -> str:
        el = time.monotonic() - self.t0
        head = f"{self.desc}: " if self.desc else ""
        if done:
            count = f", {self.n}/{self.total} {self.unit}" if self.total is not None else \
                f", {self.n} {self.unit}" if self.n else ""
            return f"{head}done{count} in {clock(el)}"
        if self.total is None:
            parts = [f"{self.n} {self.unit}" if self.n else "running", f"elapsed {clock(el)}"]
        else:
            pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
            eta = clock(el * (self.total - self.n) / self.n) if self.n else "?"
            parts = [f"{self.unit} {self.n}/{self.total}{pct}", f"elapsed {clock(el)}", f"ETA {eta}"]
        return head + ", ".join(parts) + (f", {self.postfix}" if self.postfix else "")

    def _write(self, text):
        with self._lock:
            try:
                if self.inline:
                    self.stream.write("\r" + text + "\x1b[K")
                else:
                    self.stream.write(text + "\n")
                self.stream.flush()
                self.lines += 1
            except (ValueError, OSError):  # the stream was closed under us
                self._stop.set()

    def _run(self):
        while not self._stop.wait(self.every):
            self._write(self.line())

    def close(self):
        if self._stop.is_set() and not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        if self.lines:
            if self.inline:
                with self._lock:
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()
            else:
                self._write(self.line(done=True))


def bar(total, desc="", enabled=True, unit="it", leave=False, stream=None):
    """A progress bar over ``total`` steps (``update(n)``, ``set_postfix(dict)``, ``close()``; a context manager):
    tqdm when ``stream`` (default stderr) is a terminal, else :class:`LogBar` lines; nothing when not ``enabled``."""
    if not enabled:
        return _Null()
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True)
    return LogBar(total, desc, unit, stream=stream)


def heartbeat(desc, enabled=True, stream=None):
    """For one long call without steps: every interval, ``desc: running, elapsed m:ss`` (one rewritten line on a
    terminal, appended lines elsewhere)."""
    if not enabled:
        return _Null()
    stream = sys.stderr if stream is None else stream
    return LogBar(None, desc, "steps", stream=stream, inline=is_terminal(stream))
