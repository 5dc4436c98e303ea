"""Process-level memory settings that make bound computation faster on Linux CPUs (standard library only).

Bound propagation allocates and frees large temporary tensors at every layer (a CROWN call on a small CNN at batch
64 touches about 5 GB of fresh pages). With glibc's default ``malloc``, freed blocks above a dynamic threshold go
back to the kernel and the next allocation of the same size page-faults its memory in again, 4 KiB at a time; on a
virtual machine a page fault is expensive. Two settings remove most of that cost:

- ``THP_MEM_ALLOC_ENABLE=1``: PyTorch's CPU allocator page-aligns blocks of 2 MiB and more and asks the kernel
  for transparent huge pages on them (``madvise``; one fault per 2 MiB instead of per 4 KiB). PyTorch reads the
  variable once, at its first allocation, so it only takes effect when set **before torch is imported**.
- glibc ``mallopt``: blocks below ``mmap_threshold`` come from the heap, and up to ``trim_threshold`` bytes of freed
  heap are kept for reuse instead of being returned at once. Takes effect at any time. The cost: the process keeps
  memory it freed (its resident size stays near its peak), like PyTorch's GPU caching allocator.

The ``certlab`` command applies both at start-up (sweep workers inherit the variable); library users can call
:func:`tune` themselves, before importing torch for the full effect. Set ``CERTLAB_TUNE_MEMORY=0`` to turn it off.
Measured effect: docs/benchmarks.md ("Memory settings").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

OPT_OUT = "CERTLAB_TUNE_MEMORY"
THP_VAR = "THP_MEM_ALLOC_ENABLE"
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_done: dict | None = None


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "1").strip().lower() not in ("0", "false", "no", "off")


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def tune(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> dict:
    """Apply the settings once per process (later calls return the first call's report).

    Returns ``{"huge_pages": bool, "malloc": bool, "reason": str}``: whether torch will ask for huge pages on its large
    blocks (False when torch was imported before this call without the variable, when the user set the variable to
    something other than 1, or off Linux) and whether ``mallopt`` was applied (False off glibc, or when the user set glibc's own variables, which
    are left alone)."""
    global _done
    if _done is not None:
        return _done
    report = {"huge_pages": False, "malloc": False, "reason": ""}
    if not enabled():
        report["reason"] = f"{OPT_OUT}=0"
    elif not sys.platform.startswith("linux"):
        report["reason"] = "not Linux"
    else:
        if THP_VAR in os.environ:  # the user's own choice
            report["huge_pages"] = os.environ[THP_VAR].strip() == "1"
            report["reason"] = "" if report["huge_pages"] else f"{THP_VAR} set to {os.environ[THP_VAR]!r} by the user"
        elif "torch" in sys.modules:
            report["reason"] = "torch was imported first; huge pages need the setting before that"
        else:
            os.environ[THP_VAR] = "1"  # inherited by child processes (sweep workers) too
            report["huge_pages"] = True
        libc = _libc()
        if libc is not None and not any(v in os.environ for v in _GLIBC_VARS):
            ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
            report["malloc"] = ok
    _done = report
    return report


def tune_for_script(argv=None) -> dict:
    """:func:`tune` unless the command line asks for the defaults with ``--no-tune`` (the benchmark scripts' A/B
    switch); call it before importing torch. Returns the report either way."""
    if "--no-tune" in (sys.argv if argv is None else argv):
        return {"huge_pages": False, "malloc": False, "reason": "--no-tune"}
    return tune()
