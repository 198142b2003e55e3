"""Host memory of in-memory merges on the CPU backend: freed pages kept for reuse (opt-in).

XLA:CPU allocates every execution's outputs and temporaries with ``malloc``. glibc serves allocations above
its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, and trims
the top of its heaps beyond the trim threshold, so a loop of merges faults in zeroed pages for every
call's results and temporaries again. While :func:`keep_host_memory` is active, allocations below 1 GiB
come from malloc's heaps and freed memory stays there (``M_MMAP_THRESHOLD`` 1 GiB, ``M_TRIM_THRESHOLD``
the largest int), so a merge reuses the pages of the previous call's freed results.

Measured (``scripts/bench_methods.py --keep-host-memory``, 102.8M float32 parameters, 2-core CPU): task
arithmetic in a loop 0.19-0.21 -> 0.10 s per call, Model Stock 1.37 -> 0.59 s. Limits: XLA's worker threads
allocate in their own malloc arenas, whose heaps are at most 64 MiB each (a glibc constant), and a heap that
empties is unmapped whatever the thresholds; so reuse holds for tensors whose temporaries fit such heaps
(e.g. ``(1024, 2816)`` float32 leaves with a 3-model stacked temporary), not for larger ones
(``(1024, 4096)``: no fewer faults). It is therefore not entered by :func:`jmerge.merge` itself: around a
single call it saved nothing on task arithmetic and TIES (5-10% slower there: heap creation costs more than
an ``mmap``). The out-of-core CLI has its own, stricter setting (:mod:`jmerge.pipeline.executor`).

Where XLA allocates matters more than the thresholds. With JAX's CPU async dispatch (the default) an
execution's temporaries are allocated on the dispatch thread, in a malloc arena of its own, which serves any
block beyond its 64 MiB heaps with a fresh mapping whatever the settings: a PCB merge of a ``(1024, 2816)``
leaf maps its 80 MB of temporaries anew on every call (20k page faults, 27 ms of system time in 60 ms).
With ``jax.config.update("jax_cpu_enable_async_dispatch", False)`` made before JAX's first computation (the
setting is read when the CPU client is created; later it changes nothing, so this module cannot do it for
the caller) executions allocate on the calling thread, and inside this context they reuse each other's pages:
that leaf 60 -> 38 ms with no faults; the 102.8M-parameter tree of ``scripts/bench_methods.py
--sync-dispatch --keep-host-memory``: PCB 1.88 -> 1.34 s, TIES 0.64 -> 0.53 s, task arithmetic 0.14-0.33 ->
0.08 s (the first call of a run). Turning dispatch off is the caller's decision: it also makes every other
JAX CPU computation in the process synchronous.

On the last exit the thresholds go to the values glibc's dynamic scheme settles at in a process that has
freed a large block (32 MiB and 64 MiB; a ``mallopt`` cannot re-enable the dynamic scheme) and
``malloc_trim(0)`` returns the freed memory to the system. Not glibc (musl, macOS, Windows): nothing changes.

References: glibc manual, "Malloc Tunable Parameters" (``mallopt``, ``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from typing import Any, Iterator

__all__ = ["keep_host_memory", "active", "glibc"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8  # glibc mallopt parameters
_KEEP_MMAP = 2**30  # allocations above this still get their own mapping (returned on free)
_KEEP_TRIM = 2**31 - 1  # the largest int: never trim
_DEFAULT_MMAP = 32 * 2**20  # where glibc's dynamic thresholds settle (DEFAULT_MMAP_THRESHOLD_MAX, twice it)
_DEFAULT_TRIM = 64 * 2**20

_lock = threading.Lock()
_depth = 0


@functools.cache
def glibc() -> Any:
    """The process's C library through ``ctypes`` when it is glibc (has ``mallopt``), else None.

    References: none (infrastructure).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version") else None


def active() -> bool:
    """Whether :func:`keep_host_memory` is active (in any thread).

    References: none (infrastructure).
    """
    return _depth > 0


@contextlib.contextmanager
def keep_host_memory() -> Iterator[bool]:
    """Keep freed host memory for reuse while the block runs (glibc only; re-entrant, any thread).

    Yields whether the setting is in effect (False where the C library is not glibc). Typical use: a loop
    of in-memory merges on CPU, whose calls then reuse each other's pages (see the module docstring for
    the measured gain and its limits)::

        with jmerge.keep_host_memory():
            for w in weights:
                merged = jmerge.merge(jmerge.task_arithmetic(scale=w), base, models)

    Memory freed inside the block stays in the process (reused by its later allocations) until the last
    such block ends; then it is returned to the system.

    References: glibc manual, "Malloc Tunable Parameters".
    """
    global _depth
    lib = glibc()
    if lib is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            lib.mallopt(M_MMAP_THRESHOLD, _KEEP_MMAP)
            lib.mallopt(M_TRIM_THRESHOLD, _KEEP_TRIM)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(M_MMAP_THRESHOLD, _DEFAULT_MMAP)
                lib.mallopt(M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                if hasattr(lib, "malloc_trim"):
                    lib.malloc_trim(0)
