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
from typing import Any, Callable, Sequence, Union

import numpy as np

__all__ = ["Tensor", "Zeros", "Stack", "Concat", "Mapped", "Computed", "Source", "Merge", "Copy", "Op", "TensorJob",
           "source_nbytes", "read_source", "Rows"]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Tensor ``name`` of input checkpoint ``reader`` (an index into the executor's readers).

    References: none (infrastructure).
    """

    reader: int
    name: str


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

    References: none (infrastructure).
    """

    out_name: str
    shape: tuple
    dtype: np.dtype
    op: Op
    in_dtype: np.dtype

    @property
    def sources(self) -> tuple:
        """Every source the job reads, in order (base first for merges)."""
        if isinstance(self.op, Merge):
            return (self.op.base,) + tuple(self.op.models)
        return (self.op.source,)

    def read_bytes(self, readers: Sequence[Any]) -> int:
        """Bytes read from the checkpoints for this job."""
        return sum(source_nbytes(s, readers) for s in self.sources)


def source_nbytes(s: Source, readers: Sequence[Any]) -> int:
    """Bytes a source reads from disk (zeros and computed values read nothing).

    References: none (infrastructure).
    """
    if isinstance(s, Tensor):
        return int(readers[s.reader].nbytes(s.name))
    if isinstance(s, (Stack, Concat)):
        return sum(source_nbytes(p, readers) for p in s.parts)
    if isinstance(s, Mapped):
        return source_nbytes(s.source, readers)
    if isinstance(s, Rows):
        return source_nbytes(s.group.sources[s.member], readers)
    return 0


def read_source(s: Source, readers: Sequence[Any], buffers: Any) -> tuple[np.ndarray, list]:
    """The array of a source and the raw buffers it was read into (to give back to ``buffers``).

    ``buffers.get(nbytes)`` returns a reusable uint8 buffer; tensors are read straight into it.

    References: none (infrastructure).
    """
    if isinstance(s, Tensor):
        r = readers[s.reader]
        buf = buffers.get(r.nbytes(s.name))
        return r.get(s.name, out=buf), [buf]
    if isinstance(s, Zeros):
        return np.zeros(s.shape, s.dtype), []
    if isinstance(s, (Stack, Concat)):
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


def job_elements(job: TensorJob) -> int:
    return math.prod(int(d) for d in job.shape)
