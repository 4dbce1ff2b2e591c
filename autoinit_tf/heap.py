"""Handing freed heap memory back to the operating system during a long pass (glibc only).

Passes over a model allocate and free arrays of megabytes to tens of megabytes per node (drawn kernels,
their float64 blocks, activations of a replay). Once glibc's adaptive mmap threshold has risen, such
blocks come from the heap, which fragments: the resident size then stays far above the live set.
`HeapTrim` calls ``malloc_trim(0)`` between nodes whenever the resident size grew by a step since its
last call. It changes no value, only the process's resident size; off glibc/Linux it does nothing.
"""

from __future__ import annotations

import os
import sys

__all__ = ["HeapTrim"]


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrim:
    """Hand memory freed by the replay back to the OS when the resident size grew by `step` bytes.

    The measuring replay allocates and frees activations of tens of MB (ResNet50 at batch 8: 25.7 MB each). glibc
    serves them from its heap once its adaptive mmap threshold has risen, and the heap fragments: the
    resident size ends up far above the live set (ResNet50 probe calibration: about 2x). `malloc_trim`
    returns the free pages; it changes no value, only the process's resident size. Called between nodes,
    only after the resident size grew by `step` since the last call (a handful of calls per replay).
    A no-op off glibc/Linux.
    """

    _trim = None
    _looked = False

    def __init__(self, step=32 << 20, trim_now=False):
        cls = type(self)
        if not cls._looked:
            cls._trim, cls._looked = _find_malloc_trim(), True
        self.step = step
        if cls._trim is not None and trim_now:
            cls._trim(0)  # start from a trimmed heap: what an earlier pass freed goes back first
        self.mark = self._rss() if cls._trim is not None else None

    @staticmethod
    def _rss():
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self):
        if self.mark is None:
            return
        now = self._rss()
        if now is None:
            self.mark = None
        elif now > self.mark + self.step:
            type(self)._trim(0)
            self.mark = self._rss() or now


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
