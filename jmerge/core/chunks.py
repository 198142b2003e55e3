"""A tensor merged as fixed-size chunks of its flattened entries: one compiled program for every shape.

Out of core, a merge compiles one program per tensor shape, and for the TIES family that compile (the
counting search of the exact top-k) costs more CPU than the merge itself on a first run. A method whose
steps are all elementwise except a per-tensor top-k trim can instead run on the tensor's flat entries cut
into chunks of one fixed size (the last one zero-padded): the trim becomes the whole-model top-k over the
chunks (:func:`~jmerge.core.select.global_topk_phases`, whose ties fall in leaf order, then flat index:
the tensor's own flat order) with the per-tensor count of kept entries
(:func:`~jmerge.core.select.tensor_chunks`). Every tensor then runs the same few programs, compiled once
per dtype, and the result is bit-identical to the per-tensor program: the same entries are kept and every
other step computes the same operations entry by entry.

A step says how it runs on chunks through an attribute of its update, as ``fuse_chain`` (the core imports
no method): ``update.chunk_form(step) -> Step | None`` returns the step to run on chunks (the step itself
when it is elementwise), or None when it cannot. DARE with the L1 rescale runs on chunks too: its norms are a
statistic over the chunks, and its draws take each chunk's flat offset (the chunked step's update is marked
``chunk_offset``; its programs then compile per tensor size, the offset's ``whole`` being static).

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for the tensor-by-tensor execution.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from .driver import LeafProgram
from .select import tensor_chunks
from .transform import Transform

__all__ = ["CHUNK_ENTRIES", "SMALL_CHUNK_ENTRIES", "chunk_size", "chunked_form", "merge_chunked",
           "merge_chunked_stream", "entrywise"]

CHUNK_ENTRIES = 1 << 22  # entries per chunk (4 Mi: 8 MiB per bfloat16 model)
SMALL_CHUNK_ENTRIES = 1 << 19  # entries per chunk of tensors smaller than CHUNK_ENTRIES


def chunk_size(n: int, large: int = CHUNK_ENTRIES, small: int = SMALL_CHUNK_ENTRIES) -> int:
    """Entries per chunk of a tensor of ``n`` entries, or 0 when it merges whole: ``large`` from that size on,
    ``small`` from that size up to ``large``. The out-of-core executor's chunks
    (``jmerge.pipeline.executor.chunk_entries``) and the blocks of DARE's L1 norms
    (``jmerge.methods.sparsify.l1_block``) both take it, so that each chunk of a chunked merge is one block.

    References: none (infrastructure).
    """
    n = int(n)
    if n >= large:
        return large
    return small if n >= small else 0


def _offsets(program: LeafProgram, chunk: int, n: int) -> Callable[[int], dict]:
    """Chunk ``i``'s ``offset`` keyword for the program's calls when a step draws random numbers keyed by flat
    index (its update's ``chunk_offset`` attribute: the chunk then draws the whole tensor's bits at its entries,
    ``MergeState.offset``), else none (one compiled program for every tensor size)."""
    if any(getattr(s.update, "chunk_offset", False) for _, s in program.method.steps):
        return lambda i: {"offset": (i * chunk, n)}
    return lambda i: {}


def chunked_form(method: Transform) -> Transform | None:
    """``method`` as it runs on the chunks of one tensor (see the module docstring), or None when a step
    has no chunked form, or when nothing would change (no per-tensor statistic: chunks would only add work).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    if method.stats or method.uses_view:  # whole-model statistics, or matrix views: not per chunk
        return None
    steps, changed = [], False
    for name, step in method.steps:
        form = getattr(step.update, "chunk_form", None)
        new = form(step) if form is not None else None
        if new is None:
            return None
        changed = changed or new is not step
        steps.append((name, new))
    return dataclasses.replace(method, steps=tuple(steps)) if changed else None


