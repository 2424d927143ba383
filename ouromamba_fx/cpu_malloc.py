"""Keep freed memory in the process (glibc malloc on Linux), so that conversion and a lowered
model's calls on the CPU stop faulting pages in anew.

    >>> import ouromamba_fx as of
    >>> of.tune_malloc()                      # doctest: +SKIP
    {'M_MMAP_THRESHOLD': 33554432, 'M_TRIM_THRESHOLD': 2147483647}

Calibration and the lowered graph's C++ ops (the integer GEMMs, the scans, the convs) make new
tensors of megabytes to tens of megabytes (a lowered Vim-S mixer's in_proj output is 19 MB at
batch 16). glibc's malloc maps chunks above its mmap threshold anew and hands them back to the
kernel when they are freed, and trims freed memory off the top of its heaps; the next tensor then
takes a page fault for each 4 KB page it writes, which the kernel zeroes first. Its thresholds
adjust themselves to what the process has freed so far, so how often that happens depends on what
ran before in the process. :func:`tune_malloc` fixes them so that chunks up to 32 MB come from the
heap (``M_MMAP_THRESHOLD``, glibc's largest) and freed heap memory is kept (``M_TRIM_THRESHOLD``):
the process holds on to its peak heap instead of returning it between calls. Measured effects:
``benchmarks/cpu_latency_avx2.md``.

It changes the whole process's allocator, which this package does not do to a Python caller
unasked; the ``ouromamba-fx`` command, whose process is the tool's own, calls it at its start
(``OUROMAMBA_FX_MALLOC=default`` leaves the allocator as it is). The same settings as environment
variables, for a process started anew: ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=2147483647``; jemalloc or tcmalloc (``LD_PRELOAD``) cache freed memory by
themselves. Chunks above 32 MB (activations at large batches) are still mapped anew: where the
kernel's transparent huge pages are enabled (``always`` or ``madvise``), PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` backs large tensors with 2 MB pages, a fault per 2 MB.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings

__all__ = ["tune_malloc", "applied", "MMAP_THRESHOLD_MAX"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MB on 64-bit builds
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_INT_MAX = 2**31 - 1  # mallopt takes an int

_applied: dict[str, int] = {}  # what tune_malloc set in this process


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``),
    else None. Read from the symbols already loaded (``dlopen(NULL)``): the C library this process
    runs on, without searching for one by name (``ctypes.util.find_library`` runs ldconfig)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl and other C libraries
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = _INT_MAX) -> dict[str, int]:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` for this process (see the module
    docstring) and return what was set. Where the C library is not glibc (macOS, Windows, musl)
    nothing changes: a warning says so and the result is empty. Process-wide and not undone; it
    also turns off glibc's own adjustment of these thresholds."""
    if not 0 <= mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"tune_malloc: mmap_threshold must be in [0, {MMAP_THRESHOLD_MAX}] bytes (glibc's "
                         f"limit on 64-bit builds), got {mmap_threshold}")
    if not 0 <= trim_threshold <= _INT_MAX:
        raise ValueError(f"tune_malloc: trim_threshold must be in [0, {_INT_MAX}] bytes (mallopt takes an "
                         f"int), got {trim_threshold}")
    libc = _glibc()
    if libc is None:
        warnings.warn("tune_malloc: this process's C library is not glibc, so its malloc was left as it is "
                      "(jemalloc or tcmalloc through LD_PRELOAD keep freed memory themselves)", stacklevel=2)
        return {}
    done = {}
    for name, param, value in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, mmap_threshold),
                               ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"tune_malloc: glibc's mallopt refused {name} = {value}")
        done[name] = value
    _applied.update(done)
    return done


def applied() -> dict[str, int]:
    """The thresholds :func:`tune_malloc` set in this process (empty: none; the ``ouromamba-fx``
    command sets them at its start)."""
    return dict(_applied)
