"""The out-of-core executor: runs tensor jobs with bounded memory and writes the output atomically.

:func:`run_merge` executes a :class:`~jmerge.MergePlan` (from a YAML config): the planners turn it
into tensor jobs; for each job the executor reads its sources straight into reused NumPy buffers
(``pread``, no mmap; a merge's models into one stacked buffer), runs the operation (a merge is the
core's :class:`~jmerge.LeafProgram`, the same per-leaf program :func:`jmerge.merge` runs, compiled once per shape and dtype) and writes the
result at its planned offset with the atomic :class:`~jmerge.CheckpointWriter`. Reads of the next
tensors run in a thread pool while the current one merges, and writes run in another, with a bounded
window of tensors (and bytes) in flight, so memory is a few tensors, not the model. Methods with
whole-model statistics (global TIES, EMR) take a first pass per statistic that only collects it.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the config and tensor-by-tensor execution model.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..core import LeafProgram, check_ranges, infer_views, leaf_key
from ..core.chunks import (CHUNK_ENTRIES, SMALL_CHUNK_ENTRIES, chunk_size, chunked_form, entrywise, merge_chunked,
                           merge_chunked_stream)
from ..core.heap import M_ARENA_MAX as _M_ARENA_MAX, M_MMAP_MAX as _M_MMAP_MAX
from ..core.heap import M_TRIM_THRESHOLD as _M_TRIM_THRESHOLD, glibc
from ..io.memory import HUGE_PAGE as _HUGE, anon_buffer as _anon_buffer
from ..mergekit import MergePlan
from ..mergekit.arch import layer_sources, model_views, output_config
from .jobs import (Copy, Merge, Tensor, TensorJob, read_source, read_tensor, row_parts, tensor_nbytes,
                   tensor_shape)
from .planners import input_paths, np_dtype, plan_jobs
from .progress import Progress
from .validate import open_input, validate_plan

__all__ = ["run_merge", "run_jobs", "MergeContext", "Buffers", "mesh_sharding"]


_SMALL = 256 * 2**10  # below this, buffers are plain NumPy allocations (few pages, little to save)


def _aligned_small(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes]


class _Chunk:
    """One anonymous mapping of the pool and its free ranges ``[(start, end)]`` (sorted, coalesced)."""

    __slots__ = ("mem", "free")

    def __init__(self, mem: np.ndarray):
        self.mem = mem
        self.free = [(0, mem.nbytes)]

    def take(self, size: int) -> Optional[int]:
        for i, (lo, hi) in enumerate(self.free):  # first fit: the lowest address
            if hi - lo >= size:
                self.free[i:i + 1] = [(lo + size, hi)] if hi - lo > size else []
                return lo
        return None

    def give(self, lo: int, size: int) -> None:
        import bisect  # noqa: PLC0415
        i = bisect.bisect(self.free, (lo, lo))
        hi = lo + size
        if i < len(self.free) and self.free[i][0] == hi:  # merge with the next free range
            hi = self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][1] == lo:  # and the previous one
            lo = self.free.pop(i - 1)[0]
            i -= 1
        self.free.insert(i, (lo, hi))

    @property
    def empty(self) -> bool:
        return self.free == [(0, self.mem.nbytes)]


class Buffers:
    """A pool of reused host buffers for tensors read from disk (a fresh allocation page-faults on every
    byte, and the kernel zeroes every page: on a VM whose free memory is returned to the host, each such
    page is also a host fault).

    The pool is a few large chunks of anonymous memory, 2 MiB-aligned, advised for transparent huge
    pages where the kernel allows and faulted in with one call (``MADV_POPULATE_WRITE``), falling back
    silently to ordinary pages. :meth:`get` carves a 64-byte-aligned range out of a chunk (first fit,
    lowest address; a new chunk of the request's size, rounded to 2 MiB, when none fits), so one chunk
    serves tensors of any sizes at once and memory follows the bytes in flight, not the largest tensor
    times the window. XLA:CPU takes arrays viewed on these ranges without copying. :meth:`put` gives
    ranges back (neighbours coalesce); chunks left wholly free beyond ``keep`` chunks or ``max_bytes``
    free bytes are released (the least recently used first; memory goes when the last view of it is
    gone). Requests under 256 KiB are plain aligned NumPy allocations (not pooled). A range is never
    handed out twice before it is put back, and two ranges out at once never overlap.

    Args:
      keep: most wholly free chunks kept (``keep=1``: ranges are reused as soon as possible).
      max_bytes: most bytes kept in wholly free chunks (default: no bound besides ``keep``).
      chunk_bytes: smallest size of a new chunk (default: the request's size), e.g. the executor's
        budget of bytes in flight, so that one chunk serves the whole merge.

    References: none (infrastructure).
    """

    def __init__(self, keep: int = 64, max_bytes: Optional[int] = None, chunk_bytes: int = 0):
        self._chunks: list[_Chunk] = []  # least recently created first
        self._out: dict[int, tuple[_Chunk, int, int]] = {}  # address -> (chunk, start, size) of those handed out
        self._lock = threading.Condition()
        self._keep = max(int(keep), 0)
        self._max_bytes = max_bytes
        self._chunk_bytes = max(int(chunk_bytes), 0)
        self.allocated = 0  # chunks created (for tests and benchmarks)
        self.allocated_bytes = 0
        self.out_bytes = 0  # bytes of the pooled ranges handed out now

    def wait_out_bytes(self, most: int, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until at most ``most`` pooled bytes are handed out."""
        with self._lock:
            self._lock.wait_for(lambda: self.out_bytes <= most, timeout)

    @property
    def chunks(self) -> int:
        """Chunks held by the pool now."""
        return len(self._chunks)

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` bytes (a view of a pooled chunk for 256 KiB and more)."""
        nbytes = int(nbytes)
        if nbytes < _SMALL or nbytes == 0:
            return _aligned_small(nbytes)
        size = -(-nbytes // 64) * 64
        with self._lock:
            for c in self._chunks:
                lo = c.take(size)
                if lo is not None:
                    break
            else:
                first = self._chunk_bytes if not self._chunks else 0  # later chunks: the request's size
                c = _Chunk(_anon_buffer(-(-max(size, first) // _HUGE) * _HUGE))
                self.allocated += 1
                self.allocated_bytes += c.mem.nbytes
                self._chunks.append(c)
                lo = c.take(size)
            view = c.mem[lo:lo + nbytes]
            self._out[view.ctypes.data] = (c, lo, size)
            self.out_bytes += size
            return view

    def put(self, bufs: Iterable[np.ndarray]) -> None:
        """Give back buffers from :meth:`get` once nothing reads or writes them (others are ignored)."""
        with self._lock:
            for b in bufs:
                rec = self._out.pop(b.ctypes.data, None) if isinstance(b, np.ndarray) and b.nbytes else None
                if rec is not None:
                    c, lo, size = rec
                    c.give(lo, size)
                    self.out_bytes -= size
            idle = [c for c in self._chunks if c.empty]
            total = sum(c.mem.nbytes for c in idle)
            while idle and (len(idle) > self._keep or (self._max_bytes is not None and total > self._max_bytes)):
                c = idle.pop(0)
                total -= c.mem.nbytes
                self._chunks.remove(c)
            self._lock.notify_all()


@contextlib.contextmanager
def _malloc_keeps_freed_memory(reserve: int = 0):
    """While the merge runs, have glibc's malloc keep freed memory for reuse instead of returning it.

    XLA:CPU allocates its outputs and temporaries (e.g. the task vectors, models x tensor x float32) with
    ``malloc`` on every execution; glibc serves allocations over 32 MiB with a fresh ``mmap`` and unmaps
    them on free, so the kernel zeroes every page of them again for every tensor. Here the process's
    allocations come from one heap that is never trimmed (``M_MMAP_MAX=0``, ``M_ARENA_MAX=1``,
    ``M_TRIM_THRESHOLD`` 2 GiB), so the second tensor of a shape reuses the first's pages, and the heap's
    first ``reserve`` bytes are advised for transparent huge pages (one fault per 2 MiB; address space
    only until touched). glibc's defaults are restored afterwards and the retained memory released
    (``malloc_trim``). Threads that already use another malloc arena keep it (a library caller whose XLA
    ran before). Not glibc (musl, macOS, Windows): nothing changes.
    """
    import ctypes  # noqa: PLC0415

    libc = glibc()
    if libc is not None:
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_ARENA_MAX, 1)
        if reserve:  # the heap's top, advised for huge pages, then freed (kept: never trimmed)
            libc.malloc.restype = ctypes.c_void_p
            libc.free.argtypes = [ctypes.c_void_p]
            p = libc.malloc(ctypes.c_size_t(reserve))
            if p:
                lo = -(-p // _HUGE) * _HUGE
                hi = (p + reserve) // _HUGE * _HUGE
                libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(max(hi - lo, 0)), 14)  # MADV_HUGEPAGE
                libc.free(ctypes.c_void_p(p))
    try:
        yield
    finally:
        if libc is not None:  # glibc's defaults: 128 KiB trim threshold, 65536 mmaps, 8 arenas per core
            libc.mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))
            libc.mallopt(_M_MMAP_MAX, 65536)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            if hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)


def mesh_sharding(mesh_spec: Optional[str]) -> Optional[Callable[[tuple[int, ...]], Any]]:
    """``"8"`` or ``"data=8"`` -> a function placing an array's first axis across that many devices.

    References: none (infrastructure).
    """
    if not mesh_spec:
        return None
    import re  # noqa: PLC0415

    import jax  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

    from ..core import MergeInputError  # noqa: PLC0415
    m = re.fullmatch(r"(?:(\w+)=)?(\d+)", mesh_spec.strip())
    if not m:
        raise MergeInputError(f"--mesh '{mesh_spec}': give the number of devices, e.g. '8' or 'data=8'.")
    n = int(m.group(2))
    devs = jax.devices()
    if n > len(devs):
        raise MergeInputError(f"--mesh asks for {n} devices but only {len(devs)} are visible: {devs}.")
    name = m.group(1) or "x"
    mesh = Mesh(np.array(devs[:n]), (name,))
    return lambda shape: NamedSharding(mesh, PartitionSpec(name) if shape and shape[0] % n == 0 else PartitionSpec())


@dataclasses.dataclass
class MergeContext:
    """What the executor needs besides the jobs: the per-leaf program and each tensor's inputs to it.

    Attributes:
      program: the method's :class:`LeafProgram` (None when every job is a copy).
      hparams: per output tensor, its resolved hyperparameters.
      views: per output tensor, its matrix view.
      seed: seed of random methods (keys are folded with the tensor name).
      compute_dtype: the config's ``dtype``: merges compute in it (bf16/fp16 emulated, see
        :func:`jmerge.merge`) from inputs cast to it; None: each merge computes in its inputs' dtype
        (float32 when they differ), as mergekit does without ``dtype``.
      put: places an input array on devices (``--mesh``), or None.
      compute_float32: compute every merge in float32 from the inputs as stored, whatever the
        ``dtype`` (``--compute-float32``); the output dtype is unchanged.
      fast_compile: tensor shapes whose program compiles with ``LeafProgram(..., fast_compile=True)``
        (see :func:`fast_compile_shapes`).
      chunk_program: the method's :func:`~jmerge.core.chunks.chunked_form`, or None: tensors of at least
        ``SMALL_CHUNK_ENTRIES`` entries whose models are read stacked merge chunk by chunk with it (one compiled
        program for every shape of a chunk size, :func:`chunk_entries`; bit-identical results).
      entrywise: the method computes each entry from the same entries of its inputs alone
        (:func:`jmerge.core.chunks.entrywise`): large merges then run a block of rows at a time
        (:func:`~jmerge.pipeline.jobs.row_parts`), as copies always may.

    References: none (infrastructure).
    """

    program: Optional[LeafProgram]
    hparams: dict
    views: dict
    seed: int
    compute_dtype: Optional[np.dtype] = None
    put: Optional[Callable] = None
    compute_float32: bool = False
    fast_compile: frozenset = frozenset()
    chunk_program: Optional[LeafProgram] = None
    entrywise: bool = False


PART_BYTES = 32 * 2**20  # input bytes (all models) of a block of rows of a large tensor (row_parts)


def split_rows(jobs: Sequence[TensorJob], readers, ctx: MergeContext, part_bytes: Optional[int] = None) -> list:
    """The jobs with each large copy, and each large merge of an entrywise method, split into blocks of rows
    (:func:`~jmerge.pipeline.jobs.row_parts`): their reads, merges and writes then hold a block at a time, so
    the read buffers and XLA's outputs take a few blocks' memory instead of the largest tensor's inputs (an
    embedding's four inputs: 500 MiB for a 0.54B Llama). Not with a mesh (sharded inputs) or whole-model
    statistics (their passes read whole tensors).

    References: none (infrastructure).
    """
    if ctx.put is not None or (ctx.program is not None and ctx.program.phases):
        return list(jobs)
    part_bytes = PART_BYTES if part_bytes is None else part_bytes
    out = []
    for j in jobs:
        # (a merge's draws keyed by flat index, models x entries, stay below 2**32: jmerge.core.xla.bernoulli)
        ok = isinstance(j.op, Copy) or (isinstance(j.op, Merge) and ctx.entrywise
                                        and len(j.op.models) * int(np.prod(j.shape, dtype=np.int64)) < 2 ** 32)
        out += row_parts(j, readers, part_bytes) if ok else [j]
    return out


def chunk_entries(n: int) -> int:
    """Entries per chunk of a chunked merge of a tensor of ``n`` entries, or 0 when it merges whole.

    ``CHUNK_ENTRIES`` from that size on; from ``SMALL_CHUNK_ENTRIES`` up to it, chunks of that size (a 0.54B Llama's
    K and V projections, 2^19 entries: one compiled program set of the small size for every such shape, about
    half the compile of one per-tensor TIES program, which each shape would compile); smaller tensors merge
    whole (their padding would outweigh the compile saved). The results are the same either way
    (:func:`jmerge.core.chunks.chunk_size`, read with this module's two sizes).

    References: none (infrastructure).
    """
    return chunk_size(n, CHUNK_ENTRIES, SMALL_CHUNK_ENTRIES)


STREAM_BYTES = 4 * PART_BYTES  # input bytes (all models) above which a chunked merge reads its chunks per pass


def streams(job: TensorJob, readers, ctx: MergeContext) -> bool:
    """Whether a merge runs chunk by chunk straight from the checkpoints (:func:`_run_streamed`,
    :func:`~jmerge.core.chunks.merge_chunked_stream`): the method has a chunked form, the job reads more than
    ``STREAM_BYTES``, and its base and models are whole checkpoint tensors of its shape, the models of one
    dtype, that their readers read in parts (``rows_readable``, ``get_flat``). Each pass then reads the chunks
    again (from the page cache) instead of holding the tensor's inputs (a 0.54B Llama's embedding: 500 MiB).
    Not with a mesh.

    References: none (infrastructure).
    """
    if (ctx.chunk_program is None or ctx.put is not None or not isinstance(job.op, Merge) or job.rows is not None
            or not chunk_entries(int(np.prod(job.shape, dtype=np.int64))) or job.pool_bytes(readers) <= STREAM_BYTES
            or not _stackable(job, readers, ctx)):
        return False
    for s in job.sources:
        if not isinstance(s, Tensor) or s.rows is not None or tensor_shape(s, readers) != tuple(job.shape):
            return False
        r = readers[s.reader]
        if not (hasattr(r, "get_flat") and getattr(r, "rows_readable", lambda n: False)(s.name)):
            return False
    return True


def fast_compile_shapes(merges: Sequence[TensorJob], chunked: bool = False) -> frozenset:
    """Shapes whose merges process at most ``FAST_COMPILE_MAX_WORK`` model entries in all (models x
    entries summed over the tensors of that shape): their program compiles with XLA:CPU options that
    save more compile time than its slower kernels cost (``jmerge.core.xla``, workaround 9). With
    ``chunked`` (the method has a chunked form), merges of :func:`chunk_entries` > 0 count towards the key
    ``("chunks", C)`` of their chunk size instead, with their padded entries.

    References: none (an XLA workaround measured on this project's machines).
    """
    from ..core.xla import FAST_COMPILE_MAX_WORK  # noqa: PLC0415
    work: dict = {}
    for j in merges:
        key: Any = tuple(j.shape)
        n = int(np.prod(key, dtype=np.int64))
        c = chunk_entries(n) if chunked else 0
        if c:
            key, n = ("chunks", c), -(-n // c) * c
        work[key] = work.get(key, 0) + len(j.op.models) * n
    return frozenset(s for s, w in work.items() if w <= FAST_COMPILE_MAX_WORK)


def _stackable(job: TensorJob, readers, ctx: MergeContext) -> bool:
    """Whether a merge's models are checkpoint tensors of one dtype and shape (read into one buffer)."""
    if not isinstance(job.op, Merge) or ctx.put is not None or not job.op.models:
        return False
    ms = job.op.models
    if not all(isinstance(s, Tensor) for s in ms):
        return False
    first = readers[ms[0].reader]
    key = (np.dtype(first.dtype(ms[0].name)), tensor_shape(ms[0], readers))
    return all((np.dtype(readers[s.reader].dtype(s.name)), tensor_shape(s, readers)) == key for s in ms)


def _cast_dtype(job: TensorJob, dtype: np.dtype, ctx: MergeContext) -> np.dtype:
    """The dtype an input of ``dtype`` is merged in: the config's narrower ``dtype`` (mergekit casts inputs to
    it before merging; wider casts are exact), else its own."""
    cd = None if ctx.compute_float32 else ctx.compute_dtype
    if isinstance(job.op, Merge) and cd is not None and dtype != cd and np.dtype(cd).itemsize < dtype.itemsize:
        return np.dtype(cd)
    return np.dtype(dtype)


def _read(job: TensorJob, readers, bufs: Buffers, ctx: MergeContext):
    """``(arrays, raw, stacked)``: the job's inputs (base first), the pooled buffers they live in, and whether
    ``arrays[1]`` holds every model in one ``(T, *shape)`` array (read straight into one pooled buffer)."""
    arrays, raw = [], []

    def cast(a):
        dt = _cast_dtype(job, a.dtype, ctx)
        return a if dt == a.dtype else a.astype(dt)

    stacked = _stackable(job, readers, ctx)
    for s in (job.sources[:1] if stacked else job.sources):
        a, r = read_source(s, readers, bufs)
        raw += r
        arrays.append(cast(a))
    if stacked:
        ms = job.op.models
        dt, shape, nb = np.dtype(readers[ms[0].reader].dtype(ms[0].name)), tensor_shape(ms[0], readers), \
            tensor_nbytes(ms[0], readers)
        buf = bufs.get(nb * len(ms))
        raw.append(buf)
        for t, s in enumerate(ms):
            read_tensor(s, readers, out=buf[t * nb:(t + 1) * nb])
        arrays.append(cast(buf.view(dt).reshape((len(ms),) + shape)))
    return arrays, raw, stacked


def _stream(jobs, readers, bufs, ctx, pool, window: int, max_bytes: int, consume):
    """Read ahead with a bounded window; call ``consume(job, arrays, raw, stacked)`` in order.

    At most ``window`` reads are pending, and a read starts only while the pool's buffers handed out
    (inputs of merges not yet computed, reads under way) plus the pending reads and this one stay within
    ``max_bytes``; with nothing pending, a read waits for merges in flight to give their buffers back
    (a larger tensor runs alone), so the pool's memory is about ``max_bytes``, reused."""
    pending = collections.deque()
    it = iter(jobs)
    nxt = next(it, None)
    size = lambda j: j.pool_bytes(readers)  # reads, and zeros/stacks built in pooled buffers
    held = lambda: getattr(bufs, "out_bytes", 0) + sum(size(q) for q, _ in pending)
    while nxt is not None or pending:
        if nxt is not None and not pending and held() + size(nxt) > max_bytes and hasattr(bufs, "wait_out_bytes"):
            bufs.wait_out_bytes(max(max_bytes - size(nxt), 0), timeout=5.0)  # given back by the writer thread
        while nxt is not None and (not pending or (len(pending) < window and held() + size(nxt) <= max_bytes)):
            pending.append((nxt, pool.submit(_read, nxt, readers, bufs, ctx)))
            nxt = next(it, None)
        job, fut = pending.popleft()
        consume(job, *fut.result())


def _compute_dtype(ctx: MergeContext, arrays) -> str:
    """The dtype a merge of ``arrays`` computes in: float32 with ``compute_float32``, else the config's
    ``dtype``, else the inputs' common dtype (float32 when they differ, as torch promotes)."""
    if ctx.compute_float32:
        return "float32"
    if ctx.compute_dtype is not None:
        return np.dtype(ctx.compute_dtype).name
    names = {np.dtype(a.dtype).name for a in arrays}
    return names.pop() if len(names) == 1 else "float32"


def _put(ctx: MergeContext, x):
    return x if ctx.put is None else __import__("jax").device_put(x, ctx.put(x.shape))


def _collect_stats(jobs, readers, bufs, ctx, pool, window, max_bytes, progress) -> dict:
    """One pass over the inputs per whole-model statistic; returns per tensor ``{step: {phase: value}}``."""
    import jax  # noqa: PLC0415
    stats = {j.out_name: {} for j in jobs}
    merges = [j for j in jobs if isinstance(j.op, Merge)]
    for pi, (_, sname, phase) in enumerate(ctx.program.phases if ctx.program is not None else ()):
        hps = [ctx.hparams[j.out_name] for j in merges]
        skipped = ctx.program.skip(pi, [stats[j.out_name] for j in merges], hps)
        if skipped is not None:  # nothing to read: the phase's values without a pass over the inputs
            for j, v in zip(merges, skipped):
                stats[j.out_name].setdefault(sname, {})[phase.name] = v
            continue
        progress.phase(f"statistics '{phase.name}'")
        collected = []

        def collect(j, arrays, raw, stacked, pi=pi):
            models = arrays[1] if stacked else tuple(_put(ctx, a) for a in arrays[1:])
            r = ctx.program.collect(pi, _put(ctx, arrays[0]), models,
                                    ctx.hparams[j.out_name], leaf_key(ctx.seed, j.out_name), stats[j.out_name],
                                    ctx.views[j.out_name], compute_dtype=_compute_dtype(ctx, arrays),
                                    fast_compile=j.tensor_shape in ctx.fast_compile, sort_limit="auto",
                                    **({"models_stacked": True} if stacked else {}))
            # copied when it is a view of a read buffer (e.g. an input JAX forwarded): the buffer is reused
            collected.append(jax.tree.map(lambda x: _unaliased(np.asarray(x), raw), r))
            bufs.put(raw)

        _stream(merges, readers, bufs, ctx, pool, window, max_bytes, collect)
        for j, v in zip(merges, ctx.program.finalize(pi, collected, hps)):
            stats[j.out_name].setdefault(sname, {})[phase.name] = v
    return stats


def _unaliased(x: np.ndarray, raw: Sequence[np.ndarray]) -> np.ndarray:
    """``x``, or a copy of it when its memory may overlap one of the buffers ``raw``."""
    return x.copy() if any(np.may_share_memory(x, b) for b in raw) else x


@dataclasses.dataclass
class _Pieces:
    """A tensor merged chunk by chunk: the chunks' results (computed asynchronously) in flat order."""

    pieces: list
    last: int
    shape: tuple

    def array(self) -> np.ndarray:
        parts = [np.asarray(p) for p in self.pieces]
        parts[-1] = parts[-1][:self.last]
        return np.concatenate(parts).reshape(self.shape)


def _chunk_bytes(job: TensorJob, readers) -> int:
    """Bytes of one chunk's pooled buffer of a :func:`streams` job (the base's and the models' entries)."""
    its = [np.dtype(readers[s.reader].dtype(s.name)).itemsize for s in job.sources]
    return chunk_entries(int(np.prod(job.shape, dtype=np.int64))) * sum(its)


def _chunked(job: TensorJob, ctx: MergeContext, stacked: bool) -> bool:
    return (ctx.chunk_program is not None and stacked and isinstance(job.op, Merge)
            and chunk_entries(int(np.prod(job.shape, dtype=np.int64))) > 0)


def _apply(job: TensorJob, arrays, ctx: MergeContext, stats: dict, stacked: bool = False, alloc=None):
    if isinstance(job.op, Copy):
        a = arrays[0]
        if job.op.scale != 1.0:
            a = a.astype(np.float32) * np.float32(job.op.scale)
        return a.astype(job.dtype, copy=False)
    hp = {k: np.asarray(v, np.float32) for k, v in ctx.hparams[job.out_name].items()}
    # JAX has no float64 without x64: a float64 output is computed as float32 and cast by the writer
    out_dtype = np.float32 if np.dtype(job.dtype) == np.float64 else job.dtype
    if _chunked(job, ctx, stacked):
        c = chunk_entries(int(arrays[0].size))
        pieces, last = merge_chunked(ctx.chunk_program, arrays[0], arrays[1], ctx.hparams[job.out_name],
                                     leaf_key(ctx.seed, job.out_name), out_dtype=out_dtype,
                                     compute_dtype=_compute_dtype(ctx, arrays), chunk=c,
                                     fast_compile=("chunks", c) in ctx.fast_compile, alloc=alloc)
        return _Pieces(pieces, last, tuple(job.shape))
    models = arrays[1] if stacked else tuple(_put(ctx, a) for a in arrays[1:])
    extra = {"models_stacked": True} if stacked else {}
    if job.rows is not None:  # a block of rows: draws keyed by flat index start at its first entry's
        row = int(np.prod(job.shape[1:], dtype=np.int64))
        extra["offset"] = (job.rows[0] * row, job.tensor_shape[0] * row)
    return ctx.program(_put(ctx, arrays[0]), models, hp,
                       leaf_key(ctx.seed, job.out_name), stats.get(job.out_name) or {}, ctx.views[job.out_name],
                       out_dtype=out_dtype, compute_dtype=_compute_dtype(ctx, arrays),
                       fast_compile=job.tensor_shape in ctx.fast_compile, sort_limit="auto", **extra)


def _run_streamed(job: TensorJob, readers, bufs: Buffers, ctx: MergeContext, rpool, wpool, writer,
                  window: int, max_bytes: int) -> None:
    """Merge a :func:`streams` job chunk by chunk from the checkpoints and write each piece in place.

    Chunk ``i`` (entries ``i * C`` on, ``C`` = :func:`chunk_entries`, the last zero-padded) of the base and the
    models is read into one pooled buffer (the next chunk's read runs ahead in ``rpool``), given back once its
    values are on the host; the merged pieces are written by ``wpool``, each at its entries' place. Chunks held
    (one read ahead, one merging, the pieces not yet computed) stay within ``max_bytes`` (at least three)."""
    ms = job.op.models
    n = int(np.prod(job.shape, dtype=np.int64))
    T, C = len(ms), chunk_entries(n)
    base = job.op.base
    bdt = np.dtype(readers[base.reader].dtype(base.name))
    mdt = np.dtype(readers[ms[0].reader].dtype(ms[0].name))
    cb, cm = _cast_dtype(job, bdt, ctx), _cast_dtype(job, mdt, ctx)  # the dtypes merged in
    split = C * bdt.itemsize
    size = _chunk_bytes(job, readers)  # split + T * C * mdt.itemsize
    count = -(-n // C)

    def read(i):
        lo = i * C
        rest = min(C, n - lo)
        buf = bufs.get(size)
        try:
            b = buf[:split].view(bdt)
            m = buf[split:].view(mdt).reshape(T, C)
            readers[base.reader].get_flat(base.name, lo, lo + rest, out=b[:rest])
            b[rest:] = 0
            for t, s in enumerate(ms):
                readers[s.reader].get_flat(s.name, lo, lo + rest, out=m[t, :rest])
            m[:, rest:] = 0
        except BaseException:
            bufs.put([buf])
            raise
        b = b if cb == bdt else b.astype(cb)
        m = m if cm == mdt else m.astype(cm)
        return (b, tuple(m[t] for t in range(T))), buf

    ahead: dict = {}

    def load(i):
        fut = ahead.pop(i, None)
        if i + 1 < count and i + 1 not in ahead:
            ahead[i + 1] = rpool.submit(read, i + 1)
        chunk, buf = fut.result() if fut is not None else read(i)
        return chunk, lambda: bufs.put([buf])

    writes: collections.deque = collections.deque()

    def write(i, piece, release):
        lo = i * C
        out = np.asarray(piece)[:min(C, n - lo)]  # waits for the piece
        if release is not None:
            release()
        writer.write(job.out_name, out, flat=(lo, lo + out.shape[0]))

    most = max(1, min(window, max_bytes // size - 2))  # pieces in flight, besides the chunk read ahead

    def emit(i, piece, release):
        writes.append(wpool.submit(write, i, piece, release))
        while len(writes) > most:
            writes.popleft().result()

    kinds = [np.zeros(0, cb), np.zeros(0, cm)]
    out_dtype = np.float32 if np.dtype(job.dtype) == np.float64 else job.dtype
    try:
        merge_chunked_stream(ctx.chunk_program, load, n, ctx.hparams[job.out_name], leaf_key(ctx.seed, job.out_name),
                             emit, out_dtype=out_dtype, compute_dtype=_compute_dtype(ctx, kinds), chunk=C,
                             fast_compile=("chunks", C) in ctx.fast_compile)
        while writes:
            writes.popleft().result()
    finally:
        for f in ahead.values():  # a failed pass: its read-ahead's buffer goes back too
            with contextlib.suppress(BaseException):
                bufs.put([f.result()[1]])
        for f in writes:
            with contextlib.suppress(BaseException):
                f.result()


def run_jobs(jobs: Sequence[TensorJob], readers: Sequence[Any], writer: Any, ctx: MergeContext, *, window: int = 4,
             read_threads: int = 2, max_inflight_bytes: int = 512 * 2**20, progress: Optional[Progress] = None,
             buffers: Optional[Buffers] = None, tune_malloc: bool = False,
             _fail_after: Optional[int] = None) -> None:
    """Run ``jobs``, writing each result with ``writer.write(name, array)``.

    Reads run ahead in ``read_threads`` threads and writes in one more, with at most ``window``
    tensors in flight and at most ``max_inflight_bytes`` of pooled input memory held (reads under way
    and merges not yet computed; a larger tensor runs alone). Reads go into ``buffers`` (default: a
    pool whose one chunk of ``max_inflight_bytes`` (or the merge's bytes, when fewer) is faulted in
    once and reused; XLA reads it in place), and so do zeros, stacks and concatenations (built in place,
    see :func:`~jmerge.pipeline.jobs.read_source`; counted in the byte budget); the models of a merge whose models are checkpoint tensors
    of one shape and dtype are read into one ``(T, *shape)`` array (``LeafProgram(...,
    models_stacked=True)``: the task vectors are then computed inside the consumers' fusions instead
    of being materialized). Inputs are given back as soon as their merge is computed, before the
    write. The main pass runs the largest tensors first (results do not depend on the order; the
    statistics passes keep the jobs' order). With
    ``tune_malloc`` (glibc only), malloc keeps freed memory for reuse while the jobs run (XLA's large
    temporaries then reuse pages instead of faulting fresh zeroed ones for every tensor; glibc's
    defaults are set back afterwards): :func:`run_merge` and the CLI turn it on.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for the tensor-by-tensor execution model.
    """
    progress = progress or Progress(sum(j.read_bytes(readers) for j in jobs), disable=True)
    runs = split_rows(jobs, readers, ctx)
    flowing = [streams(j, readers, ctx) for j in runs]  # chunk by chunk from the checkpoints, first
    flows = [j for j, f in zip(runs, flowing) if f]
    main = [j for j, f in zip(runs, flowing) if not f]
    if len(runs) > len(jobs) or flows:  # a few blocks or chunks in flight (and any job that runs whole)
        chunk = max((_chunk_bytes(j, readers) for j in flows), default=0)
        max_inflight_bytes = min(max_inflight_bytes, max(max((j.pool_bytes(readers) for j in main), default=0),
                                                         (min(window, 2) + 1) * PART_BYTES, 3 * chunk))
    if buffers is None:  # one chunk of the budget (or of the whole merge, when smaller) serves every read
        total = sum(j.pool_bytes(readers) for j in jobs)
        buffers = Buffers(chunk_bytes=min(max_inflight_bytes, total))
    bufs = buffers
    stack = contextlib.ExitStack()
    if tune_malloc:
        stack.enter_context(_malloc_keeps_freed_memory(reserve=2**30))
    rpool = cf.ThreadPoolExecutor(read_threads, thread_name_prefix="jmerge-read")
    wpool = cf.ThreadPoolExecutor(1, thread_name_prefix="jmerge-write")
    try:
        stats = _collect_stats(jobs, readers, bufs, ctx, rpool, window, max_inflight_bytes, progress)
        futures: collections.deque = collections.deque()
        compiled: set = set()
        done = [0]

        def finish(job, out, raw):
            # waits for the merge; a view of XLA's output buffer (no copy), or the chunks joined
            out = out.array() if isinstance(out, _Pieces) else np.asarray(out)
            if not any(np.may_share_memory(out, b) for b in raw):
                bufs.put(raw)  # the inputs are free once computed: the next reads reuse them during the write
                raw = ()
            if job.rows is None:
                writer.write(job.out_name, out)
            else:
                writer.write(job.out_name, out, rows=job.rows)
            bufs.put(raw)
            progress.update(job.read_bytes(readers))
            done[0] += 1
            if _fail_after is not None and done[0] >= _fail_after:
                raise RuntimeError(f"injected failure after {done[0]} tensors")

        def consume(job, arrays, raw, stacked):
            kind = ("chunks", chunk_entries(int(np.prod(job.shape)))) if _chunked(job, ctx, stacked) else job.shape
            sig = (kind, str(arrays[0].dtype) if arrays else "", type(job.op).__name__)
            if isinstance(job.op, Merge) and sig not in compiled:
                compiled.add(sig)
                progress.phase("compiling")
            pads: list = []  # the padded last chunk's buffer, given back with the inputs

            def alloc(nbytes):
                pads.append(bufs.get(nbytes))
                return pads[-1]

            out = _apply(job, arrays, ctx, stats, stacked, alloc)
            raw = list(raw) + pads
            progress.phase("merging") if progress._phase != "merging" else None
            futures.append((job.pool_bytes(readers), wpool.submit(finish, job, out, raw)))
            # bound the merges in flight (JAX dispatches asynchronously) by count and by bytes
            while futures and (len(futures) > window or futures[0][1].done()
                               or sum(b for b, _ in futures) > max_inflight_bytes):
                futures.popleft()[1].result()

        # the largest first (each result is the same in any order): the largest two (an embedding and an LM head)
        # then take the same pooled memory one after the other, and the smaller tensors share it afterwards
        for job in sorted(flows, key=lambda j: -j.read_bytes(readers)):
            progress.phase("merging")
            _run_streamed(job, readers, bufs, ctx, rpool, wpool, writer, window, max_inflight_bytes)
            progress.update(job.read_bytes(readers))
        order = sorted(main, key=lambda j: -j.read_bytes(readers))
        _stream(order, readers, bufs, ctx, rpool, window, max_inflight_bytes, consume)
        while futures:
            futures.popleft()[1].result()
    finally:
        for p in (rpool, wpool):
            p.shutdown(wait=True, cancel_futures=True)
        stack.close()


def _yaml_where(plan, key: str) -> str:
    """``file:line:col: key`` of a top-level key of the config (the file alone when not found)."""
    for i, line in enumerate((plan.yaml_text or "").splitlines()):
        if line.startswith(f"{key}:"):
            return f"{plan.source}:{i + 1}:1: {key}"
    return str(plan.source)


def check_compute_dtype(plan, jobs, compute_float32: bool = False) -> None:
    """Refuse float64 arithmetic (``dtype: float64``, or float64 inputs without ``dtype``) unless
    ``compute_float32``: jmerge computes in float32 at most. Needs only the jobs (tensor headers).

    Raises:
      MergeInputError: naming the config's ``dtype`` line (or the float64 tensor) and the fix.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for ``dtype``.
    """
    merges = [j for j in jobs if isinstance(j.op, Merge)]
    if compute_float32 or not merges:
        return
    from ..core import MergeInputError  # noqa: PLC0415
    fix = ("jmerge computes in float32 at most; pass --compute-float32 (float32 arithmetic, the output dtype "
           "unchanged) or set dtype: float32 (out_dtype: float64 keeps float64 files)")
    cd = np_dtype(plan.config.dtype)
    if cd is not None and cd == np.float64:
        raise MergeInputError(f"{_yaml_where(plan, 'dtype')}: float64 means computing in float64 (as mergekit does); {fix}.")
    if cd is None:
        j = next((j for j in merges if np.dtype(j.in_dtype) == np.float64), None)
        if j is not None:
            raise MergeInputError(f"{plan.source}: tensor '{j.out_name}' is stored as float64 and the config sets no "
                                  f"dtype, so the merge would compute in float64; {fix}.")


def _context(plan, jobs, seed: int, mesh: Optional[str], compute_float32: bool = False) -> MergeContext:
    method = plan.build()
    merges = [j for j in jobs if isinstance(j.op, Merge)]
    names = [j.out_name for j in merges]
    hps = {}
    if method is not None and merges:
        from .planners import leaf_hparams  # noqa: PLC0415 - per-job specs of slice merges
        per = leaf_hparams(method, merges, plan.hparams)
        check_ranges(method, names, per)
        hps = dict(zip(names, per))
    views = dict(zip(names, infer_views(names, [j.shape for j in merges])))
    chunked = chunked_form(method) if method is not None and mesh is None else None
    return MergeContext(program=LeafProgram(method) if method is not None else None, hparams=hps, views=views,
                        seed=seed, compute_dtype=np_dtype(plan.config.dtype), put=mesh_sharding(mesh),
                        compute_float32=bool(compute_float32),
                        fast_compile=fast_compile_shapes(merges, chunked=chunked is not None),
                        chunk_program=LeafProgram(chunked) if chunked is not None else None,
                        entrywise=method is not None and entrywise(method))


def _layer_sources(jobs, readers) -> list:
    """Each output layer's source ``(config, layer)``: from every job's first tensor source."""
    from .jobs import Tensor  # noqa: PLC0415
    entries = []
    for j in jobs:
        src = j.op.source if isinstance(j.op, Copy) else next((s for s in j.sources if isinstance(s, Tensor)), None)
        if isinstance(src, Tensor):
            entries.append((j.out_name, src.reader, src.name))
    return layer_sources(entries, [r.config for r in readers])


def _write_aux(plan, writer, jobs, readers, copy_tokenizer: bool, write_card: bool = True) -> None:
    """config.json (layer count and dtype updated), tokenizer and other aux files, chat template, card."""
    from .. import io  # noqa: PLC0415
    from .vocab import set_vocab_size, write_tokenizer_files  # noqa: PLC0415
    src_dir, cfg = readers[0].dir, readers[0].config
    if os.path.isdir(src_dir):
        io.copy_aux_files(src_dir, writer, config=True, tokenizer=False)
    vocab_size = write_tokenizer_files(plan, writer, readers, copy_tokenizer)  # tokenizer files, chat template
    if cfg is not None:  # output dtype (passthrough too); depth and per-layer fields (layer_types) for slices
        out_dt = np_dtype(plan.config.out_dtype or plan.config.dtype)
        cfgj = output_config(cfg, dtype=None if out_dt is None else out_dt.name,
                             layer_sources=_layer_sources(jobs, readers) if plan.slices is not None else None)
        if vocab_size is not None:  # a merged vocabulary (tokenizer_source / tokenizer)
            cfgj = set_vocab_size(cfgj, vocab_size)
        writer.write_text("config.json", json.dumps(cfgj, indent=2))
    if write_card:  # as mergekit's --write-model-card: the card and the config as run
        name = str(plan.mergekit_name or plan.method_name)
        writer.write_text("README.md", io.model_card(plan.yaml_text, name, input_paths(plan)))
        writer.write_text("mergekit_config.yml", plan.yaml_text)


def run_merge(plan: MergePlan, out_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
              quiet: bool = False, copy_tokenizer: bool = True, window: int = 4, read_threads: int = 2,
              max_inflight_bytes: int = 512 * 2**20, mesh: Optional[str] = None, seed: Optional[int] = None,
              allow_crimes: bool = False, write_model_card: bool = True, compute_float32: bool = False,
              tune_malloc: bool = True, _fail_after: Optional[int] = None) -> dict:
    """Merge the checkpoints of ``plan`` into ``out_dir`` (sharded safetensors, written atomically).

    Args:
      plan: a :class:`~jmerge.MergePlan` (see :func:`jmerge.load_config`).
      out_dir: output directory; it appears only when the merge has fully succeeded.
      overwrite: replace an existing ``out_dir``.
      max_shard_bytes: shard size limit of the output files.
      quiet: no progress display.
      copy_tokenizer: copy tokenizer files (from ``tokenizer_source`` or the base) next to the weights.
      window: how many tensors may be in flight (read, merging or being written) at once.
      read_threads: threads reading inputs ahead of the merge.
      max_inflight_bytes: input bytes (all models of a tensor) held at once (read, or read and waiting
        for their merge), on top of ``window``; also the read buffers' memory. A tensor larger than this
        is processed alone.
      mesh: shard each tensor's first axis over this many devices (``"8"`` or ``"data=8"``).
      seed: overrides the config's seed.
      compute_float32: compute in float32 from the inputs as stored, whatever the config's ``dtype``
        (the output dtype is unchanged). By default ``dtype`` is the compute dtype, as in mergekit:
        inputs are cast to it and bf16/fp16 merges give the numbers of a merge computed in that dtype
        (emulated: float32 arithmetic rounded to it after each operation); without ``dtype`` each tensor
        computes in its inputs' dtype. ``dtype: float64`` (or float64 inputs without ``dtype``) is
        refused unless ``compute_float32``.
      allow_crimes: merge models whose ``config.json`` name different architectures (mergekit's
        ``--allow-crimes``); otherwise that is an error before any tensor is read.
      write_model_card: write ``README.md`` (model card) and ``mergekit_config.yml`` (the config as run).
      tune_malloc: while the merge runs, have glibc's malloc keep freed memory (XLA's large temporaries
        reuse pages instead of faulting fresh ones per tensor: ~11x fewer page faults); its defaults are
        set back afterwards (see :func:`run_jobs`). False leaves the process's allocator alone.

    Returns:
      ``{"out_dir", "tensors", "bytes_read", "bytes_written", "seconds"}``.

    Raises:
      MergeInputError: for missing tensors, shape mismatches, bad hyperparameters (before writing).
      CheckpointError: for unreadable inputs or an existing output without ``overwrite``.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    from .. import io  # noqa: PLC0415
    t0 = time.perf_counter()
    paths = input_paths(plan)
    validate_plan(plan, allow_crimes=allow_crimes)  # headers only: every problem before any weight is read
    readers = [open_input(plan, p) for p in paths]
    try:
        readers = model_views(readers, paths, allow_crimes=allow_crimes)  # crimes check; MoE experts fused
        jobs = plan_jobs(plan, readers, paths)
        check_compute_dtype(plan, jobs, compute_float32)
        ctx = _context(plan, jobs, plan.seed if seed is None else seed, mesh, compute_float32)
        total = sum(j.read_bytes(readers) for j in jobs)
        meta = {"merged_with": "jmerge", "merge_method": str(plan.mergekit_name or plan.method_name)}
        writer = io.CheckpointWriter(out_dir, [(j.out_name, j.shape, j.dtype) for j in jobs],
                                     max_shard_bytes=max_shard_bytes, overwrite=overwrite, metadata=meta)
        progress = Progress(total, disable=quiet)
        with writer:
            run_jobs(jobs, readers, writer, ctx, window=window, read_threads=read_threads,
                     max_inflight_bytes=max_inflight_bytes, progress=progress, tune_malloc=tune_malloc,
                     _fail_after=_fail_after)
            progress.close()
            _write_aux(plan, writer, jobs, readers, copy_tokenizer, write_card=write_model_card)
        return {"out_dir": os.path.abspath(out_dir), "tensors": len(jobs), "bytes_read": total,
                "bytes_written": int(writer.total_size), "seconds": time.perf_counter() - t0}
    finally:
        for r in readers:
            r.close()