def entrywise(method: Transform) -> bool:
    """Whether every entry of ``method``'s merged leaf is computed from the same entry of its inputs alone, by
    the same operations whatever the leaf's shape (each step's update says so with an ``entrywise``
    attribute, True or a function of the step; no whole-model statistics or matrix views; random draws only
    where they are keyed by the entry's flat index plus the block's offset, ``MergeState.offset``): any rows of
    a tensor then merge to those rows of the whole tensor's result, so the out-of-core executor may read, merge
    and write a large tensor a block of rows at a time (:func:`jmerge.pipeline.jobs.row_parts`). Task
    arithmetic, linear, their scalings, DARE (but not its L1 rescale) and DARE-TIES are.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); Yu et al., "Language Models
    are Super Mario" (ICML 2024) (DARE).
    """
    def marked(step) -> bool:
        mark = getattr(step.update, "entrywise", False)
        return bool(mark(step) if callable(mark) else mark)

    return (bool(method.steps) and not method.stats and not method.uses_view
            and all(marked(step) for _, step in method.steps))


def merge_chunked(program: LeafProgram, base: np.ndarray, models: np.ndarray, hp: Mapping[str, Any], key: Any, *,
                  out_dtype: Any = None, compute_dtype: Any = None, fast_compile: bool = False,
                  chunk: int = CHUNK_ENTRIES,
                  alloc: Callable[[int], np.ndarray] | None = None) -> tuple[list, int]:
    """Merge one tensor chunk by chunk with ``program`` (a :func:`chunked_form` method).

    Args:
      program: the :class:`LeafProgram` of a :func:`chunked_form` method.
      base: the base tensor (NumPy, C-contiguous).
      models: the fine-tuned tensors stacked ``(T, *base.shape)`` (NumPy, C-contiguous).
      hp: the tensor's resolved hyperparameters (as for the per-tensor program).
      key: the tensor's PRNG key (every chunk gets it; a step that draws random numbers gets each chunk's flat
        offset, so the chunks draw the whole tensor's bits).
      out_dtype, compute_dtype, fast_compile: as for :class:`LeafProgram` calls.
      chunk: entries per chunk.
      alloc: ``alloc(nbytes)`` returns a writeable uint8 buffer for the zero-padded last chunk (default
        NumPy); it must stay untouched until the returned pieces are computed.

    Returns:
      ``(pieces, last)``: the merged chunks in flat order (JAX arrays of ``chunk`` entries, computed
      asynchronously) and how many entries of the last one belong to the tensor.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    n = int(base.size)
    T = int(models.shape[0])
    b = base.reshape(-1)
    m = models.reshape(T, -1)
    count = -(-n // chunk)
    leaves = []
    for i in range(count):
        lo = i * chunk
        if lo + chunk <= n:
            leaves.append((b[lo:lo + chunk], tuple(m[t, lo:lo + chunk] for t in range(T))))
            continue
        rest = n - lo
        itemsize = max(b.dtype.itemsize, m.dtype.itemsize)
        raw = (alloc or (lambda nb: np.empty(nb, np.uint8)))((T + 1) * chunk * itemsize)
        pb = raw[:chunk * b.dtype.itemsize].view(b.dtype)
        pm = raw[chunk * itemsize:chunk * itemsize + T * chunk * m.dtype.itemsize].view(m.dtype).reshape(T, chunk)
        pb[:rest] = b[lo:]
        pb[rest:] = 0
        pm[:, :rest] = m[:, lo:]
        pm[:, rest:] = 0
        leaves.append((pb, tuple(pm[t] for t in range(T))))
    leaves = [jax.device_put(x) for x in leaves]  # once: every phase and the merge read the same arrays
    opts = {"compute_dtype": compute_dtype, "fast_compile": fast_compile}
    offs = _offsets(program, chunk, n)
    stats = _chunk_stats(program, lambda i: (leaves[i], None), count, n, hp, key, opts, offs)
    hp32 = {k: np.asarray(v, np.float32) for k, v in hp.items()}
    pieces = [program(bc, mc, hp32, key, st, None, out_dtype=out_dtype, **opts, **offs(i))
              for i, ((bc, mc), st) in enumerate(zip(leaves, stats))]
    return pieces, n - (count - 1) * chunk


def _chunk_stats(program: LeafProgram, load: Callable[[int], tuple], count: int, n: int, hp: Mapping[str, Any],
                 key: Any, opts: dict, offs: Callable[[int], dict]) -> list[dict]:
    """Every phase of ``program`` over the ``count`` chunks of one tensor of ``n`` entries; returns each chunk's
    statistics. ``load(i)`` gives chunk ``i`` as ``((base, models), release)``: ``release()`` (when not None) is
    called once the chunk's values are on the host."""
    hps = [hp] * count
    stats: list[dict] = [{} for _ in range(count)]
    with tensor_chunks(n):
        for pi, (_, sname, phase) in enumerate(program.phases):
            vals = program.skip(pi, stats, hps)
            if vals is None:
                got: list = []
                held: list = []  # (chunk, release) of chunks whose values are not on the host yet

                def settle(j, rel):  # chunk j's values on the host, then its memory freed
                    got[j] = jax.tree.map(np.asarray, got[j])
                    rel()

                for i in range(count):
                    (bc, mc), release = load(i)
                    got.append(program.collect(pi, bc, mc, hp, key, stats[i], None, **opts, **offs(i)))
                    if release is not None:
                        held.append((i, release))
                    while len(held) > 1:  # a chunk computes while the previous one's values come back
                        settle(*held.pop(0))
                for j, rel in held:
                    settle(j, rel)
                vals = program.finalize(pi, [jax.tree.map(np.asarray, g) for g in got], hps)
            for st, v in zip(stats, vals):
                st.setdefault(sname, {})[phase.name] = v
    return stats


