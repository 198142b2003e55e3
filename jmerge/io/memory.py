"""Anonymous host memory for the checkpoint path: 2 MiB-aligned, huge pages where the kernel allows, faulted
in at once (the read pool of :mod:`jmerge.pipeline.executor` and the writer's ``O_DIRECT`` bounce buffer).

On the VMs this was measured on, every fresh page costs a zeroing and a host fault (the guest returns
freed memory to the host), so buffers the checkpoint path reuses are mapped once, as huge pages, and
faulted in with one call.

References: Linux ``madvise(2)`` (``MADV_HUGEPAGE``, ``MADV_POPULATE_WRITE``).
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["HUGE_PAGE", "anon_buffer"]

HUGE_PAGE = 2 * 2**20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault every page of a range in one call (missing from Python's mmap)


def anon_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of 2 MiB-aligned anonymous memory (huge pages where the kernel allows), faulted in at once.

    The returned array keeps the mapping alive as long as any view of it (or an alias JAX made) lives.

    References: Linux ``madvise(2)`` (``MADV_HUGEPAGE``, ``MADV_POPULATE_WRITE``).
    """
    private = getattr(mmap, "MAP_PRIVATE", None)  # not MAP_SHARED (shared memory: no huge pages)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE) if private is None else mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private)
    a = np.frombuffer(m, np.uint8)
    off = (-a.ctypes.data) % HUGE_PAGE
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), _MADV_POPULATE_WRITE):
        if advice is not None and hasattr(m, "madvise"):
            try:
                m.madvise(advice, off, nbytes)  # off: a multiple of 2 MiB, so of the page size
            except (OSError, ValueError):
                pass  # no THP / an older kernel: ordinary pages, faulted on first touch
    return a[off:off + nbytes]
