"""Tensor jobs: one output tensor each, built from sources and produced by one operation.

Sources say where an input array comes from: a tensor of an input checkpoint (:class:`Tensor`), zeros
(:class:`Zeros`, the base of methods without one), a stack of other sources (:class:`Stack`, e.g.
MoE experts fused into one tensor) or a value computed on the host (:class:`Computed`, e.g. router
weights). Operations say what to do with them: :class:`Merge` runs the method's per-leaf program on
a base and the models; :class:`Copy` passes one source through (scaled, for frankenmerges).
Planners (:mod:`jmerge.pipeline.planners`) turn a merge plan into jobs; one executor runs them all.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the tensor-by-tensor execution model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["Tensor", "Zeros", "Stack", "Concat", "Mapped", "Computed", "Source", "Merge", "Copy", "Op", "TensorJob",
           "source_nbytes", "read_source", "Rows", "row_parts", "read_tensor", "tensor_shape",
           "tensor_nbytes"]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Tensor ``name`` of input checkpoint ``reader`` (an index into the executor's readers); with ``rows``
    ``(start, stop)``, only those rows of its leading axis (the reader's ``get_rows``; see :func:`row_parts`).

    References: none (infrastructure).
    """

    reader: int
    name: str
    rows: Optional[tuple[int, int]] = None


def tensor_shape(s: Tensor, readers: Sequence[Any]) -> tuple:
    """The shape of a tensor source (its rows' when it names some)."""
    shape = tuple(int(d) for d in readers[s.reader].shape(s.name))
    return shape if s.rows is None else (s.rows[1] - s.rows[0],) + shape[1:]


def tensor_nbytes(s: Tensor, readers: Sequence[Any]) -> int:
    """The bytes of a tensor source (its rows' when it names some)."""
    r = readers[s.reader]
    if s.rows is None:
        return int(r.nbytes(s.name))
    return math.prod(tensor_shape(s, readers)) * np.dtype(r.dtype(s.name)).itemsize


def read_tensor(s: Tensor, readers: Sequence[Any], out: Optional[np.ndarray] = None) -> np.ndarray:
    """A tensor source's array (its rows when it names some), read into ``out`` when given."""
    r = readers[s.reader]
    return r.get(s.name, out=out) if s.rows is None else r.get_rows(s.name, s.rows[0], s.rows[1], out=out)


@dataclasses.dataclass(frozen=True)
class Zeros:
    """An all-zero array (the base of methods that merge the models directly).

    References: none (infrastructure).
    """

    shape: tuple
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Stack:
    """Sources stacked along a new leading axis.

    References: none (infrastructure).
    """

    parts: tuple


@dataclasses.dataclass(frozen=True)
class Concat:
    """Sources concatenated along an existing axis (e.g. an expert's gate and up rows in one matrix).

    References: none (infrastructure).
    """

    parts: tuple
    axis: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Mapped:
    """Another source passed through a host function ``fn(array) -> array`` of the same shape when read
    (e.g. an MoE expert's noise or residual scale).

    References: none (infrastructure).
    """

    source: Any
    fn: Callable[[np.ndarray], np.ndarray]
    description: str = "mapped"


@dataclasses.dataclass(frozen=True)
class Computed:
    """A value computed on the host when the job runs: ``fn() -> np.ndarray``.

    References: none (infrastructure).
    """

    fn: Callable[[], np.ndarray]
    shape: tuple
    dtype: Any
    description: str = "computed"


@dataclasses.dataclass(frozen=True, eq=False)
class Rows:
    """One member of a row group: inputs whose rows along axis 0 are re-indexed together.

    ``group.sources[member]`` is this member's input; ``group.take(member, read)`` returns its output
    array (``shape``, ``dtype``) and the raw buffers read. Output rows come from the input's own rows by
    an index map, and rows it lacks from a fill rule shared by the group (e.g. another member's row or
    the members' mean), so the group computes every member at once when the first is taken (``read``
    reads one source) and keeps the others until they are taken. Embeddings and LM heads re-indexed
    into a merged vocabulary are row groups (:mod:`jmerge.pipeline.vocab`).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for re-indexed vocabularies.
    """

    group: Any
    member: int
    shape: tuple
    dtype: Any