def merge_chunked_stream(program: LeafProgram, load: Callable[[int], tuple], n: int, hp: Mapping[str, Any], key: Any,
                         emit: Callable[[int, Any, Callable[[], None] | None], None], *, out_dtype: Any = None,
                         compute_dtype: Any = None, fast_compile: bool = False, chunk: int = CHUNK_ENTRIES) -> int:
    """Merge one tensor chunk by chunk as :func:`merge_chunked` does, reading each chunk again for every pass
    instead of holding the whole tensor: its statistics passes and the merge each load the chunks in turn, so
    memory holds a few chunks (a large embedding's four inputs: a few times 32 MiB instead of 500 MiB). The
    chunks, programs and statistics are :func:`merge_chunked`'s, so every piece has the same bits.

    Args:
      program: the :class:`LeafProgram` of a :func:`chunked_form` method.
      load: ``load(i) -> ((base, models), release)``: chunk ``i`` (entries ``i * chunk`` on, the last zero-padded
        to ``chunk``) of the base and of the stacked models ``(T, chunk)``, and a callable (or None) that frees
        their memory; it is called once the chunk is no longer needed (for the merge's pieces: by ``emit``'s
        caller, see below).
      n: entries of the tensor.
      hp, key: as for :func:`merge_chunked`.
      emit: ``emit(i, piece, release)`` takes chunk ``i``'s merged entries (a JAX array of ``chunk`` entries,
        computed asynchronously) and the chunk's ``release``, to call once the piece is computed.
      out_dtype, compute_dtype, fast_compile, chunk: as for :func:`merge_chunked`.

    Returns:
      How many entries of the last piece belong to the tensor.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    count = -(-n // chunk)
    opts = {"compute_dtype": compute_dtype, "fast_compile": fast_compile}
    offs = _offsets(program, chunk, n)
    stats = _chunk_stats(program, load, count, n, hp, key, opts, offs)
    hp32 = {k: np.asarray(v, np.float32) for k, v in hp.items()}
    for i in range(count):
        (bc, mc), release = load(i)
        emit(i, program(bc, mc, hp32, key, stats[i], None, out_dtype=out_dtype, **opts, **offs(i)), release)
    return n - (count - 1) * chunk
