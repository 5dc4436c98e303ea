"""Temporary files for atomic writes that end up with the permissions of an ordinary file.

``tempfile.mkstemp`` creates its file with mode 0600 (it is meant to be private); a file written through it and then
renamed over its destination keeps that mode, so other users cannot read a report that ``open(path, "w")`` would
have left readable. :func:`mkstemp` is the same call followed by ``chmod`` to 0666 minus the process umask, what
``open`` gives a new file."""

from __future__ import annotations

import os
import tempfile


def umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` sets it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def mkstemp(suffix: str = "", prefix: str = ".tmp-", dir=None) -> tuple:
    """``tempfile.mkstemp`` whose file has the mode ``open`` would give a new file (0666 & ~umask)."""
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=dir)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def write_text(path, text: str, fsync: bool = False) -> None:
    """Write ``text`` atomically: to a temporary file in ``path``'s folder (created if missing), then ``os.replace``
    over ``path``, so a reader sees the old file or the new one, never half of one. ``fsync``: flush it to disk
    before the rename (files a resumed run relies on). The temporary file is removed if anything fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