Source = Union[Tensor, Zeros, Stack, Concat, Mapped, Computed, Rows]


@dataclasses.dataclass(frozen=True)
class Merge:
    """Merge the models into the base with the plan's method (its per-leaf program).

    References: none (infrastructure).
    """

    base: Source
    models: tuple


@dataclasses.dataclass(frozen=True)
class Copy:
    """Pass one source through, multiplied by ``scale`` when it is not 1.

    References: none (infrastructure).
    """

    source: Source
    scale: float = 1.0


Op = Union[Merge, Copy]


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, shape, dtype, and the operation producing it.

    Attributes:
      out_name: tensor name in the output checkpoint.
      shape: output shape.
      dtype: output dtype (NumPy).
      op: :class:`Merge` or :class:`Copy`.
      in_dtype: dtype of the (first) input as stored, for summaries and byte budgets.
      rows: ``(start, stop)`` when the job computes only those rows of the tensor (its leading axis; see
        :func:`row_parts`): ``shape`` is then the rows' shape and ``whole`` the tensor's.
      whole: the whole tensor's shape, for a job of some rows; else None.

    References: none (infrastructure).
    """

    out_name: str
    shape: tuple
    dtype: np.dtype
    op: Op
    in_dtype: np.dtype
    rows: Optional[tuple[int, int]] = None
    whole: Optional[tuple] = None

    @property
    def tensor_shape(self) -> tuple:
        """The output tensor's whole shape (``shape`` unless the job computes some of its rows)."""
        return tuple(self.whole) if self.whole is not None else tuple(self.shape)

    @property
    def sources(self) -> tuple:
        """Every source the job reads, in order (base first for merges)."""
        if isinstance(self.op, Merge):
            return (self.op.base,) + tuple(self.op.models)
        return (self.op.source,)

    def read_bytes(self, readers: Sequence[Any]) -> int:
        """Bytes read from the checkpoints for this job."""
        return sum(source_nbytes(s, readers) for s in self.sources)

    def pool_bytes(self, readers: Sequence[Any]) -> int:
        """Bytes of pooled buffers the job's inputs take (reads, zeros, stacks; see :func:`read_source`)."""
        return sum(_pool_nbytes(s, readers) for s in self.sources)


def row_parts(job: TensorJob, readers: Sequence[Any], part_bytes: int, *, align: int = 64) -> list[TensorJob]:
    """``job`` as jobs of consecutive rows (its leading axis), each reading at most about ``part_bytes`` of
    inputs, or ``[job]`` when it is smaller or cannot be split.

    A job splits when each of its sources is a checkpoint tensor of the output's shape whose reader reads
    rows (``rows_readable``) or zeros of that shape; the caller decides that its operation computes every
    entry from the same entries of its inputs alone (``jmerge.core.chunks.entrywise``), so that the parts
    give the whole tensor's bytes. Parts hold a multiple of ``align`` entries (all but the last, which ends
    where the tensor ends), so an entry falls in the same place of a vector loop as in the whole tensor; they
    are of one size where up to twice the blocks needed divide the rows evenly (one program to compile).

    References: none (infrastructure).
    """
    shape = tuple(int(d) for d in job.shape)
    if job.rows is not None or not shape or shape[0] < 2 or part_bytes <= 0:
        return [job]
    for src in job.sources:
        if isinstance(src, Tensor):
            r = readers[src.reader]
            if src.rows is not None or not getattr(r, "rows_readable", lambda n: False)(src.name) \
                    or tuple(int(d) for d in r.shape(src.name)) != shape:
                return [job]
        elif not (isinstance(src, Zeros) and tuple(src.shape) == shape):
            return [job]
    total = job.pool_bytes(readers)
    if total <= part_bytes:
        return [job]
    R, per_row = shape[0], math.prod(shape[1:])
    step = align // math.gcd(per_row, align) if per_row else 1  # rows whose entries are a multiple of align
    n = -(-total // part_bytes)
    # equal blocks where up to twice as many divide the rows evenly (one compiled program per tensor shape)
    even = [R // k for k in range(n, 2 * n + 1) if R % k == 0 and (R // k) % step == 0]
    rows = even[0] if even else -(-(-(-R // n)) // step) * step
    if rows >= R:
        return [job]

    def part(src, r0: int, r1: int):
        if isinstance(src, Tensor):
            return Tensor(src.reader, src.name, (r0, r1))
        return Zeros((r1 - r0,) + shape[1:], src.dtype)

    jobs = []
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        if isinstance(job.op, Merge):
            op: Op = Merge(part(job.op.base, r0, r1), tuple(part(m, r0, r1) for m in job.op.models))
        else:
            op = Copy(part(job.op.source, r0, r1), job.op.scale)
        jobs.append(dataclasses.replace(job, shape=(r1 - r0,) + shape[1:], op=op, rows=(r0, r1), whole=shape))
    return jobs


def source_nbytes(s: Source, readers: Sequence[Any]) -> int:
    """Bytes a source reads from disk (zeros and computed values read nothing).

    References: none (infrastructure).
    """
    if isinstance(s, Tensor):
        return tensor_nbytes(s, readers)
    if isinstance(s, (Stack, Concat)):
        return sum(source_nbytes(p, readers) for p in s.parts)
    if isinstance(s, Mapped):
        return source_nbytes(s.source, readers)
    if isinstance(s, Rows):
        return source_nbytes(s.group.sources[s.member], readers)
    return 0


def _pool_nbytes(s: Source, readers: Sequence[Any]) -> int:
    """Bytes of pooled buffers a source's array takes when read (what :func:`read_source` holds)."""
    if isinstance(s, (Zeros, Stack, Concat)):
        spec = _spec(s, readers)
        if spec is not None:
            return math.prod(spec[0]) * spec[1].itemsize
    if isinstance(s, Computed):
        return 0
    return source_nbytes(s, readers)


def read_source(s: Source, readers: Sequence[Any], buffers: Any) -> tuple[np.ndarray, list]:
    """The array of a source and the raw buffers it was read into (to give back to ``buffers``).

    ``buffers.get(nbytes)`` returns a reusable uint8 buffer; tensors are read straight into it. Zeros,
    stacks and concatenations are also built in one such buffer (their parts read or written straight
    into their places in it; a mapped part's result written over its input), so only a mapped or computed
    source's own function allocates fresh memory per tensor. Temporary buffers
    (parts that cannot be read in place) go back with ``buffers.put`` as soon as they are copied.

    References: none (infrastructure).
    """
    if isinstance(s, Tensor):
        buf = buffers.get(tensor_nbytes(s, readers))
        return read_tensor(s, readers, out=buf), [buf]
    if isinstance(s, Zeros):
        out, buf = _pooled(buffers, tuple(s.shape), np.dtype(s.dtype))
        out.fill(0)
        return out, [buf]
    if isinstance(s, (Stack, Concat)):
        spec = _spec(s, readers)
        if spec is not None:
            out, buf = _pooled(buffers, *spec)
            try:
                _fill(s, out, readers, buffers)
                return out, [buf]
            except _DtypeChanged:  # a mapped part changed its dtype: promoted as np.stack would (fresh arrays)
                _give(buffers, [buf])
        parts, raw = [], []
        for p in s.parts:
            a, r = read_source(p, readers, buffers)
            parts.append(a)
            raw += r
        return (np.stack(parts) if isinstance(s, Stack) else np.concatenate(parts, axis=s.axis)), raw
    if isinstance(s, Mapped):
        a, raw = read_source(s.source, readers, buffers)
        out = np.asarray(s.fn(a))
        if out.shape != a.shape:
            raise ValueError(f"{s.description}: mapped shape {out.shape}, read {a.shape}")
        return out, raw
    if isinstance(s, Computed):
        a = np.asarray(s.fn())
        if tuple(a.shape) != tuple(s.shape):
            raise ValueError(f"{s.description}: computed shape {a.shape}, planned {s.shape}")
        return a.astype(s.dtype, copy=False), []
    if isinstance(s, Rows):
        return s.group.take(s.member, lambda src: read_source(src, readers, buffers))
    raise TypeError(f"unknown source {s!r}")


class _DtypeChanged(Exception):
    """A mapped source returned another dtype than its input's (its place in a stack was planned with it)."""


def _give(buffers: Any, bufs: list) -> None:
    put = getattr(buffers, "put", None)
    if put is not None and bufs:
        put(bufs)


def _pooled(buffers: Any, shape: tuple, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """An array of ``shape`` and ``dtype`` on a buffer from ``buffers`` (contents undefined), and the buffer."""
    buf = buffers.get(math.prod(shape) * dtype.itemsize)
    return buf.view(dtype).reshape(shape), buf


def _spec(s: Source, readers: Sequence[Any]) -> Optional[tuple[tuple, np.dtype]]:
    """``(shape, dtype)`` of a source's array, known before reading (None: not known, or parts that do not fit;
    a mapped source is planned with its input's dtype and checked when it runs)."""
    if isinstance(s, Tensor):
        return tensor_shape(s, readers), np.dtype(readers[s.reader].dtype(s.name))
    if isinstance(s, (Zeros, Computed, Rows)):
        return tuple(int(d) for d in s.shape), np.dtype(s.dtype)
    if isinstance(s, Mapped):
        return _spec(s.source, readers)
    if isinstance(s, (Stack, Concat)):
        specs = [_spec(p, readers) for p in s.parts]
        if not specs or any(x is None for x in specs):
            return None
        shapes = [x[0] for x in specs]
        dtype = np.result_type(*[x[1] for x in specs])
        if isinstance(s, Stack):
            return ((len(shapes),) + shapes[0], dtype) if all(x == shapes[0] for x in shapes) else None
        nd = len(shapes[0])
        if nd == 0 or not -nd <= s.axis < nd:
            return None
        ax = s.axis % nd
        if any(len(x) != nd or x[:ax] + x[ax + 1:] != shapes[0][:ax] + shapes[0][ax + 1:] for x in shapes):
            return None
        return shapes[0][:ax] + (sum(x[ax] for x in shapes),) + shapes[0][ax + 1:], dtype
    return None


def _fill(s: Source, out: np.ndarray, readers: Sequence[Any], buffers: Any) -> None:
    """Write source ``s`` into ``out`` (its planned shape; the dtype of its stack or concatenation, to which
    each part is cast as NumPy's ``stack``/``concatenate`` would): tensors are read straight into place
    when ``out`` is contiguous and of their dtype, otherwise through a temporary pooled buffer."""
    if isinstance(s, Tensor):
        r = readers[s.reader]
        if out.flags.c_contiguous and out.dtype == np.dtype(r.dtype(s.name)) and out.nbytes == tensor_nbytes(s, readers):
            a = read_tensor(s, readers, out=out)
            if not np.may_share_memory(a, out):  # a reader that returned its own array
                out[...] = a.reshape(out.shape)
            return
    elif isinstance(s, Zeros):
        out.fill(0)
        return
    elif isinstance(s, Computed):
        a = np.asarray(s.fn())
        if tuple(a.shape) != tuple(s.shape):
            raise ValueError(f"{s.description}: computed shape {a.shape}, planned {s.shape}")
        out[...] = a.astype(s.dtype, copy=False)
        return
    elif isinstance(s, Mapped):
        shape, dt = _spec(s.source, readers)
        if out.dtype == dt:  # the input read in place, then the result written over it
            tmp, raw = out, []
        else:
            tmp, buf = _pooled(buffers, shape, dt)
            raw = [buf]
        try:
            _fill(s.source, tmp, readers, buffers)
            y = np.asarray(s.fn(tmp))
            if y.shape != tmp.shape:
                raise ValueError(f"{s.description}: mapped shape {y.shape}, read {tmp.shape}")
            if y.dtype != dt:
                raise _DtypeChanged(s.description)
            if y is not out:
                out[...] = y
        finally:
            _give(buffers, raw)
        return
    elif isinstance(s, (Stack, Concat)):
        if isinstance(s, Stack):
            for t, p in enumerate(s.parts):
                _fill(p, out[t], readers, buffers)
            return
        ax, o = s.axis % out.ndim, 0
        for p in s.parts:
            n = _spec(p, readers)[0][ax]
            _fill(p, out[(slice(None),) * ax + (slice(o, o + n),)], readers, buffers)
            o += n
        return
    a, raw = read_source(s, readers, buffers)  # anything else (rows; a tensor of another dtype or place)
    try:
        out[...] = a
    finally:
        _give(buffers, raw)


def job_elements(job: TensorJob) -> int:
    return math.prod(int(d) for d in job.shape)
