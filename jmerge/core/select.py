"""Exact top-k selection by magnitude without a full sort.

Interface contract (other modules rely on it):

* ``topk_mask(x, k)``: bool mask of ``x``'s shape with exactly ``k`` True entries at the ``k``
  largest values of ``x`` (flattened); ties broken by the lowest flat index. ``k`` may be a traced
  integer scalar; ``k <= 0`` gives all False, ``k >= x.size`` all True.
* ``topk_mask_rows(x, k, magnitude=False)``: the same for each row ``x[t]`` of a ``(T, ...)`` array,
  with ``k`` of shape ``(T,)`` (TIES trims each task vector separately); ``magnitude=True`` ranks
  ``|x|`` without materializing it.
* ``density_to_k(density, n)``: ``round(density * n)`` as int32 (traced-friendly).
* ``global_topk_phases(name, density_key)``: StatsPhases computing, over all leaves, the per-task
  global top-k of ``|state.tau|`` (k = density * total size of each task vector). After them,
  ``global_topk_mask(state, name)`` returns this leaf's ``(T, *shape)`` bool mask.

How it works. Values are ranked by an int32 order key of their float32 bit pattern (``a < b`` iff
``key(a) < key(b)``; ``-0.0 == 0.0``; NaN counts as +inf), so every step is an exact integer
comparison or count and the result does not depend on how ``x`` is sharded. Per row we look for the
k-th largest key ``v`` with ``G(t) = #{key >= t}``:

1. a sample of about 4096 keys (at most an eighth of the row; strided along each axis) is sorted
   (int32 sorts are cheap at that size) and five of its order statistics around the expected rank of
   ``v`` are the first thresholds;
2. each pass counts ``G`` at five thresholds at once: the five comparisons of an element are packed
   into 6-bit fields of one int32, summed over blocks of 32 (so no field overflows), and the block
   sums are unpacked two fields at a time. The same variadic reduction returns the largest key below
   the bracket's upper end and the smallest above its lower end (the "snaps"; not in the whole-model search's
   first phase, whose bracket starts at key 0: there they are the extreme keys). The bracket
   ``lo <= v < hi`` (``G(lo) >= k > G(hi)``) shrinks to the thresholds around ``k``; the next
   thresholds are interpolated in key space from the counts (spread by the expected error), or split
   the bracket evenly when the last pass did not halve the number of entries inside; the snaps of
   the last pass replace the outer two. When the sampled keys inside the bracket repeat (heavy ties:
   bfloat16 task vectors take a few thousand distinct values), four of the five are sampled keys
   instead: the one at the k-th key's estimated rank among them and its neighbour, each counted at
   ``x`` and ``x + 1`` (about half the passes of interpolation alone there). Every threshold lies
   strictly inside the bracket, so every pass moves an end of it and the loop ends.
3. It stops when some threshold has ``G(t) == k`` (the mask is ``key >= t``: no ties to break) or
   the bracket holds one key ``v`` (then ``q = k - #(key > v)`` of the entries equal to ``v`` are kept,
   the first ``q`` in flat order: block counts of equal keys locate the cut position).

4. Where the leaves are not sharded (the caller raised the whole-sort limit, as ``jmerge.merge`` and the
   out-of-core executor do), each pass also counts, per block of 32, the entries of the span of its thresholds
   (of the whole bracket once that holds at most ``C`` = 1024 entries: its ends are then counted in place of
   the outer two thresholds), as the difference of two fields of the packed block sums. When the new
   bracket lies in that span and at most ``C`` blocks hold its entries, those blocks are gathered (prefix sum of
   the block flags, searched), the bracket's entries among them compacted and sorted: the k-th key and the tie
   cut (from the gathered positions, in flat order) end the search in that pass, with no tie-cut pass after it.
   Smooth float32 rows of ~3M entries end in 2-3 passes where counting alone took 4-5 and a tie-cut pass;
   the masks are the same, bit for bit. Every search of a pass counts in one reduction (Breadcrumbs' two cuts
   of a row read it once), each with its own thresholds, snaps and flags.

On smooth data counting alone takes 4-5 passes, each about the cost of reading the data once; heavy ties
(bfloat16 task vectors, exact zeros) 1-5 (with thresholds from interpolation alone: up to about 9).
XLA:CPU materializes the operand of a long reduction (its tree-reduction rewrite), so every reduction
here runs over blocks of 32 first, and the key transform carries a loop-variant operand so that it is not hoisted out of the loop and
materialized as a full-size int32 copy. The result is a per-row threshold ``(v, cut)`` (keep
``key > v``, and ``key == v`` before flat position ``cut``), so the mask is elementwise and XLA fuses
it into its consumers: TIES reads the task vectors once more in its final pass instead of writing
and reading a masked copy.

Sharded leaves. Every pass works on the rows in the leaf's own shape, never flattened (flattening a
leaf sharded on a later axis, e.g. a Dense kernel ``P(None, 'model')``, would all-gather it): blocks
split only the last axis (width 32, or the largest divisor of it in [8, 32]), counts and snaps reduce
over all axes, so each device counts its shard and only (R, 5) counts and two snaps per row are summed
across devices; the sample is strided per axis (only the sample is gathered); the tie cut is found from
per-block bit masks of the tied entries, one block-grid axis at a time. Counts are exact integers, so
the mask is bit-identical on one device and on any mesh. Rows of at most 2048 entries are sorted whole
(gathered when sharded: at most 8 KB per row). Callers whose leaves are never sharded raise that limit with
:func:`whole_sort_limit` (a sweep does, to 32768: a sort is a small program that vmaps well, where the
counting search is a ``while_loop`` that a vmap runs until the slowest setting converges). Both paths give
the same exact result (same threshold, same tie cut), so the limit changes only cost, never a mask.

The global (whole-model) selection runs the same counting search across leaves, one phase per pass:
a strided sample of every leaf (weighted by the leaf's sampling rate) gives the first ten thresholds;
each counting phase counts, per leaf and task, ``#{key >= t}`` at ten thresholds (two packed int32
words) and, from the second phase on, the two snaps in one variadic reduction, rebuilt from the inputs inside a conditional that
skips it once every task is done; the host sums the counts and narrows the bracket in int64, keeping
the counts per leaf, so tied entries at the k-th key are split across leaves in leaf order (ties are
broken by leaf order, then by flat index) without another pass. Once every leaf holds at most
1/512 of its entries in every open bracket (after the first phase, on a model of many leaves), the next
phase reads the bracket out instead of counting: one reduction counts the bracket's entries per block of 32
(every task's in one reduction, a subtraction and an unsigned compare per entry),
and the first blocks that hold any (a prefix sum of the block flags, searched) are gathered and returned; the
host takes the k-th key from their keys and ends the search (two phases where four were needed). Where the
statistics stay on the device (``jmerge.merge``), the first phase also marks per block which intervals between its
thresholds hold entries (from the block sums it adds anyway); a read-out right after it takes its blocks from the
marks of the bracket's intervals and reads only those blocks, not the whole model. Only
calls whose leaves are not sharded read out (the caller raised the whole-sort limit; see
:func:`whole_sort_limit`). Where the sampled keys inside a
task's bracket repeat, eight of the ten thresholds are the four distinct sampled keys nearest the
k-th key's estimated (weighted) rank, each at ``x`` and ``x + 1``. A search still open after the
counting phases (rare since then) ends with radix histograms (65536 bins of the high, then of the low 16
bits of ``|tau|``, a scatter-add ~6x the cost of a counting pass on XLA:CPU). Only counts, snaps,
samples, histograms and read-out brackets leave the device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Shaped

from .errors import MergeInputError
from .state import MergeState
from .transform import StatsPhase
from .xla import HONEST_COST_ENTRIES, HONEST_COST_MIN, honest_cost, loop_variant, materialized, split_blocks

__all__ = ["topk_mask", "topk_mask_rows", "topk_keep_rows", "density_to_k", "global_topk_phases", "global_topk_mask",
           "whole_sort_limit", "sort_limit_in_effect", "topk_thresholds_rows", "threshold_mask",
           "global_topk_thresholds", "global_topk_keep", "tensor_chunks", "tensor_topk_count", "threshold_values"]

_I32_MIN = np.int32(np.iinfo(np.int32).min)
_I32_MAX = np.int32(np.iinfo(np.int32).max)
_ABS = np.int32(0x7FFFFFFF)
_INF_KEY = np.int32(0x7F800000)  # key of +inf; NaN gets it too (NaN counts as +inf)
_TOP = np.int32(0x7F800001)  # above every key: G(_TOP) == 0
_NEG_INF_KEY = np.int32(np.int32(np.float32(-np.inf).view(np.int32)) ^ _ABS)  # the lowest key

_W = 32  # block of the packed count: fields never exceed 32
_BITS = 6  # bits per packed field
_J = 5  # thresholds per pass (5 fields x 6 bits in an int32)
_SAMPLE = 4096  # target sample size for the first thresholds
_SORT_MAX = 2048  # rows up to this length are simply sorted (default; see whole_sort_limit)
_SORT_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("jmerge_whole_sort_limit", default=None)
_TENSOR_N: contextvars.ContextVar[int | None] = contextvars.ContextVar("jmerge_tensor_chunks", default=None)
_SHARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("jmerge_sharded_leaf", default=False)
_CS0 = (-3.0, -1.2, 0.0, 1.2, 3.0)  # first thresholds, in sample standard deviations
_CS = (-2.5, -0.8, 0.0, 0.8, 2.5)  # later thresholds, in expected errors
_SLOPE_NOISE = 3.0  # a bracket's density slope is used beyond this many of its counting errors (_slope)
_SLOPE_MIN = 512  # ... and only for a bracket and neighbours holding at least this many entries each (1024 left a
# Breadcrumbs top-1% bracket of 2708 entries with a 918-entry neighbour uniform: 3 passes more on a (1024, 1024) leaf)


def density_to_k(density: float | Float[Array, "*T"], n: int) -> Int[Array, "*T"]:
    """Number of entries kept at ``density``: ``round(density * n)`` as int32 (traced-friendly).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    return jnp.round(jnp.asarray(density, jnp.float32) * n).astype(jnp.int32)


@contextlib.contextmanager
def whole_sort_limit(n: int) -> Iterator[None]:
    """Within the block, rows of at most ``n`` entries are top-k selected by a whole sort (default 2048).

    Read when a merge is traced. Both paths are exact and give bit-identical masks (same k-th key, ties
    kept in flat order), so this only trades cost: a sort is a small program that compiles fast and vmaps
    well; the counting search reads the data ~5 times without a sort, and never gathers a sharded row. Raise
    it only where leaves are not sharded along their rows (a sorted sharded row is all-gathered); the
    sweep (:mod:`jmerge.sweep.execute`), whose leaves are replicated, uses 32768. A limit above the default
    also lets the whole-model search read out its last bracket (:func:`global_topk_phases`: a gather).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023)
    (the trim step this selection serves).
    """
    if int(n) < 0:
        raise MergeInputError(f"whole_sort_limit({n}): give a non-negative number of entries.")
    token = _SORT_LIMIT.set(int(n))
    try:
        yield
    finally:
        _SORT_LIMIT.reset(token)


@contextlib.contextmanager
def tensor_chunks(n: int) -> Iterator[None]:
    """Within the block, :func:`global_topk_phases` select per tensor: the leaves are the chunks, in flat
    order, of one tensor of ``n`` entries (zero-padded at the end), and each task keeps the number of entries
    a per-tensor trim of that tensor keeps (:func:`tensor_topk_count`) instead of ``density`` times the
    leaves' total size. Read on the host, when the phases finalize.

    The kept entries are then those of the per-tensor top-k: the global search breaks ties by leaf order,
    then flat index, which is the tensor's flat order; padding entries are zeros at the end, so they come
    last among the smallest magnitudes and are never among the ``k <= n`` kept ones.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    token = _TENSOR_N.set(int(n))
    try:
        yield
    finally:
        _TENSOR_N.reset(token)


def tensor_topk_count(density: np.ndarray, n: int, rounding: str = "round") -> np.ndarray:
    """Entries kept per task by a per-tensor trim of ``n`` entries, on the host, ``(T,)`` int64.

    The same float32 arithmetic as the traced count (``jmerge.methods.trim``): ``density * n`` in float32,
    rounded half to even (``"round"``), or ``density * c`` floored, ``c`` the float32 of ``n`` times a bump
    of 2^-21 that undoes float32's representation error of the density (``"floor"``, at least one entry
    when the density is positive; ``"authors"`` adds one), clipped to ``[0, n]``.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    d = np.asarray(density, np.float32)
    if rounding == "round":
        k = np.round(d * np.float32(n))
    else:
        k = np.floor(d * (np.float32(n) * np.float32(1.0 + 2.0 ** -21)))
        if rounding == "authors":
            k = k + np.float32(1)
    k = np.clip(k, np.float32(0), np.float32(n)).astype(np.int32)
    if rounding == "floor":
        k = np.where(d > 0, np.maximum(k, np.int32(min(1, n))), k)
    return k.astype(np.int64)


@contextlib.contextmanager
def sharded_leaf(flag: bool = True) -> Iterator[None]:
    """Within the block, the leaves being traced are known to be sharded over several devices: statistics that
    would otherwise flatten a leaf (the blocks of DARE's and DELLA's L1 norms, ``methods.sparsify.l1_norms``)
    reduce it in its own shape, where it lives, so that it is not gathered.

    The driver sets it for an eager :func:`jmerge.merge` whose arrays are sharded. Inside your own ``jax.jit``
    the arrays are tracers, so enter it around the call that traces the merge::

        with jmerge.sharded_leaf():
            merged = jax.jit(lambda b, fts: jmerge.merge(jmerge.dare_ties(rescale="l1"), b, fts))(base, fts)

    The results equal the flattened form's to float32 rounding (the sum's order differs); a merge outside it
    on one device equals the out-of-core merge bit for bit.

    Args:
      flag: True (default) inside the block; False to say the leaves are not sharded.

    References: none (infrastructure).
    """
    token = _SHARDED.set(bool(flag))
    try:
        yield
    finally:
        _SHARDED.reset(token)


def leaf_is_sharded() -> bool:
    """Whether an enclosing :func:`sharded_leaf` says the leaf being traced is sharded.

    References: none (infrastructure).
    """
    return _SHARDED.get()


def sort_limit_in_effect() -> int | None:
    """The limit set by an enclosing :func:`whole_sort_limit`, or None where none is set.

    References: none (infrastructure).
    """
    return _SORT_LIMIT.get()


def _sort_max() -> int:
    """Rows of at most this many entries are sorted whole (see :func:`whole_sort_limit`)."""
    limit = _SORT_LIMIT.get()
    return _SORT_MAX if limit is None else limit


def _keys(x: jax.Array, magnitude: bool = False) -> jax.Array:
    """Order-preserving int32 keys of float values (as float32): a < b  <=>  key(a) < key(b).

    ``magnitude``: keys of ``|x|``.
    """
    x = jnp.asarray(x, jnp.float32)
    b = lax.bitcast_convert_type(x, jnp.int32)
    a = b & _ABS
    if magnitude:
        return jnp.minimum(a, _INF_KEY)  # +0 == -0; NaN == +inf
    k = b ^ ((b >> 31) & _ABS)  # negative floats: flip the magnitude bits
    k = jnp.where(a == 0, np.int32(0), k)  # -0.0 == 0.0
    return jnp.where(a > _INF_KEY, _INF_KEY, k)


def _key_floats(key: jax.Array) -> jax.Array:
    """The float32 values of non-magnitude :func:`_keys` (their inverse; the key of 0 gives +0.0)."""
    return lax.bitcast_convert_type(key ^ ((key >> 31) & _ABS), jnp.float32)


def _rows_fn(x: jax.Array):
    """The data source of a materialized (R, n) array: ``guard -> [x[0], ..., x[R-1]]``."""
    return lambda g: [g(x[t]) for t in range(x.shape[0])]


def _stacked(xs) -> jax.Array:
    """The (R, n) float32 array of a data source (outside loops)."""
    return jnp.stack([jnp.asarray(r, jnp.float32).reshape(-1) for r in xs(lambda a: a)])


def _stacked_rows(xs) -> jax.Array:
    """The (R, *shape) float32 array of a data source, rows in their own shape (outside loops).

    Not flattened: flattening a leaf sharded on a later axis would gather it (see the module docstring).
    """
    return jnp.stack([jnp.asarray(r, jnp.float32) for r in xs(lambda a: a)])


def _sample_strides(shape: tuple, target: int) -> tuple:
    """Per-axis strides that keep about ``target`` entries of an array of ``shape``, spread over its axes
    (smallest axes first, each taking its share of the remaining factor)."""
    f = max(1.0, float(np.prod(shape)) / target)
    strides = [1] * len(shape)
    left = len(shape)
    for i in sorted(range(len(shape)), key=lambda i: shape[i]):
        s = int(min(max(round(f ** (1.0 / left)), 1), max(shape[i], 1)))
        strides[i] = s
        f /= s
        left -= 1
    return tuple(strides)


def _sample(a: jax.Array, target: int) -> jax.Array:
    """A strided sample of about ``target`` entries of ``a``, in ``a``'s number of axes.

    Strided per axis (not from the flattened array): a strided slice of a sharded axis stays on its
    devices, so only the sample is ever gathered.
    """
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a.reshape(1)
    return a[tuple(slice(None, None, s) for s in _sample_strides(a.shape, target))]


def _first_entry(a: jax.Array) -> jax.Array:
    """``a``'s first entry (flat order) as a (1,) array, indexed rather than sliced from ``ravel(a)``."""
    a = jnp.asarray(a)
    return a[(0,) * a.ndim].reshape(1)


def _u32(a):
    return lax.bitcast_convert_type(a, jnp.uint32)


def _i32(a):
    return lax.bitcast_convert_type(a, jnp.int32)


def _width(L: int) -> int:
    """Block width for a last axis of ``L`` entries: ``_W`` when it divides ``L``, else the largest
    divisor of ``L`` in [8, ``_W``] (blocks then split only the last axis, which keeps a sharded leaf
    sharded), else ``_W`` (the flattened rows are split, with a tail)."""
    if L % _W == 0:
        return _W
    return next((w for w in range(_W - 1, 7, -1) if L % w == 0), _W)


def _blocks(x: jax.Array):
    """(R, ...) -> blocks of at most ``_W`` entries and a tail (:func:`jmerge.core.xla.split_blocks`
    with the width of :func:`_width`)."""
    return split_blocks(x, _width(x.shape[-1]))


def _sum_rows(s: jax.Array) -> jax.Array:
    """Sum of a (R, m) int32 array over its last axis."""
    return jnp.sum(s, axis=1, dtype=jnp.int32)


def _block_counts(b: jax.Array) -> jax.Array:
    """True entries of a (R, n) bool array per block of ``_W`` (the tail's count last), (R, blocks).

    Counting over blocks first keeps XLA:CPU from materializing the operand of a long reduction;
    the no-op mask keeps it from merging the two levels back into one.
    """
    main, tail = _blocks(b.astype(jnp.int32))
    parts = []
    if main.shape[1]:
        parts.append(jnp.sum(main, axis=2, dtype=jnp.int32) & np.int32(2 * _W - 1))
    if tail.shape[1]:
        parts.append(_sum_rows(tail)[:, None])
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _count_rows(b: jax.Array) -> jax.Array:
    """Number of True entries per row of a (R, n) bool array (over blocks first, see above)."""
    return _sum_rows(_block_counts(b))


def _field(s: jax.Array, j: jax.Array) -> jax.Array:
    """Field ``j`` (a Python int or traced) of the packed block sums ``s``."""
    return (s >> (np.int32(_BITS) * j)) & np.int32((1 << _BITS) - 1)


def _unpack_counts(s: jax.Array, J: int) -> jax.Array:
    """Sums of the ``J`` ``_BITS``-bit fields of the block sums ``s`` (R, ...) (each field <= ``_W``)
    over all but the first axis, (R, J) int32.

    One variadic reduction over ``s`` in its own shape (block sums of a sharded leaf stay sharded: each
    device sums its blocks and only the (R, J) totals are summed across devices).
    """
    fields = tuple(_field(s, j) for j in range(J))
    axes = tuple(range(1, s.ndim))
    sums = lax.reduce(fields, tuple(np.int32(0) for _ in fields),
                      lambda a, b: tuple(x + y for x, y in zip(a, b)), axes)
    return jnp.stack(sums, 1)


def _packed_counts(km: jax.Array, thresholds) -> jax.Array:
    """Per entry, the ``_J`` indicators ``km >= thresholds[j]`` packed into ``_BITS``-bit fields of one int32
    (summed per block they count without overflow, :func:`_unpack_counts`)."""
    return sum((km >= thresholds[j]).astype(jnp.int32) << (_BITS * j) for j in range(_J))


def _with_tail(tail, ts, lo, hi, magnitude, counts, below, above):
    """``(counts, below, above)`` updated with the tail's entries (the part :func:`_blocks` leaves outside its
    blocks), ``tail`` (R, m) against ``ts`` (R, J), ``lo``, ``hi`` (R,): one search per row."""
    if not tail.shape[1]:
        return counts, below, above
    kt = _keys(tail, magnitude)
    counts = counts + jnp.sum(kt[:, None, :] >= ts[:, :, None], axis=2, dtype=jnp.int32)
    below = jnp.maximum(below, jnp.max(jnp.where(kt < hi[:, None], kt, _I32_MIN), axis=1))
    above = jnp.minimum(above, jnp.min(jnp.where(kt > lo[:, None], kt, _I32_MAX), axis=1))
    return counts, below, above


def _count_pass(x, ts, lo, hi, magnitude, inside: bool | tuple = False):
    """Counts at ``J`` thresholds (``counts[:, j] = #{key >= ts[:, j]}``; ``J`` a multiple of ``_J``, one packed
    int32 per ``_J``) and the two snaps ``below = max{key < hi}`` and ``above = min{key > lo}`` per row, in one
    read of ``x`` (one variadic reduction): ``x`` is (R, ...) with one search per row (``ts`` (R, J), ``lo`` and
    ``hi`` (R,)). Several searches of one row count in :func:`_count_pass_rows`.

    ``inside`` (one row): True, or a pair ``(flo, fhi)`` of (1,) arrays: also the number of entries
    with ``lo <= key < hi`` (``flo <= key < fhi``) in each block of the last axis (:func:`_blocks`' main part,
    shape ``(1, *lead, blocks)``), from the same reduction (for :func:`_flagged_blocks`)."""
    R, J = x.shape[0], ts.shape[1]
    W = J // _J
    main, tail = _blocks(x)
    counts = jnp.zeros((R, J), jnp.int32)
    below = jnp.full((R,), _I32_MIN, jnp.int32)
    above = jnp.full((R,), _I32_MAX, jnp.int32)
    if main.size:
        km = _keys(main, magnitude)
        col = lambda a: a.reshape((a.shape[0],) + (1,) * (main.ndim - 1))  # (R,) -> (R, 1, ...)
        packed = tuple(_packed_counts(km, [col(ts[:, w * _J + j]) for j in range(_J)]) for w in range(W))
        snaps = (jnp.where(km < col(hi), km, _I32_MIN), jnp.where(km > col(lo), km, _I32_MAX))
        flo, fhi = (lo, hi) if inside is True else (inside if inside is not False else (None, None))
        ins = ((((km >= col(flo)) & (km < col(fhi))).astype(jnp.int32),) if inside is not False else ())
        init = (np.int32(0),) * W + (_I32_MIN, _I32_MAX) + (np.int32(0),) * len(ins)
        out = lax.reduce(packed + snaps + ins, init,
                         lambda a, b: tuple(x + y for x, y in zip(a[:W], b[:W]))
                         + (jnp.maximum(a[W], b[W]), jnp.minimum(a[W + 1], b[W + 1]))
                         + tuple(a[i] + b[i] for i in range(W + 2, len(a))),
                         (main.ndim - 1,))
        blocks_inside = out[-1] if ins else None
        rest = tuple(range(1, out[0].ndim))  # block sums in the data's own shape: no flattening (sharding)
        parts = [_unpack_counts(s, _J) for s in out[:W]]
        counts = counts + (parts[0] if W == 1 else jnp.concatenate(parts, axis=1))
        below = jnp.maximum(below, jnp.max(out[W], axis=rest))
        above = jnp.minimum(above, jnp.min(out[W + 1], axis=rest))
    counts, below, above = _with_tail(tail, ts, lo, hi, magnitude, counts, below, above)
    if inside is not False:
        if not main.size:
            blocks_inside = jnp.zeros(main.shape[:-1], jnp.int32)
        return counts, below, above, blocks_inside
    return counts, below, above


class _FieldSpan(NamedTuple):
    """A flagged span given by two of the pass's own thresholds: search row ``i`` flags the entries with
    ``ts[i, lo[i]] <= key < ts[i, hi[i]]`` (``lo``, ``hi``: (R,) int32 column indices of ``ts``)."""
    lo: jax.Array
    hi: jax.Array


def _count_pass_rows(xs: Sequence[jax.Array], ts, lo, hi, magnitude, inside: bool | tuple = False,
                     snaps: bool = True, sums: bool = False) -> tuple:
    """:func:`_count_pass` of several searches, one data row each (rows may repeat: a row searched for two
    targets is read once for both), in one reduction: ``xs`` are R arrays of
    one row each, ``(1, ...)`` and all of one shape; ``ts`` (R, J), ``lo`` and ``hi`` (R,), ``inside`` as
    there (pairs of (R,) arrays), or a :class:`_FieldSpan`: the span between two of each row's thresholds, whose
    block counts are then the difference of two fields of the packed block sums (no operand of their own: two
    compares, an and and a sum per entry and search fewer). Each row's operands are its own (no stacked copy of
    the rows, which XLA:CPU would build with a concatenate it does not vectorize), so rows computed from shared
    inputs (task vectors ``m_t - b``) read those inputs once: three TIES rows of a ``(1024, 2816)`` leaf count in
    1.3-1.5 ms where three reductions take 1.8-1.9 ms. ``snaps=False`` leaves the snaps out (about a third of a
    pass's work) and returns the no-information values ``below = hi - 1``, ``above = lo + 1`` (true bounds:
    :func:`_narrow` moves no end on them). Returns ``(counts (R, J), below (R,), above (R,))``, and with
    ``inside`` the list of each row's block counts; the same integers as :func:`_count_pass` row by row. ``sums``
    (no ``inside``): also per row the list of its ``J / _J`` packed block sums of the main part, each
    ``(1, *lead, blocks)`` (field ``j`` of word ``w``: the block's entries with ``key >= ts[i, w * _J + j]``), zeros
    where rows do not combine (no main part)."""
    R, J = len(xs), ts.shape[1]
    W = J // _J
    parts = [_blocks(x) for x in xs]
    main0 = parts[0][0]
    fields = isinstance(inside, _FieldSpan)
    if not main0.size or any(p[0].shape != main0.shape for p in parts):  # nothing to combine
        rows_ = jnp.arange(R)
        span = (ts[rows_, inside.lo], ts[rows_, inside.hi]) if fields else inside
        outs = [_count_pass(x, ts[i:i + 1], lo[i:i + 1], hi[i:i + 1], magnitude,
                            span if span in (False, True) else (span[0][i:i + 1], span[1][i:i + 1]))
                for i, x in enumerate(xs)]
        res = tuple(jnp.concatenate(z) for z in list(zip(*outs))[:3])
        if not snaps:
            res = (res[0], hi - 1, lo + 1)
        if sums:
            return res + ([[jnp.zeros(p[0].shape[:-1], jnp.int32)] * W for p in parts],)
        return res + ([o[3] for o in outs],) if inside is not False else res
    col = lambda a: a.reshape((1,) * main0.ndim)
    ops, init, kinds = [], [], []
    for i, (main, _) in enumerate(parts):
        km = _keys(main, magnitude)
        for w in range(W):
            ops.append(_packed_counts(km, [col(ts[i, w * _J + j]) for j in range(_J)]))
            init.append(np.int32(0)), kinds.append("add")
        if snaps:
            ops += [jnp.where(km < col(hi[i]), km, _I32_MIN), jnp.where(km > col(lo[i]), km, _I32_MAX)]
            init += [_I32_MIN, _I32_MAX]
            kinds += ["max", "min"]
        if inside is not False and not fields:
            flo, fhi = (lo[i], hi[i]) if inside is True else (inside[0][i], inside[1][i])
            ops.append(((km >= col(flo)) & (km < col(fhi))).astype(jnp.int32))
            init.append(np.int32(0)), kinds.append("add")
    comb = {"add": jnp.add, "max": jnp.maximum, "min": jnp.minimum}
    out = lax.reduce(tuple(ops), tuple(init), lambda a, b: tuple(comb[c](x, y) for c, x, y in zip(kinds, a, b)),
                     (main0.ndim - 1,))
    per = len(ops) // R
    rest = tuple(range(1, out[0].ndim))
    # every row's block sums summed (the packed fields apart), maxed and minned in one more variadic reduction: as
    # one reduction per row and kind, XLA:CPU runs each as its own few small kernels (~20 us each)
    ops2, init2, kinds2 = [], [], []
    S = 2 if snaps else 0
    for i in range(R):
        o = out[i * per:(i + 1) * per]
        for w in range(W):
            ops2 += [_field(o[w], j) for j in range(_J)]
        ops2 += list(o[W:W + S])
    kinds2 = (["add"] * J + ["max", "min"][:S]) * R
    init2 = tuple({"add": np.int32(0), "max": _I32_MIN, "min": _I32_MAX}[c] for c in kinds2)
    tot = lax.reduce(tuple(ops2), init2, lambda a, b: tuple(comb[c](x, y) for c, x, y in zip(kinds2, a, b)), rest)
    counts, below, above, flags = [], [], [], []
    for i, (_, tail) in enumerate(parts):
        t = tot[i * (J + S):(i + 1) * (J + S)]
        c = jnp.stack(t[:J], 1)
        if snaps:
            c, bl, ab = _with_tail(tail, ts[i:i + 1], lo[i:i + 1], hi[i:i + 1], magnitude, c, t[J], t[J + 1])
        else:  # the tail's counts alone; the no-information snaps
            c, _, _ = _with_tail(tail, ts[i:i + 1], lo[i:i + 1], hi[i:i + 1], magnitude, c, _I32_MIN, _I32_MAX)
            bl, ab = hi[i:i + 1] - 1, lo[i:i + 1] + 1
        counts.append(c), below.append(bl), above.append(ab)
        if fields:  # the span's block counts: G(ts[lo]) - G(ts[hi]) per block, from the packed block sums
            o = out[i * per:i * per + W]
            pick = lambda j: sum(jnp.where(j // _J == w, _field(o[w], j % _J), 0) for w in range(W))
            flags.append(pick(inside.lo[i]) - pick(inside.hi[i]))
        elif inside is not False:
            flags.append(out[i * per + W + S])
        elif sums:
            flags.append(list(out[i * per:i * per + W]))
    res = (jnp.concatenate(counts), jnp.concatenate(below), jnp.concatenate(above))
    return res + (flags,) if inside is not False or sums else res


def _pick(sk: jax.Array, i: jax.Array) -> jax.Array:
    """``sk[r, i[r]]`` per row of the sorted sample ``sk`` (R, M), ``i`` clipped to ``[0, M)``."""
    return jnp.take_along_axis(sk, jnp.clip(i, 0, sk.shape[1] - 1)[:, None], 1)[:, 0]


def _run(sk: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Where the run of ``c[r]`` in the sorted sample row ``sk[r]`` starts and ends: ``(#{sk < c}, #{sk <= c})``."""
    return (jnp.sum(sk < c[:, None], axis=1, dtype=jnp.int32), jnp.sum(sk <= c[:, None], axis=1, dtype=jnp.int32))


def _first_thresholds(rows, k, magnitude, data_of=None):
    """Five keys of a sorted strided sample around the expected rank of the k-th largest, and the sorted
    sample (R, M) (:func:`_tied_thresholds` reads it in later passes). ``data_of``: the data row of each
    search row (default: one search per row); a row searched for several targets is sampled once."""
    n = rows[0].size
    target = min(_SAMPLE, max(n // 8, 1))  # the sample is gathered when sharded: never the whole row
    sk = jnp.sort(_keys(jnp.stack([_sample(r, target).reshape(-1) for r in rows]), magnitude), axis=1)
    if data_of is not None:
        sk = sk[np.asarray(data_of)]
    M = sk.shape[1]
    q = k.astype(jnp.float32) / n
    pos = (1.0 - q) * M  # ascending sample position of the k-th largest
    sd = jnp.sqrt(M * q * (1.0 - q)) + 1.0
    idx = jnp.round(pos[:, None] + sd[:, None] * jnp.asarray(_CS0, jnp.float32)[None])
    ts = jnp.take_along_axis(sk, jnp.clip(idx.astype(jnp.int32), 0, M - 1), 1)
    # Heavy ties (bfloat16 task vectors): the centre key c recurs in the sample. Count then at c + 1 too
    # (G(c + 1) < k <= G(c) ends the search in this pass when c, tied, is the k-th key), and at the sample's
    # next keys below and above c instead of order statistics equal to c. Smooth data: unchanged.
    c = ts[:, 2]
    first_c, after_c = _run(sk, c)
    below, above = _pick(sk, first_c - 1), _pick(sk, after_c)
    tied = after_c - first_c > 1
    up = jnp.where(ts[:, 3] == c, above, ts[:, 3])
    return jnp.stack([ts[:, 0], jnp.where(ts[:, 1] == c, below, ts[:, 1]), c,
                      jnp.where(tied, c + 1, up), jnp.where(tied, up, jnp.where(ts[:, 4] == c, above, ts[:, 4]))],
                     axis=1), sk


def _next_thresholds(lo, glo, hi, ghi, even, below, above, g, dg, k, sk=None, cap=None):
    """Five keys strictly inside (lo, hi): interpolated around the estimated k-th key (or an even
    split), with the outer two replaced by the snaps of the last pass when they lie inside; rows whose
    sample ``sk`` shows ties in the bracket count four of them at sampled keys (:func:`_tied_thresholds`).

    The estimate assumes the entries' density in the bracket changes linearly across it by the relative slope
    ``g`` (from :func:`_narrow`: 0 is uniform). In a distribution's tail (Breadcrumbs' top 1%, TIES at low
    density) the density of a bracket of thousands of entries falls by tens of percent from ``lo`` to ``hi``,
    and a uniform interpolation misses the narrow span of the next thresholds (a pass that barely narrows).

    ``dg``, the slope :func:`_slope` measured but did not use (within its counts' noise), moves the estimate by
    up to ``D u (1 - u) / 2 * dg`` keys: that error is added to the counting error in quadrature, with ``cap``
    (entries, from the search's read-out capacity) bounding the widened error by that many entries' worth of keys
    so that the thresholds' span stays within the blocks a read-out gathers. A Breadcrumbs top-1% search of a
    ``(1024, 1024)`` leaf (slope -0.24 measured, -0.16 used) put all five thresholds above the k-th key and took
    two passes more; spread for the other -0.08 they hold it and the bracket is read out in that pass. On
    ``scripts/bench_methods.py``'s tree Breadcrumbs took 69 -> 56 loop passes (TIES 114 -> 112, Arcee Fusion
    62 -> 58), and 168 mixed cases (7 shapes, float32/bf16, 6 methods) 313 -> 306 with none more (304 with
    ``_SLOPE_MIN`` 512, one bf16 case a pass more)."""
    D = _u32(hi) - _u32(lo)  # >= 2 for rows still searching
    Df = D.astype(jnp.float32)
    m = jnp.maximum(glo - ghi, 1).astype(jnp.float32)  # entries in [lo, hi)
    f = jnp.clip(((glo - k).astype(jnp.float32) + 0.5) / m, 0.0, 1.0)  # fraction of the bracket's entries below
    # u in [0, 1] with F(u) = f for the density 1 + g (s - 1/2): u + g (u^2 - u) / 2 = f (the stable root)
    h = 1.0 - 0.5 * g
    u = 2.0 * f / (h + jnp.sqrt(jnp.maximum(h * h + 2.0 * g * f, 0.0)))
    est = Df * u
    dens = jnp.maximum(1.0 + g * (u - 0.5), 0.25)  # the relative density at the estimate
    err = 0.5 * Df * lax.rsqrt(m) / dens + 1.0  # expected error of est, in keys
    model = Df * (0.5 * u * (1.0 - u)) * dg  # est's error from the slope not used (du/dg = u (1 - u) / 2)
    wide = jnp.sqrt(err * err + model * model)
    if cap is not None:  # their span (5 errors) then holds at most about 5 cap entries: within the read-out's blocks
        wide = jnp.minimum(wide, jnp.maximum(err, cap * Df / m))
    err = wide
    off = est[:, None] + err[:, None] * jnp.asarray(_CS, jnp.float32)[None]
    grid = Df[:, None] * (jnp.arange(1, _J + 1, dtype=jnp.float32) / (_J + 1))[None]
    off = jnp.where(even[:, None], grid, off)
    off = jnp.clip(off, 1.0, 4.0e9).astype(jnp.uint32)
    enum = jnp.arange(1, _J + 1, dtype=jnp.uint32)[None]  # tiny brackets: every key inside
    small = D <= _J + 1
    off = jnp.where(small[:, None], enum, off)
    off = jnp.clip(off, 1, jnp.maximum(D, 2)[:, None] - 1)
    ts = _i32(_u32(lo)[:, None] + off)
    inside = lambda t: (t > lo) & (t < hi) & ~small
    ts = ts.at[:, 0].set(jnp.where(inside(above), above, ts[:, 0]))
    ts = ts.at[:, _J - 1].set(jnp.where(inside(below), below, ts[:, _J - 1]))
    if sk is None:
        return ts
    tied, cand = _tied_thresholds(lo, glo, hi, ghi, k, sk)
    cand = jnp.where((cand > lo[:, None]) & (cand < hi[:, None]), cand, ts[:, :4])  # strictly inside, or as before
    return jnp.where((tied & ~small)[:, None], jnp.concatenate([cand, ts[:, 2:3]], axis=1), ts)


def _tied_thresholds(lo, glo, hi, ghi, k, sk):
    """Four thresholds from the sorted sample ``sk`` (R, M) for a bracket ``[lo, hi)`` whose sampled keys
    repeat (heavy ties: bfloat16 task vectors take few distinct values, each many times).

    Interpolating in key space assumes the entries spread evenly over the bracket's keys; with ties they sit
    on a few keys and the search splits the bracket evenly for many passes. Here the sampled keys inside the
    bracket locate the k-th key by rank instead: ``c``, the sampled key at the k-th key's estimated position
    among them, and its sampled neighbour ``d`` on the side of the estimate, are counted at ``x`` and ``x + 1``
    (``G(x) >= k > G(x + 1)`` makes ``x`` the k-th key: the search ends). Returns ``(tied, ts)``: rows whose
    sampled keys in the bracket repeat, and the four keys ``(min, min + 1, max, max + 1)`` of ``c`` and ``d``.
    """
    M = sk.shape[1]
    a = jnp.sum(sk < lo[:, None], axis=1, dtype=jnp.int32)  # sampled keys in [lo, hi): sk[a:b]
    b = jnp.sum(sk < hi[:, None], axis=1, dtype=jnp.int32)
    pos = jnp.arange(M - 1, dtype=jnp.int32)[None]
    rep = jnp.sum((sk[:, 1:] == sk[:, :-1]) & (pos >= a[:, None]) & (pos + 1 < b[:, None]), axis=1, dtype=jnp.int32)
    # Tied when the sampled keys in the bracket repeat often: r repeats among s sampled keys spread evenly over K
    # keys take K ~ s^2 / (2 r); tied for K <= 2 s (4 r >= s). float32 model - base values sit on a lattice of
    # many keys, each a few dozen entries: a wide bracket's sampled keys repeat now and then (a birthday
    # coincidence), and pairs at them would rarely hold the k-th key; bfloat16 keys hold thousands each.
    tied = (rep > 0) & (4 * rep >= b - a)
    m = jnp.maximum(glo - ghi, 1).astype(jnp.float32)
    e = a.astype(jnp.float32) + (b - a).astype(jnp.float32) * ((glo - k).astype(jnp.float32) + 0.5) / m
    c = _pick(sk, jnp.clip(jnp.floor(e).astype(jnp.int32), a, jnp.maximum(b - 1, a)))
    first_c, after_c = _run(sk, c)
    up = (e - first_c.astype(jnp.float32)) * 2.0 >= (after_c - first_c).astype(jnp.float32)
    d = jnp.where(up, _pick(sk, after_c), _pick(sk, first_c - 1))
    d = jnp.where(up & (after_c < b) | ~up & (first_c > a), d, c)  # no sampled neighbour there: c again
    x, y = jnp.minimum(c, d), jnp.maximum(c, d)
    return tied & (b > a), jnp.stack([x, x + 1, y, y + 1], axis=1)


def _slope(ts, counts, lo, glo, hi, ghi, nlo, nglo, nhi, nghi):
    """The relative density slope ``g`` of the bracket ``[nlo, nhi)`` (its density ``1 + g (s - 1/2)`` times the
    mean at ``s`` in [0, 1] across it, ``|g| <= 1.5``), from the exact densities of the neighbouring intervals the
    pass counted: ``[tl, nlo)`` and ``[nhi, tr)``, ``tl`` / ``tr`` the nearest counted keys (thresholds or the old
    bracket's ends) outside it, each used when no wider than 4 brackets and in the bracket's binade. 0 when
    neither is, or when the slope is within the counts' noise or they hold few entries.

    Returns ``(g, dg)``: ``dg`` is the part of the measured slope not used (``min(|g_raw|, 3 noise)``; 0 where
    no neighbour is usable or the counts are few), which :func:`_next_thresholds` spreads its thresholds for."""
    cand = jnp.concatenate([ts, lo[:, None], hi[:, None]], axis=1)
    cnt = jnp.concatenate([counts, glo[:, None], ghi[:, None]], axis=1)
    below_ = cand < nlo[:, None]
    tl = jnp.max(jnp.where(below_, cand, _I32_MIN), axis=1)
    gl = jnp.min(jnp.where(below_ & (cand == tl[:, None]), cnt, _I32_MAX), axis=1)
    above_ = cand > nhi[:, None]
    tr = jnp.min(jnp.where(above_, cand, _I32_MAX), axis=1)
    gr = jnp.max(jnp.where(above_ & (cand == tr[:, None]), cnt, -1), axis=1)
    f = lambda a: a.astype(jnp.float32)
    D = f(_u32(nhi) - _u32(nlo))
    rho = f(jnp.maximum(nglo - nghi, 1)) / jnp.maximum(D, 1.0)
    wl, wr = f(_u32(nlo) - _u32(tl)), f(_u32(tr) - _u32(nhi))
    # Keys are linear in the value within a binade (one exponent) and halve their step across one: a density
    # slope is estimated only within the bracket's binade (a step there is no slope)
    e = lambda t: t >> 23
    one = e(nlo) == e(nhi - 1)
    okl = one & jnp.any(below_, axis=1) & (wl > 0) & (wl <= 4.0 * D) & (e(tl) == e(nlo))
    okr = one & jnp.any(above_, axis=1) & (wr > 0) & (wr <= 4.0 * D) & (e(tr - 1) == e(nlo))
    rl = f(gl - nglo) / jnp.maximum(wl, 1.0)  # density left of the bracket, centred at -wl / 2 from nlo
    rr = f(nghi - gr) / jnp.maximum(wr, 1.0)
    # slope per key from the two sides (centres D / 2 + wl / 2 and D / 2 + wr / 2 from the bracket's centre)
    both = (rr - rl) / (0.5 * (wl + wr) + D)
    left = (rho - rl) / (0.5 * (wl + D))
    right = (rr - rho) / (0.5 * (wr + D))
    b = jnp.where(okl & okr, both, jnp.where(okl, left, jnp.where(okr, right, 0.0)))
    g = b * D / jnp.maximum(rho, 1e-30)
    # counting noise of g (each density from a count c has relative error ~ 1 / sqrt(c)); a slope within
    # NOISE of them is not used, and larger ones are shrunk by that much
    inv = lambda c: 1.0 / jnp.maximum(f(c), 1.0)
    nm = inv(nglo - nghi)
    noise = jnp.where(okl & okr, jnp.sqrt(inv(gl - nglo) + inv(nghi - gr)),
                      2.0 * jnp.sqrt(nm + jnp.where(okl, inv(gl - nglo), inv(nghi - gr))))
    dg = jnp.minimum(jnp.abs(g), _SLOPE_NOISE * noise)  # the part of the slope not used
    g = jnp.sign(g) * jnp.maximum(jnp.abs(g) - _SLOPE_NOISE * noise, 0.0)
    # few entries: the counts of lattice values (float32 model - base) or ties are no density; uniform then
    few = jnp.minimum(nglo - nghi, jnp.where(okl & okr, jnp.minimum(gl - nglo, nghi - gr),
                                             jnp.where(okl, gl - nglo, nghi - gr))) < _SLOPE_MIN
    return jnp.where(few, 0.0, jnp.clip(g, -1.5, 1.5)), jnp.where(few, 0.0, jnp.minimum(dg, 1.5))


def _narrow(state, ts, counts, below, above, k):
    """New bracket from the counts at ``ts`` and the snaps (both relative to the old bracket), with its density
    slope and the slope's unused part (:func:`_slope`)."""
    lo, glo, hi, ghi = state[:4]
    ge = counts >= k[:, None]
    nlo = jnp.maximum(jnp.max(jnp.where(ge, ts, _I32_MIN), axis=1), lo)
    nglo = jnp.where(nlo == lo, glo, jnp.min(jnp.where(ge & (ts == nlo[:, None]), counts, _I32_MAX), axis=1))
    nhi = jnp.minimum(jnp.min(jnp.where(ge, _I32_MAX, ts), axis=1), hi)
    nghi = jnp.where(nhi == hi, ghi, jnp.max(jnp.where(~ge & (ts == nhi[:, None]), counts, -1), axis=1))
    g, dg = _slope(ts, counts, lo, glo, hi, ghi, nlo, nglo, nhi, nghi)
    # The old bracket's keys above lo lie in [above, below]. A lower end the counts moved up (nlo > lo) may rise
    # to above (no key in [nlo, above): G(above) == G(nlo)), and hi may drop to below + 1 (no key in
    # (below, hi): G(below + 1) == G(nhi)); a bracket holding one key (many entries tied at it) ends here.
    nlo = jnp.where((nlo > lo) & (above > nlo) & (above < nhi), above, nlo)
    nhi = jnp.where((below >= nlo) & (below < nhi), below + 1, nhi)
    # No key lies in (lo, above): if that covers the new bracket, the k-th key is lo itself.
    nhi = jnp.where((nlo == lo) & (above >= nhi), lo + 1, nhi)
    even = (nglo - nghi) * 2 > (glo - ghi)  # fewer than half the entries left the bracket
    return nlo, nglo, nhi, nghi, even, below, above, g, dg


def _search(xs, k, magnitude, data_of=None):
    """Per row, a key ``t`` with ``G(t) == k``, else the k-th largest key ``v`` (with ties at it).

    ``xs(guard)`` returns the data as a list of R rows (float32, each of ``n`` entries in any shape,
    flat order is row-major) with every input
    wrapped in ``guard`` (see :func:`jmerge.core.xla.loop_variant`); it is rebuilt on every pass, and each row is
    an operand of its own in the pass's one reduction (:func:`_count_pass_rows`), so data computed from other
    arrays (``tau`` from the models) is read from those arrays without being materialized (a stacked operand
    would put a concatenate, which XLA:CPU does not vectorize, in the loop).

    ``data_of`` (optional): search row ``s`` reads data row ``data_of[s]`` (``k`` has one entry per search
    row). Every pass counts all searches in one reduction, each search with its own thresholds and (with
    read-outs) block flags; a search's steps are those it takes alone.

    Searches that read out and share a data row take their first pass (the sample's thresholds) together,
    before the loop and without block flags (the span of those thresholds holds far more entries than a read-out
    takes); one search per data row keeps its first pass in the loop (a pass outside would compile again).

    Returns ``(v, gt, ge, rcut, known, kth)``: keep ``key > v`` (``gt`` entries) and the first ``k - gt`` of the
    ``ge - gt`` entries equal to ``v``. When a threshold ``t`` hit ``k`` exactly, ``v = t - 1`` and
    ``gt == k``. ``rcut``, ``known``: the tie cuts the read-out found (:func:`_tie_cuts`). ``kth``: the k-th
    largest key where the search ended on it (a one-key bracket, as every read-out ends), else ``INT32_MIN``
    (a threshold that hit ``k`` exactly says only that it lies at or above ``t``).
    """
    rows0 = xs(lambda a: a)
    n = rows0[0].size
    identity = tuple(range(len(rows0)))
    data_of = identity if data_of is None else tuple(int(d) for d in data_of)
    R = len(data_of)
    C = _tensor_read_capacity(n) if _read_allowed() else 0
    cap = C / 6.0 if C else None  # the next thresholds' widened error, in entries (see _next_thresholds)

    z = jnp.zeros((R,), jnp.int32)
    lo = jnp.full((R,), _NEG_INF_KEY, jnp.int32)
    hi = jnp.full((R,), _TOP, jnp.int32)
    f0 = jnp.zeros((R,), jnp.float32)
    state = (lo, z + n, hi, z, jnp.zeros((R,), bool), hi, lo, f0, f0)  # no snaps yet

    def done(s):
        lo, glo, hi = s[:3]
        return (glo == k) | (_u32(hi) - _u32(lo) <= 1)

    flag_shape = jax.eval_shape(lambda: _blocks(jnp.zeros((1,) + jnp.shape(rows0[0]), jnp.float32)))[0].shape[:-1]

    def count(rows, s, ts, fin, span=None, flag=False, snaps=True):
        """One pass over the data rows: every search's counts and snaps, and with ``flag`` its block flags, from
        one reduction (:func:`_count_pass_rows`), skipped when every search is done (a done search's counts and
        flags are then the skipped pass's: ignored by ``step``, no flagged blocks). A data row that several
        searches share (Breadcrumbs' two cuts, Arcee Fusion's quartiles) is read once for all of them, and so are
        inputs that several rows share (the base of TIES's task vectors). For Breadcrumbs on a 100M-parameter
        tree this took 0.84 -> 0.61 s against a conditional and a reduction per data row."""

        def run():
            rs = rows()
            out = _count_pass_rows([jnp.asarray(rs[d], jnp.float32)[None] for d in data_of], ts, s[0], s[2],
                                   magnitude, inside=span if flag else False, snaps=snaps)
            c, b, a = (jnp.where(fin, 0, out[0].T).T, jnp.where(fin, _I32_MIN, out[1]), jnp.where(fin, _I32_MAX, out[2]))
            return (c, b, a) + ((tuple(jnp.where(fin[j], 0, x) for j, x in enumerate(out[3])),) if flag else ())

        def skip():
            out = (jnp.zeros((R, _J), jnp.int32), jnp.full((R,), _I32_MIN), jnp.full((R,), _I32_MAX))
            return out + ((tuple(jnp.zeros(flag_shape, jnp.int32) for _ in range(R)),) if flag else ())

        out = lax.cond(jnp.all(fin), skip, run)
        return out[0], out[1], out[2], list(out[3]) if flag else None

    def step(s, fin, ts, counts, below, above):  # the narrowed state; searches done before (fin) keep theirs
        new = _narrow(s, ts, counts, below, above, k)
        return tuple(jnp.where(fin, a, b) for a, b in zip(s, new))

    def body(carry):
        s, ts, m, rc = carry
        fin = done(s)
        if C:  # the flagged span is two of the pass's thresholds: its block counts come from the packed ones
            ts, fspan = _read_span(s, ts, C)
            span = (jnp.min(ts, axis=1), jnp.max(ts, axis=1))  # its keys (the thresholds fspan names)
        counts, below, above, flags = count(lambda: xs(lambda a: loop_variant(a, m)), s, ts, fin,
                                            fspan if C else None, bool(C))
        s = step(s, fin, ts, counts, below, above)
        if C:  # one search per pass: each search row's block flags
            s, rc = _read_rows(xs, data_of, s, span, fin, flags, k, m, rc, C, done, magnitude)
        never = counts[0, 0] < 0  # always false, but XLA cannot tell
        if n >= HONEST_COST_MIN:  # see jmerge.core.xla.honest_cost
            never = honest_cost(xs(lambda a: loop_variant(_sample(a, HONEST_COST_ENTRIES), m))[0], never)
        m = jnp.where(never, 0, m)  # always m, but loop-variant to XLA (see jmerge.core.xla.loop_variant)
        return s, _next_thresholds(*s, k, sk, cap=cap), m, rc

    # Searches that share a data row, with read-outs, take their first pass before the loop (no block flags)
    peel = bool(C) and len(set(data_of)) < R

    def first():  # the sample's thresholds (and with peel their counts: the searches of a data row share its read)
        rows = lambda: [jnp.asarray(r, jnp.float32) for r in xs(lambda a: a)]
        ts, sk = _first_thresholds(rows(), k, magnitude, None if data_of == identity else data_of)
        if not peel:
            return state, ts, sk
        fin = done(state)
        # with snaps, though from the whole range they are only the row's extreme keys: a search whose k-th key
        # lies below every threshold then moves to the smallest key, where without them it splits the range down to
        # the lowest float (Arcee Fusion on a bf16 leaf of (1024, 2816): 33 -> 35-41 ms without them)
        counts, below, above, _ = count(rows, state, ts, fin)
        s = step(state, fin, ts, counts, below, above)
        return s, _next_thresholds(*s, k, sk, cap=cap), sk

    # The sample and the first pass are taken inside a conditional that reads the source's inputs: outside one,
    # XLA would share the data's expression with the caller's (unmaterialized) uses and materialize it.
    # The probe is computed from the first element of each input, not sliced from the full-size
    # data (which would make XLA materialize the data for its two users), and indexed, not sliced
    # from the flattened input (which would gather a sharded one).
    state, ts, sk = materialized(first, xs(_first_entry)[0])
    carry = (state, ts, jnp.int32(_ABS), (jnp.zeros((R,), jnp.int32), jnp.zeros((R,), bool)))
    state, _, _, (rcut, known) = lax.while_loop(lambda c: ~jnp.all(done(c[0])), body, carry)
    lo, glo, hi, ghi = state[:4]
    exact = glo == k
    kth = jnp.where((hi - lo == 1) & (glo >= k) & (ghi < k), lo, _I32_MIN)  # G(lo) >= k > G(lo + 1): lo is it
    return jnp.where(exact, lo - 1, lo), jnp.where(exact, glo, ghi), glo, rcut, known, kth


def _tensor_read_capacity(n: int) -> int:
    """Blocks of a row of ``n`` entries that a per-tensor search gathers when it reads its bracket out: 1024
    (32768 keys; the bracket's at most ``2 * C`` entries among them are compacted and sorted, ~0.4 ms against
    ~1.5 ms for a counting pass of a 2.9M-entry row), fewer for short rows."""
    return int(min(1024, max(16, n >> 9)))


def _read_span(s, ts, C):
    """Per search row, the key range ``[flo, fhi)`` whose entries a counting pass flags per block for the
    read-out: the whole bracket when it holds at most ``C`` entries (so it fits: the pass then ends the search),
    else the span of the pass's thresholds (which holds the new bracket when the k-th key falls between them).
    The span's ends are two of the pass's thresholds (:class:`_FieldSpan`): a whole bracket's row counts at its
    ends instead of its outer two thresholds (its search ends in this pass). Returns ``(ts, span)``."""
    lo, glo, hi, ghi = s[:4]
    whole = glo - ghi <= C
    ts = ts.at[:, 0].set(jnp.where(whole, lo, ts[:, 0])).at[:, -1].set(jnp.where(whole, hi, ts[:, -1]))
    return ts, _FieldSpan(jnp.argmin(ts, axis=1).astype(jnp.int32), jnp.argmax(ts, axis=1).astype(jnp.int32))


def _read_rows(xs, data_of, s, span, fin, flags, k, m, rc, C, done, magnitude):
    """The read-out of :func:`_search` (leaves not sharded): a search row whose new bracket lies within the
    range its pass flagged (:func:`_read_span`), holds at most ``2 * C`` entries, and whose flagged blocks
    (those holding entries of that range, counted in the same reduction) number at most ``C``, gathers those
    blocks (:func:`_flagged_blocks`) and ends its search: the bracket's entries among them are compacted, the k-th
    key ``v`` is the ``(k - G(hi))``-th largest of them, and the tie cut (the flat position after the
    ``(k - #{key > v})``-th entry equal to ``v``) is read from their positions (gathered in flat order), so
    :func:`_tie_cuts` needs no pass for it. The bracket's entry count must match the counts (else the row keeps counting).
    Search row ``s`` reads data row ``data_of[s]``.

    Returns the state with ended rows as one-key brackets ``[v, v + 1)`` (``G(v)``, ``#{key > v}``) and
    ``(rcut, known)``: their cuts and which rows have one."""
    lo, glo, hi, ghi = s[:4]
    rcut, known = rc
    nd = done(s)
    flo, fhi = span
    E = 2 * C  # bracket entries compacted and sorted
    nflag = jnp.stack([jnp.sum((f > 0).astype(jnp.int32)) for f in flags])
    ok = ~fin & ~nd & (lo >= flo) & (hi <= fhi) & (nflag <= C) & (glo - ghi <= E)
    cur = (lo, glo, hi, ghi, rcut, known)
    R = len(flags)

    def read():  # every row at once (one program for the rows: compiled once, not per row); rows not ok keep cur
        data = xs(lambda a: loop_variant(a, m))
        nb = flags[0].size
        idx, cnt = _flagged_blocks(jnp.concatenate([f.reshape(1, nb) for f in flags]), C)
        parts = [_blocks(jnp.asarray(data[d], jnp.float32)[None]) for d in data_of]
        w = parts[0][0].shape[-1]
        keys = jnp.stack([_keys(mn.reshape(nb, w)[idx[d]], magnitude) if nb else jnp.zeros((C, w), jnp.int32)
                          for d, (mn, _) in enumerate(parts)])  # (R, C, w): only those blocks are read
        tkeys = jnp.concatenate([_keys(t, magnitude) for _, t in parts])  # (R, tail)
        tl = tkeys.shape[-1]
        valid = jnp.broadcast_to((jnp.arange(C, dtype=jnp.int32)[None] < cnt[:, None])[..., None], (R, C, w))
        pos = idx[..., None] * np.int32(w) + jnp.arange(w, dtype=jnp.int32)
        allk = jnp.concatenate([keys.reshape(R, -1), tkeys], axis=1)
        allpos = jnp.concatenate([pos.reshape(R, -1), jnp.broadcast_to(np.int32(nb * w) + jnp.arange(tl, dtype=jnp.int32),
                                                                       (R, tl))], axis=1)
        valid = jnp.concatenate([valid.reshape(R, -1), jnp.ones((R, tl), bool)], axis=1)
        inb = valid & (allk >= lo[:, None]) & (allk < hi[:, None])
        m_in = jnp.sum(inb, axis=1, dtype=jnp.int32)
        at = jnp.maximum(_first_true(inb, E)[0], 0)  # flat order (slots past m_in: 0, masked below)
        ck = jnp.where(jnp.arange(E, dtype=jnp.int32)[None] < m_in[:, None], jnp.take_along_axis(allk, at, 1), _I32_MIN)
        q = jnp.clip(k - ghi, 1, E)  # >= 1 where the k-th key lies in the bracket
        v = jnp.take_along_axis(lax.sort(ck, dimension=1), (E - q)[:, None], 1)[:, 0]
        gt = ghi + jnp.sum(ck > v[:, None], axis=1, dtype=jnp.int32)
        eqm = ck == v[:, None]
        ge = gt + jnp.sum(eqm, axis=1, dtype=jnp.int32)
        j = jnp.sum(jnp.cumsum(eqm.astype(jnp.int32), axis=1) < (k - gt)[:, None], axis=1, dtype=jnp.int32)
        cut = jnp.take_along_axis(allpos, jnp.take_along_axis(at, jnp.minimum(j, E - 1)[:, None], 1), 1)[:, 0] + 1
        good = ok & (m_in == glo - ghi)
        return tuple(jnp.where(good, x, y) for x, y in zip((v, ge, v + 1, gt, cut, jnp.ones((R,), bool)), cur))

    lo, glo, hi, ghi, rcut, known = lax.cond(jnp.any(ok), read, lambda: cur)
    return (lo, glo, hi, ghi) + tuple(s[4:]), (rcut, known)


def _sorted_threshold(x, k, magnitude):
    """The same ``(v, cut)`` for short rows, from one sort of the keys alone: ascending, the ``k``-th largest
    key is ``v``; when more entries equal ``v`` than the ``q = k - #(key > v)`` kept, the cut is one past the
    ``q``-th of them in flat order, read from a running count of the entries equal to ``v`` (``n`` when all are
    kept, as :func:`_tie_cuts` returns). A single-operand sort (6x faster on XLA:CPU than sorting (key,
    position) pairs) and no conditional: a sweep's program (rows up to :func:`whole_sort_limit`) compiles
    about half the code per shape of the counting search, and the sort, which no ``k`` changes, is hoisted
    out of a vmap over settings.
    """
    keys = _keys(x, magnitude)
    n = keys.shape[1]
    srt = lax.sort(keys, dimension=1)
    v = jnp.take_along_axis(srt, (n - k)[:, None], 1)
    gt = jnp.sum(keys > v, axis=1, dtype=jnp.int32)
    eq = keys == v
    ge = gt + jnp.sum(eq, axis=1, dtype=jnp.int32)
    # the q-th tied entry (q >= 1: v is the k-th largest key) sits at the first i with count(eq[:i+1]) >= q
    before = jnp.sum(jnp.cumsum(eq, axis=1, dtype=jnp.int32) < (k - gt)[:, None], axis=1, dtype=jnp.int32)
    cut = jnp.where(ge == k, np.int32(n), before + np.int32(1))
    return v[:, 0], cut


def _tie_cut(x, v, quota, magnitude):
    """Per row of ``x`` (R, *shape), the flat position after the ``quota``-th entry with key ``v``.

    One read of ``x``: per block (:func:`_blocks`, in the data's own shape) a bit mask of the entries
    equal to ``v``. The block holding the cut is then found one block-grid axis at a time from the
    masks' population counts (small reductions, summed across devices when ``x`` is sharded), and the
    position inside it from its bit mask.
    """
    R = x.shape[0]
    if x.ndim < 2:
        x = x.reshape(R, 1)
    eq = (_keys(x, magnitude) == v.reshape((R,) + (1,) * (x.ndim - 1))).astype(jnp.uint32)
    main, tail = _blocks(eq)
    # Sums of distinct bits (== bitwise or; an all-reduce across devices supports only sums, max, min).
    bm = jnp.sum(main << _lane(main), axis=main.ndim - 1, dtype=jnp.uint32)
    if tail.shape[1]:  # flattened rows: the tail is one more block at the end (flat order)
        bm = jnp.concatenate([bm, jnp.sum(tail << _lane(tail), axis=1, dtype=jnp.uint32)[:, None]], axis=1)
    return _cut_in_blocks(bm, quota, main.shape[-1])


def _tie_cut_shared(rows, v, quota, magnitude):
    """:func:`_tie_cut` for ``P`` cuts per row (``v`` and ``quota`` (P, R), results (P, R)), each row read once:
    one variadic reduction per row gives the bit masks of all ``P`` keys (``rows``: the R rows in their own
    shape, as a data source gives them; stacking them first would write the stack)."""
    P, R = v.shape
    bms, w = [], None
    for r, x in enumerate(rows):
        x = jnp.reshape(x, (1,) + (jnp.shape(x) or (1,)))  # one row, in its own shape
        keys = _keys(x, magnitude)
        splits = [_blocks((keys == v[p, r]).astype(jnp.uint32)) for p in range(P)]
        main = splits[0][0]
        w = main.shape[-1]
        bm = lax.reduce(tuple(m << _lane(m) for m, _ in splits), (np.uint32(0),) * P,
                        lambda a, b: tuple(i + j for i, j in zip(a, b)), (main.ndim - 1,))
        if splits[0][1].shape[1]:
            bm = [jnp.concatenate([b, jnp.sum(t << _lane(t), axis=1, dtype=jnp.uint32)[:, None]], axis=1)
                  for b, (_, t) in zip(bm, splits)]
        bms.append(jnp.stack(bm))  # (P, 1, *grid)
    bm = jnp.concatenate(bms, axis=1)  # (P, R, *grid)
    return jnp.stack([_cut_in_blocks(bm[p], quota[p], w) for p in range(P)])


def _lane(m):
    """Bit position of each entry within its block (the last axis)."""
    return lax.broadcasted_iota(jnp.uint32, m.shape, m.ndim - 1)


def _cut_in_blocks(bm, rem, w: int):
    """The flat position after the ``rem``-th set bit of the per-block bit masks ``bm`` (R, *grid) of blocks of
    ``w`` entries (see :func:`_tie_cut`), per row."""
    R = bm.shape[0]
    cnt = lax.population_count(bm).astype(jnp.int32)
    grid = cnt.shape[1:]
    col = lambda a: a.reshape((R,) + (1,) * len(grid))
    sel = jnp.ones(cnt.shape, bool)
    start = jnp.zeros((R,), jnp.int32)
    for a in range(1, cnt.ndim):
        other = tuple(i for i in range(1, cnt.ndim) if i != a)
        c = jnp.sum(jnp.where(sel, cnt, 0), axis=other, dtype=jnp.int32) if other else cnt
        inc = jnp.cumsum(c, axis=1)
        j = jnp.clip(jnp.sum(inc < rem[:, None], axis=1, dtype=jnp.int32), 0, grid[a - 1] - 1)
        rem = rem - jnp.take_along_axis(inc - c, j[:, None], 1)[:, 0]
        sel = sel & (lax.broadcasted_iota(jnp.int32, cnt.shape, a) == col(j))
        start = start + j * np.int32(w * int(np.prod(grid[a:])))
    b = jnp.sum(jnp.where(sel, bm, np.uint32(0)), axis=tuple(range(1, cnt.ndim)), dtype=jnp.uint32)  # one block
    bits = ((b[:, None] >> jnp.arange(w, dtype=jnp.uint32)[None]) & np.uint32(1)).astype(jnp.int32)
    inc0 = jnp.cumsum(bits, axis=1)
    return start + jnp.sum(inc0 < rem[:, None], axis=1, dtype=jnp.int32) + 1


def _tie_cuts(xs, v, quota, eq, magnitude, rcut=None, known=None):
    """Per row, the cut position ``c`` such that ``key > v`` plus ``key == v`` before ``c`` (flat
    order) keeps exactly ``quota`` of the ``eq`` entries equal to ``v``; ``v``, ``quota`` and ``eq`` (R,), or
    (P, R) for ``P`` cuts per row (one conditional, one read of the data for all).

    Rows that keep all of their ties get ``n``, rows that keep none ``0``; only when some row keeps
    a part of them does a conditional read the data once more to locate the cut
    (:func:`_tie_cut`). ``xs`` is a data source (see :func:`_search`). Rows with ``known`` (R,) take their cut
    from ``rcut`` (read out by the search) and need no pass.
    """
    n = jax.eval_shape(lambda: _stacked(xs)).shape[1]
    partial = (quota > 0) & (quota < eq)
    whole = jnp.where(quota > 0, np.int32(n), np.int32(0))
    if known is not None:
        whole = jnp.where(partial & known, rcut, whole)
        partial = partial & ~known

    def cut():
        q = jnp.where(partial, quota, 1)
        if jnp.ndim(v) == 2:
            return jnp.where(partial, _tie_cut_shared(xs(lambda a: a), v, q, magnitude), whole)
        return jnp.where(partial, _tie_cut(_stacked_rows(xs), v, q, magnitude), whole)

    return lax.cond(jnp.any(partial), cut, lambda: whole)


def _threshold_mask(x, v, cut, magnitude):
    """The elementwise top-k mask from :func:`_row_thresholds`: ``key > v``, and ``key == v`` at flat
    positions below ``cut``. Elementwise, so XLA fuses it into its consumers (a merge reads the task
    vectors once more instead of a materialized mask and masked copy).

    ``x`` is rows ``(R, *shape)`` with ``v`` and ``cut`` of shape ``(R,)``, or one row of any shape
    with scalar ``v`` and ``cut``; flat positions count within a row (row-major).
    """
    keys, pos, col = _keys(x, magnitude), _positions(x, jnp.ndim(v)), _col(x, jnp.ndim(v))
    return (keys > col(v)) | ((keys == col(v)) & (pos < col(cut)))


def _positions(x, lead: int) -> jax.Array:
    """Flat (row-major) positions of ``x``'s entries within its rows (the axes after ``lead``)."""
    pos = jnp.zeros(x.shape, jnp.int32)
    stride = 1
    for d in reversed(range(lead, x.ndim)):
        pos = pos + lax.broadcasted_iota(jnp.int32, x.shape, d) * np.int32(stride)
        stride *= x.shape[d]
    return pos


def _col(x, lead: int):
    return lambda a: jnp.reshape(a, jnp.shape(a) + (1,) * (x.ndim - lead))


def _threshold_word(x, v, cut, magnitude):
    """:func:`_threshold_mask` as an int32 word, ``-1`` where the mask is true and ``0`` elsewhere, in
    integer arithmetic without a compare, for keys that are nonnegative (``magnitude``, or ``x >= 0``).

    ``bits(y) & word`` is ``where(mask, y, +0)``. A mask shared by several operands of one variadic
    reduction made XLA:CPU emit it unvectorized (a (1024, 2816) leaf: 12.6 ms for three masked sums,
    against 4.9 ms with this word; workaround 11).
    """
    keys, pos, col = _keys(x, magnitude), _positions(x, jnp.ndim(v)), _col(x, jnp.ndim(v))
    v = col(jnp.asarray(v, jnp.int32))
    v0 = jnp.maximum(v, 0)  # keys >= 0: no difference below overflows
    every = -(v < 0).astype(jnp.int32)  # v < 0 keeps every entry
    above = (v0 - keys) >> 31  # -1 where keys > v0
    below = (keys - v0) >> 31  # -1 where keys < v0
    first = (pos - col(jnp.asarray(cut, jnp.int32))) >> 31  # -1 where pos < cut
    return above | every | (~(above | below) & first)


def _row_thresholds(xs, k: jax.Array, magnitude: bool = False, kth: bool = False):
    """Row-wise top-k as ``(v, cut)`` for :func:`_threshold_mask`; ``xs`` an (R, n) array (any float
    dtype) or a data source ``guard -> (R, n)`` (see :func:`_search`).

    ``k`` (R,), or (P, R): ``P`` counts per row, searched in shared passes (results (P, R)). With ``kth``, also
    each k-th largest key where a counting search ended on it, else ``INT32_MIN`` (always for sorted rows and
    ``k`` outside ``[1, n]``): :func:`threshold_values` then needs no pass."""
    if not callable(xs):
        xs = _rows_fn(jnp.asarray(xs, jnp.float32))  # rows in their own shape
    R, n = jax.eval_shape(lambda: _stacked(xs)).shape
    k = jnp.asarray(k).astype(jnp.int32)
    unknown = jnp.full(k.shape, _I32_MIN)
    with_kth = (lambda res, kk: res + (jnp.where((k >= 1) & (k <= n), kk, _I32_MIN),)) if kth else (lambda res, kk: res)
    if k.ndim == 2:
        P = k.shape[0]
        if n <= _sort_max():  # short rows are sorted: no passes to share
            out = [_row_thresholds(xs, k[p], magnitude) for p in range(P)]
        else:  # search row p * R + r reads data row r; the tie cuts per target over the R rows, as P calls
            *vs, rcut, known, kk = _search(xs, jnp.clip(k.reshape(-1), 1, n), magnitude,
                                           tuple(r for _ in range(P) for r in range(R)))
            v, quota, eq = (jnp.stack(z) for z in zip(*(_search_ties(k[p], n, *(a[p * R:(p + 1) * R] for a in vs))
                                                         for p in range(P))))
            # one conditional: the P cuts share a read
            return with_kth((v, _tie_cuts(xs, v, quota, eq, magnitude, rcut.reshape(P, R), known.reshape(P, R))),
                            kk.reshape(P, R))
        return with_kth((jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out])), unknown)
    kc = jnp.clip(k, 1, n)
    if n <= _sort_max():
        v, cut = _sorted_threshold(_stacked(xs), kc, magnitude)
        # k <= 0: a threshold above every key keeps nothing; k >= n: one below every key keeps all (the cuts of
        # these rows are those of the counting path; they select nothing more).
        return with_kth((jnp.where(k <= 0, _TOP, jnp.where(k >= n, _NEG_INF_KEY - 1, v)),
                         jnp.where((k <= 0) | (k == n), np.int32(0), jnp.where(k > n, np.int32(n), cut))), unknown)
    v, gt, ge, rcut, known, kk = _search(xs, kc, magnitude)
    return with_kth(_search_result(xs, k, n, v, gt, ge, magnitude, rcut, known), kk)


def _search_result(xs, k, n, v, gt, ge, magnitude, rcut=None, known=None):
    """``(v, cut)`` from :func:`_search`'s ``(v, gt, ge)`` for the counts ``k`` (unclipped) of rows of ``n``
    (``rcut`` / ``known``: the tie cuts the search read out, see :func:`_tie_cuts`)."""
    v, quota, eq = _search_ties(k, n, v, gt, ge)
    return v, _tie_cuts(xs, v, quota, eq, magnitude, rcut, known)


def _search_ties(k, n, v, gt, ge):
    """``(v, quota, eq)`` for :func:`_tie_cuts` from :func:`_search`'s ``(v, gt, ge)`` for the counts ``k``
    (unclipped) of rows of ``n``."""
    # k <= 0: a threshold above every key keeps nothing; k >= n: one below every key keeps all.
    v = jnp.where(k <= 0, _TOP, jnp.where(k >= n, _NEG_INF_KEY - 1, v))
    gt = jnp.where(k <= 0, 0, jnp.where(k >= n, n, gt))
    ge = jnp.where((k <= 0) | (k >= n), gt, ge)
    return v, jnp.maximum(k, 0) - gt, ge - gt


def _topk_rows(x: jax.Array, k: jax.Array, magnitude: bool = False) -> jax.Array:
    """Row-wise top-k mask of (R, n) values, k (R,)."""
    x = jnp.asarray(x, jnp.float32)
    v, cut = _row_thresholds(x, k, magnitude)
    return _threshold_mask(x, v, cut, magnitude)


def topk_keep_rows(x: Float[Array, "T *shape"], k: int | Int[Array, "T"], *, magnitude: bool = False,
                   rebuild: Callable[[Callable[[Any], Any]], Sequence[Shaped[ArrayLike, "*shape"]]] | None = None
                   ) -> tuple[Float[Array, "T *shape"], Bool[Array, "T *shape"]]:
    """``(where(mask, x, 0), mask)`` for :func:`topk_mask_rows`'s mask, ``x`` of shape ``(T, ...)``.

    Both are elementwise in ``x`` once the per-row thresholds are known, so XLA fuses them into
    whatever consumes them (TIES' sign election and disjoint merge read ``x`` instead of a masked
    copy). The values are float32.

    ``rebuild``: optional ``guard -> [x[0], ..., x[T-1]]`` recomputing the rows of ``x`` from the
    arrays they derive from, each wrapped in ``guard`` (e.g. ``tau[t] = model_t - base``). The
    counting passes then read those arrays directly, and ``x`` is never materialized.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) for the
    trim step this selection serves.
    """
    x = jnp.asarray(x)
    T = x.shape[0]
    k = jnp.broadcast_to(jnp.asarray(k), (T,))
    if x.size == 0:
        return jnp.zeros(x.shape, jnp.float32), jnp.zeros(x.shape, bool)
    if rebuild is None:
        xs = _rows_fn(jnp.asarray(x, jnp.float32))
    else:
        xs = lambda g: [jnp.asarray(r, jnp.float32) for r in rebuild(g)]
    v, cut = _row_thresholds(xs, k, magnitude)
    x = jnp.asarray(x, jnp.float32)
    # Per row and in x's shape (no reshape of the stack), so that XLA folds a consumer's x[t] into
    # this row's expression and fuses everything from the inputs of x to the consumer.
    masks = [_threshold_mask(x[t], v[t], cut[t], magnitude) for t in range(T)]
    kept = jnp.stack([jnp.where(mt, x[t], np.float32(0)) for t, mt in enumerate(masks)])
    return kept, jnp.stack(masks)


def topk_thresholds_rows(x: Float[Array, "T *shape"], k: int | Int[Array, "T"] | Int[Array, "P T"], *,
                         magnitude: bool = False,
                         rebuild: Callable[[Callable[[Any], Any]], Sequence[Shaped[ArrayLike, "*shape"]]] | None = None,
                         kth: bool = False) -> tuple[Int[Array, "*P T"], ...]:
    """The per-row thresholds ``(v, cut)`` behind :func:`topk_keep_rows`'s mask, for a consumer that applies it
    itself (the fused TIES kernel, :func:`jmerge.kernels.masked_merge`).

    Row ``t`` keeps the entries whose int32 order key (of ``|x|`` with ``magnitude``: ``min(bits(|x|),
    bits(inf))``) is above ``v[t]``, and those equal to ``v[t]`` at flat (row-major) positions below
    ``cut[t]``: exactly the mask of :func:`topk_keep_rows` / :func:`topk_mask_rows` (same search, same ties).
    ``rebuild`` as in :func:`topk_keep_rows`.

    ``k`` of shape ``(P, T)`` asks for ``P`` counts per row (e.g. Breadcrumbs' two cuts, quartiles): the
    results are ``(P, T)``, equal to ``P`` separate calls, and the ``P`` searches of a row share its counting
    passes (each pass reads the row once for all of them).

    ``kth``: also return each k-th largest key where the search ended on it, else ``INT32_MIN`` (pass it to
    :func:`threshold_values`, which then reads no row when every one is known).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) for the
    trim step this selection serves.
    """
    x = jnp.asarray(x)
    k = jnp.asarray(k)
    k = k if k.ndim == 2 else jnp.broadcast_to(k, (x.shape[0],))
    if rebuild is None:
        xs = _rows_fn(jnp.asarray(x, jnp.float32))
    else:
        xs = lambda g: [jnp.asarray(r, jnp.float32) for r in rebuild(g)]
    return _row_thresholds(xs, k, magnitude, kth)


def threshold_mask(row: Float[Array, "*shape"], v: Int[Array, ""], cut: Int[Array, ""], *,
                   magnitude: bool = False) -> Bool[Array, "*shape"]:
    """The top-k mask of one row from its thresholds ``(v[t], cut[t])`` of :func:`topk_thresholds_rows`:
    the entries whose order key is above ``v``, and those equal to ``v`` at flat positions below ``cut``.
    Elementwise in ``row``, so XLA fuses it into its consumers.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) for the
    trim step this selection serves.
    """
    return _threshold_mask(jnp.asarray(row, jnp.float32), v, cut, magnitude)


def threshold_word(row: Float[Array, "*shape"], v: Int[Array, ""], cut: Int[Array, ""], *,
                   magnitude: bool = False) -> Int[Array, "*shape"]:
    """:func:`threshold_mask` as an int32 word (``-1`` kept, ``0`` dropped) computed without compares,
    for a row whose order keys are nonnegative: ``magnitude=True``, or ``row >= 0`` (NaN allowed).
    ``bitcast(bitcast(y, int32) & word, float32)`` is ``where(mask, y, 0.0)`` bit for bit. For masks
    shared by several sums of one reduction (XLA:CPU vectorizes this word, not a shared compare).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) for the
    trim step this selection serves.
    """
    return _threshold_word(jnp.asarray(row, jnp.float32), v, cut, magnitude)


def threshold_values(rows: Sequence[Float[Array, "*shape"]] | Callable[[], Sequence[Float[Array, "*shape"]]],
                     k: Int[Array, "R"], v: Int[Array, "R"],
                     cut: Int[Array, "R"], kth: Int[Array, "R"] | None = None) -> Float[Array, "R"]:
    """The ``k[j]``-th largest value of each row, from the row's thresholds ``(v[j], cut[j])`` of
    :func:`topk_thresholds_rows` for that ``k`` (not ``magnitude``): the smallest value the row keeps.

    NaN ranks above ``+inf`` (as in a sort: the value is NaN when ``k`` is at most the row's NaN count);
    ``-0.0`` reads ``+0.0``; ``k <= 0`` gives ``+inf``. Kept entries tied at ``v`` (``cut > 0``) all have
    the key ``v``; otherwise one reduction finds the smallest key above ``v`` (and counts the NaNs), for
    every row at once, in integer arithmetic: XLA:CPU's float ``min`` reduction is not vectorized (three
    masked minima over a ``(1024, 2816)`` leaf: 22-34 ms as floats, 1.8 ms as int32 keys). ``rows`` may
    be the same values written in another form than the caller's (e.g. ``|b - m|`` for ``|m - b|``), so
    that XLA does not write an expression both passes share, or a function returning them. ``kth`` (from
    :func:`topk_thresholds_rows`): where every row's k-th key is known and below the key of ``+inf`` (which
    NaN shares), the values are those keys' floats, the same the pass finds, and the rows are not read (built
    inside the conditional when ``rows`` is a function, so that they are not written for it).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) for the
    selection whose thresholds these are.
    """
    k, v, cut = (jnp.asarray(a, jnp.int32) for a in (k, v, cut))
    if kth is not None:
        kth = jnp.asarray(kth, jnp.int32)
        return lax.cond(jnp.all((kth != _I32_MIN) & (kth < _INF_KEY)),
                        lambda: _key_floats(kth), lambda: threshold_values(rows, k, v, cut))
    rows = rows() if callable(rows) else rows
    ops, inits = [], []
    for j, x in enumerate(rows):
        keys = _keys(x)
        ops.append(jnp.where(keys > v[j], keys, _I32_MAX))  # the smallest key above v
        bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32) & _ABS
        ops.append((_INF_KEY - bits) >> 31)  # -1 for a NaN
        inits += [_I32_MAX, np.int32(0)]
    ax = tuple(range(jnp.ndim(rows[0])))
    red = lax.reduce(tuple(ops), tuple(inits), lambda a, b: tuple(a[i] + b[i] if i % 2 else jnp.minimum(a[i], b[i])
                                                                  for i in range(len(a))), ax)
    above, nans = jnp.stack(red[0::2]), -jnp.stack(red[1::2])
    key = jnp.where((cut > 0) & (v >= _NEG_INF_KEY), v, above)  # v below every key: k >= n keeps all
    val = _key_floats(key)
    val = jnp.where((k <= 0) | (key == _I32_MAX), np.float32(np.inf), val)
    return jnp.where((k > 0) & (k <= nans), np.float32(np.nan), val)


def topk_mask(x: Float[Array, "*shape"], k: int | Int[Array, ""]) -> Bool[Array, "*shape"]:
    """Mask of the ``k`` largest entries of ``x`` (flattened), exact and without a full sort.

    Args:
      x: array of any shape; compared as float32 (``-0.0 == 0.0``; NaN counts as the largest).
        Usually ``|tau|``.
      k: number of entries to keep: a Python int or a traced integer scalar (no recompile when it
        changes). ``k <= 0`` keeps nothing, ``k >= x.size`` keeps everything.

    Returns:
      A bool array of ``x``'s shape with exactly ``clip(k, 0, x.size)`` True entries; among equal
      values the lowest flat indices are kept.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023) (the trim step this selection serves).
    """
    x = jnp.asarray(x)
    if x.size == 0:
        return jnp.zeros(x.shape, bool)
    k = jnp.asarray(k)
    if k.ndim != 0:
        raise MergeInputError(f"topk_mask: k must be a scalar, got shape {k.shape}; use topk_mask_rows "
                              "for one k per row.")
    return _topk_rows(x[None], k.reshape(1))[0]  # rows keep their shape (sharding)


def topk_mask_rows(x: Float[Array, "T *shape"], k: int | Int[Array, "T"], *,
                   magnitude: bool = False) -> Bool[Array, "T *shape"]:
    """Per-row :func:`topk_mask`: row ``t`` of ``x`` (shape ``(T, ...)``) keeps its ``k[t]`` largest.

    Args:
      x: array of shape ``(T, ...)``; each ``x[t]`` is flattened and selected separately.
      k: integer scalar or ``(T,)`` array (may be traced).
      magnitude: rank ``|x|`` instead of ``x`` (cheaper than passing ``jnp.abs(x)``).

    Returns:
      A bool array of ``x``'s shape.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise MergeInputError("topk_mask_rows: x must have a leading row axis (T, ...); got a scalar.")
    T = x.shape[0]
    k = jnp.asarray(k)
    if k.ndim > 1 or (k.ndim == 1 and k.shape[0] != T):
        raise MergeInputError(f"topk_mask_rows: k must be a scalar or shape ({T},), got shape {k.shape} "
                              f"for x of shape {x.shape}.")
    k = jnp.broadcast_to(k, (T,))
    if x.size == 0:
        return jnp.zeros(x.shape, bool)
    return _topk_rows(x, k, magnitude)  # rows keep their shape (sharding)


# ---------------------------------------------------------------------------------------------
# Global (whole-model) top-k per task.

def _leaf_rows(tau: jax.Array) -> jax.Array:
    """``tau`` (T, *shape) in its own shape, with at least one axis after the row axis (not flattened:
    flattening a leaf sharded on a later axis would gather it)."""
    return tau if tau.ndim > 1 else tau.reshape(tau.shape[0], 1)


def _abs_u(tau: jax.Array) -> jax.Array:
    """(T, *shape) uint32 order keys of |tau| (non-negative floats: the bit pattern is monotone)."""
    return lax.bitcast_convert_type(_keys(_leaf_rows(tau), True), jnp.uint32)


def _count_leaf(b: jax.Array) -> jax.Array:
    """True entries per row of a (R, *shape) bool array, counted in its own shape (over blocks of the
    last axis first when they divide it, see :func:`_block_counts`): a sharded array is counted where it
    lives and only (R,) counts cross devices."""
    if b.ndim <= 2:
        return _count_rows(b.reshape(b.shape[0], -1))
    b = b.astype(jnp.int32)
    if b.shape[-1] % _width(b.shape[-1]) == 0:
        main, _ = _blocks(b)
        b = jnp.sum(main, axis=main.ndim - 1, dtype=jnp.int32) & np.int32(2 * _W - 1)
    return jnp.sum(b, axis=tuple(range(1, b.ndim)), dtype=jnp.int32)


def _hist_rows(bins: jax.Array, nbins: int) -> jax.Array:
    """Per-row histogram of int32 ``bins`` (R, *shape) in [0, nbins]; bin ``nbins`` is dropped."""
    R = bins.shape[0]
    # One flat index per entry (row-major bins): XLA:CPU's scatter-add is ~40% faster with a 1-D
    # index than with (row, bin) pairs. The indices keep the leaf's shape (not flattened): a sharded
    # leaf scatters its shard into a histogram of its own, and only the histograms are summed.
    flat = bins + jnp.arange(R, dtype=jnp.int32).reshape((R,) + (1,) * (bins.ndim - 1)) * np.int32(nbins + 1)
    hist = jnp.zeros((R * (nbins + 1),), jnp.int32).at[flat].add(1, mode="drop")
    return hist.reshape(R, nbins + 1)[:, :nbins]


def _boundary(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Highest bin b with (#above b + hist[b]) >= k, and #above b (host, int64)."""
    above = np.cumsum(hist[::-1])[::-1] - hist
    b = int(np.sum(above + hist >= k)) - 1
    b = min(max(b, 0), hist.size - 1)
    return b, int(above[b])


_G_PASSES = 7  # counting phases before the histogram fallback
_G_READ = 1 << 18  # at most this many entries of a task's bracket (all leaves) are read out
_G_SAMPLE = 4096  # sampled entries per leaf and task (at most 1/32 of the leaf)
_G_CS0 = np.array([-7.0, -4.0, -2.2, -1.0, -0.3, 0.3, 1.0, 2.2, 4.0, 7.0])  # first thresholds, in sample sigmas
# ... where the next phase can read the bracket out (unsharded leaves): one packed count, ~0.65x the time of two. Each
# bracket between them should fit the read-out (at most 1.5 errors: ~0.14% of the entries on bench_methods.py's tree
# at density 0.2; checked on the sample first, _GSearch.fits_read_out), and the k-th key falls outside them in ~2% of
# searches (see _GSearch.after_miss)
_G_CS0_READ = np.array([-2.3, -0.8, 0.0, 0.8, 2.3])
_G_FIT = 0.9  # the five first thresholds are taken when the sample puts each bracket within this share of the read-out
# after a miss of the first thresholds, the next at 1 + (these - 1) times the outermost's errors (at least 1) beyond it
_G_CS_MISS = np.array([1.12, 1.3, 1.5, 1.75, 2.1, 2.5, 3.1, 4.0, 5.2, 7.0])
_G_CS = np.array([-3.5, -2.0, -1.1, -0.5, -0.15, 0.15, 0.5, 1.1, 2.0, 3.5])  # later thresholds, in expected errors
_G_J = 2 * _J  # thresholds per counting phase (two packed counts)
_G_TIED = 3  # sampled keys counted (at x and x + 1) for a bracket whose sampled keys repeat
_G_KEEP = np.array([0, _G_J - 1, 3, 6, 4, 5, 2, 7, 1, 8])  # interpolated thresholds by priority (snaps, centre)
_G_CARRY: dict[int, dict] = {}  # host state of running searches, by token (a few at a time)
_G_TOKENS = iter(range(1, 2 ** 31 - 1))


def _g_source(state: MergeState):
    """``guard -> rows`` of the leaf's task vectors in their own shape. Called inside a conditional: while
    ``tau`` is ``models - base`` the rows are rebuilt from the inputs there (a conditional's closure would
    otherwise take ``tau`` as an operand, materialized), and each row is counted by its own reduction."""
    rebuild = state.tau_rebuild()
    if rebuild is not None:
        src = lambda g: [jnp.asarray(r, jnp.float32) for r in rebuild(g)]
    else:
        src = lambda g: [jnp.asarray(g(state.tau)[t], jnp.float32) for t in range(state.tau.shape[0])]
    return lambda g: [r if r.ndim else r.reshape(1) for r in src(g)]


def _g_count(state: MergeState, prev, read: bool = True) -> dict:
    """Counts ``#{key >= ts}`` at the ``_G_J`` thresholds of ``prev`` and the snaps per task (one read).

    When ``prev["read"]`` (the host found every leaf's entries in the bracket ``lo <= key < hi`` of each open task
    within the leaf's :func:`_read_capacity`) and the call's leaves are not sharded (:func:`_read_allowed`), the
    same read gives those entries' keys instead (:func:`_read_out`), from which the host ends the searches: such a
    phase counts nothing (its counts and snaps are neutral; it flags the bracket's entries per block, about 0.55x
    the cost of the counts), since the host knows every leaf's entries in the bracket and each fits its capacity, so the
    read-out holds them all. ``read`` False: no read-out in this phase's program (the first counting phase,
    whose bracket is the whole model), and no snaps: from the whole range they are the extreme keys, which rarely
    end a search (a third of the phase's work); the no-information values it returns instead (``hi - 1``,
    ``lo + 1``) move no end in :meth:`_GSearch.narrow`.

    Marks: the first phase, asked for them (``"mark"`` in ``prev``: unsharded leaves, statistics kept on the device),
    also returns, per task and block, which intervals between its neighbouring thresholds (ascending) hold entries
    (bit ``j``: ``ts[j] <= key < ts[j + 1]``, the difference of two fields of the block sums it adds anyway,
    :func:`_interval_marks`). When the host's bracket after it is a run of those intervals (``prev["marked"]``, their
    bits per task in ``prev["mark_mask"]``), the read-out phase after it finds its blocks from the marks instead of a
    pass flagging them, and reads only those blocks, not the whole leaf (the same blocks, so the same keys): on a
    ``(1024, 2816)`` leaf's three rows 1.05 ms instead of 1.9 ms (the flags' compaction 0.24 ms, the gather 0.47 ms,
    the bracket's compaction 0.34 ms)."""
    T = state.tau.shape[0]
    snaps = read
    ts, lo, hi = (jnp.asarray(prev[a], jnp.int32) for a in ("ts", "lo", "hi"))
    src = _g_source(state)
    n = state.tau[0].size
    C = _read_capacity(n) if read and n and _read_allowed() else 0
    mark = "mark" in prev  # this (first) phase returns its marks (zeros when it skips)
    marked = read and "marks" in prev  # this phase may read out the blocks the last phase's marks give
    main, tail = jax.eval_shape(lambda: _blocks(jnp.zeros((1,) + (state.tau.shape[1:] or (1,)), jnp.float32)))
    nb = int(np.prod(main.shape[:-1]))  # a row's blocks

    def flagged(marks: bool):  # the bracket's blocks, from the marks or from a pass flagging them: (T, C), (T,)
        if marks:
            m = jnp.asarray(prev["marks"])
            return _flagged_blocks(m.reshape(T, nb) & jnp.asarray(prev["mark_mask"], m.dtype)[:, None], C)
        return _flagged_blocks(jnp.concatenate([f.reshape(1, nb) for f in _bracket_blocks(src(lambda a: a), lo, hi)]), C)

    def run(read):
        if read:  # read-only: the bracket's entries per block and the read-out, no counts (see above)
            if marked:  # the pass rebuilds the rows in its own branch (a closure would take them as operands)
                idx, cnt = lax.cond(jnp.asarray(prev["marked"]), lambda: flagged(True), lambda: flagged(False))
            else:
                idx, cnt = flagged(False)
            parts = [_read_out(r, idx[t:t + 1], cnt[t:t + 1]) for t, r in enumerate(src(lambda a: a))]
            out = _compact_bracket(*(jnp.concatenate(z) for z in zip(*parts)), lo, hi)
        else:  # every task vector's counts in one reduction (the base read once)
            rows = src(lambda a: a)
            out = _count_pass_rows([r[None] for r in rows], ts, lo, hi, True, snaps=snaps, sums=mark)
            if mark:
                out = out[:3] + (_interval_marks(out[3], ts.shape[1]),)
        return (uncounted() + no_marks() + out) if read else (out + no_read())

    def uncounted():  # the counts and snaps of a phase that read out (or skipped): neutral values
        return jnp.zeros((T, ts.shape[1]), jnp.int32), jnp.full((T,), _I32_MIN), jnp.full((T,), _I32_MAX)

    def no_read():  # the read-out's outputs, empty (the branches of a conditional agree)
        if not C:
            return ()
        return (jnp.zeros((T, C), jnp.int32), jnp.zeros((T,), jnp.int32),
                jnp.zeros((T, tail.shape[-1]), jnp.int32))

    def no_marks():  # a phase that reads out or skips counts nothing: no marks
        return (jnp.zeros((T,) + main.shape[1:-1], _mark_dtype(ts.shape[1])),) if mark else ()

    def skip():
        return uncounted() + no_marks() + no_read()

    if state.tau.size == 0:
        res = skip()
    elif C:
        res = lax.cond(jnp.asarray(prev["run"]),
                       lambda: lax.cond(jnp.asarray(prev["read"]), lambda: run(True), lambda: run(False)), skip)
    else:
        res = lax.cond(jnp.asarray(prev["run"]), lambda: run(False), skip)
    out = {"counts": res[0], "below": res[1], "above": res[2], "token": jnp.asarray(prev["token"])}
    if mark:
        out["marks"] = res[3]
    if C:  # the read-out's outputs are zeros unless the host asked for it (and the phase ran)
        out.update(zip(("read_keys", "read_blocks", "read_tail"), res[3 + mark:]))
        out["read_done"] = jnp.asarray(prev["read"]) & jnp.asarray(prev["run"]) & (state.tau.size > 0)
    return out


def _mark_dtype(J: int):
    """The marks' dtype for ``J`` thresholds: a bit per interval between neighbours."""
    return jnp.uint8 if J <= 9 else jnp.uint16


def _interval_marks(sums: Sequence[Sequence[jax.Array]], J: int) -> jax.Array:
    """From each row's packed block sums at ``J`` ascending thresholds (:func:`_count_pass_rows` with ``sums``),
    per block the intervals between neighbouring thresholds that hold entries: bit ``j`` set when
    ``ts[j] <= key < ts[j + 1]`` for some entry (field ``j`` exceeds field ``j + 1``). ``(R, *lead, blocks)``, a bit
    per interval (:func:`_mark_dtype`)."""
    dt = _mark_dtype(J)
    out = []
    for words in sums:
        f = [_field(words[j // _J], j % _J) for j in range(J)]
        out.append(sum(((f[j] > f[j + 1]).astype(dt) << dt(j)) for j in range(J - 1)).astype(dt))
    return jnp.concatenate(out)


def _bracket_blocks(rows: Sequence[jax.Array], lo: jax.Array, hi: jax.Array) -> list[jax.Array]:
    """Per row (a leaf's task vectors, each in its own shape), its entries with ``lo[t] <= key(|x|) < hi[t]`` per
    block of :func:`_blocks`' main part, ``(1, *lead, blocks)`` each: the ``inside`` output of :func:`_count_pass`
    alone (a subtraction and an unsigned compare per entry instead of ten packed threshold counts and two snaps),
    every row's in one reduction (rows computed from shared inputs read them once: the base)."""
    mains = [_blocks(r[None])[0] for r in rows]
    if not mains[0].size:
        return [jnp.zeros(m.shape[:-1], jnp.int32) for m in mains]
    # lo <= key < hi as one unsigned compare of key - lo (keys below lo wrap past hi - lo)
    ops = tuple((_u32(_keys(m, True) - lo[t]) < _u32(hi[t] - lo[t])).astype(jnp.int32) for t, m in enumerate(mains))
    return list(lax.reduce(ops, (np.int32(0),) * len(ops), lambda a, b: tuple(x + y for x, y in zip(a, b)),
                           (mains[0].ndim - 1,)))


def _read_capacity(n: int) -> int:
    """Blocks of a leaf of ``n`` entries (per task) that a counting phase can read out: 1/512 of its entries'
    count (the whole-model bracket after the first phase holds about 1e-4 to 1e-3 of all entries), at least 16."""
    return max(16, n >> 9)


def _read_allowed() -> bool:
    """Whether this call may gather a leaf's entries (the read-out of :func:`_g_count`): only where the caller raised
    the whole-sort limit, which declares the leaves unsharded (:func:`whole_sort_limit`; ``jmerge.merge`` and the
    out-of-core executor do for one-device / replicated leaves). A sharded leaf keeps to counting (no gather)."""
    return _sort_max() > _SORT_MAX


def _first_true(mask: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """Per row of the bool ``mask`` (R, L), the indices of its first ``K`` True entries in order (slots past their
    number hold -1) and that number: ``(R, K)``, ``(R,)`` int32 (``jnp.nonzero(row, size=K)`` per row).

    The mask is packed 32 entries to a uint32 word; from a prefix sum of the words' population counts (L / 32
    entries) each True entry's word is found, and its bit by halving the word five times (population counts of the
    lower halves). Each word holding set bits writes its index into the slot of its first one (the exclusive prefix
    sum; slots from ``K`` up are dropped), and a running maximum over the slots fills those of its later bits:
    1.4-2x faster than a binary search of the prefix sums per slot (``jnp.searchsorted``: ~12 dependent gathers
    each). XLA:CPU's prefix sum (a windowed reduction) costs ~16 adds per
    entry, so summing words instead of entries makes this 3-5x faster than a prefix sum of the mask (a
    ``(3, 90112)`` mask, K = 1024: 0.17 against 0.86 ms with a binary search per slot; ``(3, 32773)``, K = 2048:
    0.24 against 0.72 ms for ``jnp.nonzero``)."""
    R, L = mask.shape
    nw = -(-L // 32)
    m = jnp.pad(mask, ((0, 0), (0, nw * 32 - L))).reshape(R, nw, 32).astype(jnp.uint32)
    # sums of distinct bits: the words
    words = jnp.sum(m << lax.broadcasted_iota(jnp.uint32, m.shape, 2), axis=2, dtype=jnp.uint32)
    pc = lax.population_count(words).astype(jnp.int32)
    cs = lax.associative_scan(jnp.add, pc, axis=1)  # (jnp.cumsum: a windowed reduction on XLA:CPU, ~3x slower)
    ex = cs - pc  # set bits before each word
    iw = lax.broadcasted_iota(jnp.int32, words.shape, 1)
    dest = jnp.where(pc > 0, ex, np.int32(K) + iw)  # distinct slots; words without set bits: past K (dropped)
    slots = jax.vmap(lambda d, i: jnp.zeros((K,), jnp.int32).at[d].set(i, mode="drop", unique_indices=True))(dest, iw)
    wi = lax.associative_scan(jnp.maximum, slots, axis=1)  # the word of each slot's set bit (lax.cummax: ~6x slower)
    q = jnp.arange(1, K + 1, dtype=jnp.int32)
    r = q[None] - jnp.take_along_axis(ex, wi, 1)  # its rank in the word
    w = jnp.take_along_axis(words, wi, 1)
    bit = jnp.zeros(w.shape, jnp.uint32)
    for step in (16, 8, 4, 2, 1):  # the r-th set bit: in the upper half of the window when r exceeds the lower's
        c = lax.population_count((w >> bit) & np.uint32((1 << step) - 1)).astype(jnp.int32)
        up = r > c
        bit = bit + jnp.where(up, np.uint32(step), np.uint32(0))
        r = r - jnp.where(up, c, 0)
    cnt = cs[:, -1]
    return jnp.where(q[None] <= cnt[:, None], wi * np.int32(32) + bit.astype(jnp.int32), np.int32(-1)), cnt


def _flagged_blocks(flags: jax.Array, C: int) -> tuple[jax.Array, jax.Array]:
    """Per row of the block counts ``flags`` (R, nb), the flat indices of the first ``C`` blocks holding any entry
    (slots past their number repeat the last block) and that number: ``(R, C)``, ``(R,)``
    (:func:`_first_true` of the flags)."""
    R, nb = flags.shape
    if nb == 0:
        return jnp.zeros((R, C), jnp.int32), jnp.zeros((R,), jnp.int32)
    idx, cnt = _first_true(flags > 0, C)
    return jnp.where(idx < 0, np.int32(nb - 1), idx), cnt


def _read_out(row: jax.Array, idx: jax.Array, cnt: jax.Array):
    """The keys of a row's blocks ``idx`` (``(1, C)`` flat indices into :func:`_blocks`' main part, from
    :func:`_flagged_blocks`: the first ``C`` blocks holding entries of the bracket, slots past their number ``cnt``
    any valid block), that number, and the keys of the tail (fewer entries than a block, returned whole):
    ``(1, C, w)``, ``(1,)``, ``(1, tail)``. The gather reads only those blocks of the inputs."""
    main, tail = _blocks(row[None])
    w = main.shape[-1]
    nb = int(np.prod(main.shape[:-1]))
    if nb == 0:
        return jnp.zeros((1, idx.shape[1], w), jnp.int32), jnp.zeros((1,), jnp.int32), _keys(tail, True)
    keys = _keys(main.reshape(nb, w)[idx[0]], True)
    return keys[None], cnt, _keys(tail, True)


def _compact_bracket(keys: jax.Array, nblocks: jax.Array, tail: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple:
    """The read-out's keys (``(T, C, w)`` blocks, the first ``nblocks`` of each row valid) reduced to those in the
    bracket ``lo <= key < hi``, in flat order: ``(T, C)`` (junk past the number), their number ``(T,)``, and the tail
    as given. The host checks that number against the counts; a leaf's bracket holds at most ``C`` entries when it
    reads out (:meth:`_GSearch.readable`), so the host sorts through the bracket's keys alone, not every key of
    their blocks (~30x as many: most flagged blocks hold one key of the bracket)."""
    T, C, w = keys.shape
    valid = jnp.arange(C, dtype=jnp.int32)[None, :, None] < nblocks[:, None, None]
    inb = valid & (_u32(keys - lo[:, None, None]) < _u32(hi - lo)[:, None, None])
    idx, cnt = _first_true(inb.reshape(T, C * w), C)
    return jnp.take_along_axis(keys.reshape(T, C * w), jnp.maximum(idx, 0), 1), cnt, tail


class _GSearch:
    """Host state of one global top-k search per task: the bracket ``lo <= v < hi`` with its counts
    (in total and per leaf), as :func:`_narrow` / :func:`_next_thresholds` keep it per row, in int64."""

    def __init__(self, ks, sizes):
        self.ks = np.asarray(ks, np.int64)
        self.sizes = np.asarray(sizes, np.int64)  # (L,)
        T, L = self.ks.size, self.sizes.size
        self.lo = np.zeros(T, np.int64)  # G(0) = total (keys of |tau| are >= 0)
        self.hi = np.full(T, int(_TOP), np.int64)  # G(_TOP) = 0
        self.glo_i = np.tile(self.sizes[:, None], (1, T))  # (L, T)
        self.ghi_i = np.zeros((L, T), np.int64)
        self.even = np.zeros(T, bool)
        total = int(self.sizes.sum())
        self.active = (self.ks > 0) & (self.ks < total)
        self.samples: dict[int, tuple] = {}  # per task: sampled keys, their leaves, the leaves' weights
        self.spread: dict[int, tuple[int, float]] = {}  # per task: k and the sample's error in G at k (entries)
        self.edges = (float(_G_CS0[0]), float(_G_CS0[-1]))  # the first thresholds' outermost, in those errors
        self.no_read = False  # set when a read-only phase left a search open: later phases count
        self._sorted: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # keys, cumulative weights, leaves

    def done(self) -> np.ndarray:
        glo = self.glo_i.sum(0)
        return ~self.active | (glo == self.ks) | (self.hi - self.lo <= 1)

    def narrow(self, ts, counts_i, below, above):
        """``ts`` (T, J); ``counts_i`` (L, T, J) per leaf; snaps (T,) over all leaves."""
        run = ~self.done()
        for t in np.flatnonzero(run):
            k = self.ks[t]
            G = counts_i[:, t, :].sum(0)
            lo, hi = self.lo[t], self.hi[t]
            m_old = self.glo_i[:, t].sum() - self.ghi_i[:, t].sum()
            ge = G >= k
            inside = (ts[t] > lo) & (ts[t] < hi)
            cand = np.flatnonzero(ge & inside)
            if cand.size:
                j = cand[np.argmax(ts[t, cand])]
                self.lo[t] = ts[t, j]
                self.glo_i[:, t] = counts_i[:, t, j]
            cand = np.flatnonzero(~ge & inside)
            if cand.size:
                j = cand[np.argmin(ts[t, cand])]
                self.hi[t] = ts[t, j]
                self.ghi_i[:, t] = counts_i[:, t, j]
            # The old bracket's keys above lo lie in [above, below] (see _narrow): a lower end the counts moved
            # rises to above, and hi drops to below + 1, their counts unchanged in every leaf.
            if lo < self.lo[t] < above[t] < self.hi[t]:
                self.lo[t] = above[t]
            if self.lo[t] <= below[t] < self.hi[t] - 1:
                self.hi[t] = below[t] + 1
            # No key lies in (lo, above): the k-th key is lo itself when that covers the bracket.
            if self.lo[t] == lo and above[t] >= self.hi[t]:
                self.hi[t] = lo + 1
            m = self.glo_i[:, t].sum() - self.ghi_i[:, t].sum()
            self.even[t] = 2 * m > m_old

    def next_thresholds(self, below, above) -> np.ndarray:
        T = self.ks.size
        ts = np.zeros((T, _G_J), np.int64)
        for t in range(T):
            lo, hi, k = self.lo[t], self.hi[t], self.ks[t]
            D = hi - lo
            if D <= 1:
                ts[t] = lo
                continue
            glo, ghi = self.glo_i[:, t].sum(), self.ghi_i[:, t].sum()
            if D <= _G_J + 1:
                off = np.arange(1, _G_J + 1)
            elif self.even[t] or glo - ghi <= 2 * _G_J:  # few entries left: no density to interpolate
                off = np.floor(D * np.arange(1, _G_J + 1) / (_G_J + 1))
            else:
                m = max(glo - ghi, 1)
                est = D * ((glo - k) + 0.5) / m
                err = 0.5 * D / np.sqrt(m) + 1.0
                off = np.round(est + err * _G_CS)
            ts[t] = lo + np.clip(off, 1, D - 1).astype(np.int64)
            # The smallest key above lo (the snap), else lo + 1: G(lo + 1) < k ends a search whose k-th key is
            # lo itself, heavily tied (bfloat16 task vectors), which interpolation would not reach soon.
            ts[t, 0] = above[t] if lo < above[t] < hi else lo + 1
            if lo < below[t] < hi:
                ts[t, -1] = below[t]
            tied = self._tied(t, glo, ghi)
            if tied.size:  # counted first; the snaps and the central interpolated keys fill the rest
                ts[t] = np.concatenate([tied, ts[t][np.sort(_G_KEEP[:_G_J - tied.size])]])
        return ts

    def _tied(self, t: int, glo: int, ghi: int) -> np.ndarray:
        """Up to ``2 * _G_TIED`` thresholds at sampled keys for a bracket whose sampled keys repeat (heavy ties), as
        :func:`_tied_thresholds` per row: the distinct sampled keys nearest the k-th key's estimated (weighted)
        position among the bracket's sampled keys, each counted at ``x`` and ``x + 1`` (``G(x) >= k > G(x + 1)``
        ends the search at ``x``). Empty when the sampled keys in the bracket are distinct, or when more than
        ``_G_TIED`` distinct sampled keys lie within the estimate's sampling error (float32 ``model - base``
        values: a lattice of many keys, each tied a few thousand times in a large bracket), where the pairs
        would rarely hold the k-th key and the interpolated thresholds narrow the bracket faster."""
        if t not in self.samples:
            return np.zeros(0, np.int64)
        sk, cw = self._sorted_sample(t)
        lo, hi, k = self.lo[t], self.hi[t], self.ks[t]
        a, b = np.searchsorted(sk, [lo, hi])
        if b - a < 2 or not np.any(sk[a + 1:b] == sk[a:b - 1]):
            return np.zeros(0, np.int64)
        w0 = cw[a - 1] if a else 0.0
        target = w0 + (cw[b - 1] - w0) * ((glo - k) + 0.5) / max(glo - ghi, 1)
        p = min(int(np.searchsorted(cw[a:b], target)), b - a - 1)  # the estimated rank among the sampled keys
        q = min(max(((glo - k) + 0.5) / max(glo - ghi, 1), 0.0), 1.0)
        sd = int(np.ceil(np.sqrt((b - a) * q * (1.0 - q)))) + 1  # its sampling error, in sampled keys
        if np.unique(sk[a + max(p - sd, 0):a + min(p + sd + 1, b - a)]).size > _G_TIED:
            return np.zeros(0, np.int64)  # more distinct keys within the error than pairs to count: interpolate
        keys = np.unique(sk[a:b])
        at = sk[a + p]  # the sampled key at the estimated rank
        c = int(np.clip(np.searchsorted(keys, at), 0, keys.size - 1))
        near = keys[np.argsort(np.abs(np.arange(keys.size) - c), kind="stable")][:_G_TIED]
        out = np.sort(np.concatenate([near, near + 1]))
        return out[(out > lo) & (out < hi)]

    def sample_thresholds(self, t: int, cs: np.ndarray) -> np.ndarray:
        """Task ``t``'s sampled keys at the estimated ``G = k + cs * sd`` (``sd`` the sample's error at k), ascending
        for ``cs`` descending."""
        up, cwu = self._sorted_sample(t)  # the one sort of the sample, read here from its high end
        down, cw = up[::-1], _weights_from_top(cwu)  # cw[j]: estimated #{key >= down[j]}
        kt, sd = self.spread[t]
        pos = np.searchsorted(cw, kt + cs * sd)  # from high G (low key) to low G
        return _distinct(np.clip(down[np.clip(pos, 0, up.size - 1)], 1, int(_INF_KEY)), up,
                         int(down[min(int(np.searchsorted(cw, kt)), up.size - 1)]))

    def after_miss(self, ts: np.ndarray, first: np.ndarray) -> np.ndarray:
        """``ts`` (the next thresholds) with those of a task whose k-th key fell outside the first phase's
        thresholds ``first`` (the sample's estimate off by more than their ``_G_CS0_READ`` errors; about 2% of searches)
        placed at sampled keys further out on that side (``_G_CS_MISS``: from 1.12 to 7 times the outermost's errors
        for the five of ``_G_CS0_READ``), where interpolating over a bracket that reaches an end of the key range would
        take several phases."""
        ts = ts.copy()
        for t in np.flatnonzero(~self.done()):
            lo, hi = self.lo[t], self.hi[t]
            below, above = hi <= first[t].min(), lo >= first[t].max()
            if t not in self.samples or not (below or above):
                continue
            c = self.edges[1] if below else self.edges[0]  # the first thresholds' outermost on that side
            step = max(abs(c), 1.0) * (_G_CS_MISS - 1.0)  # further out: a larger G below the thresholds, smaller above
            cs = (c + step)[::-1] if below else c - step  # descending: ascending keys
            cand = np.unique(self.sample_thresholds(t, cs))
            cand = cand[(cand > lo) & (cand < hi)]
            if cand.size:
                ts[t] = np.concatenate([cand, np.full(_G_J - cand.size, cand[-1])])[:_G_J]
        return ts

    def _sorted_sample(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Task ``t``'s sampled keys ascending and their cumulative weights (sorted once, for the first thresholds;
        later phases read them again for heavily tied brackets)."""
        if t not in self._sorted:
            sk, leaf, wl = self.samples[t]
            up, g = _sorted_keys(sk, leaf)
            self._sorted[t] = (up, np.cumsum(wl[g]), g)
        return self._sorted[t][:2]

    def fits_read_out(self, t: int, ts: np.ndarray, caps: np.ndarray) -> bool:
        """Whether each bracket between neighbouring thresholds ``ts`` (ascending) of task ``t`` is expected to fit the
        read-out (:meth:`readable`), estimated from the weighted sample: each leaf's share at most ``_G_FIT`` of its
        capacity ``caps``, the whole at most ``_G_FIT * _G_READ``. A leaf's share is its size times the fraction of
        the bracket among the sampled keys of all leaves of its size (a few sampled keys per leaf and bracket would
        be too noisy alone). Leaves that differ (an embedding's updates ten times smaller than the layers') can crowd
        their entries into one bracket."""
        self._sorted_sample(t)
        up, _, g = self._sorted[t]
        wl = self.samples[t][2]
        size, group = np.unique(self.sizes, return_inverse=True)
        drawn = np.bincount(group, weights=self.sizes / wl, minlength=size.size)  # sampled keys per size
        a = np.searchsorted(up, ts)
        for i0, i1 in zip(a[:-1], a[1:]):
            share = np.bincount(group[g[i0:i1]], minlength=size.size) / np.maximum(drawn, 1.0)
            est = share[group] * self.sizes
            if est.sum() > _G_FIT * _G_READ or np.any(est > _G_FIT * caps):
                return False
        return True

    def read_out(self, collected) -> None:
        """Ends every open search from the keys of its bracket read out by a counting phase (:func:`_g_count`):
        the k-th key is the ``(k - G(hi))``-th largest of them, and each leaf's counts at it follow. A search whose
        keys did not all come back (a leaf that could not read out: sharded) keeps its counting bracket."""
        if not all("read_keys" in c and bool(c["read_done"]) for c, n in zip(collected, self.sizes) if n):
            return
        L = len(collected)
        open_ = np.flatnonzero(~self.done())
        parts: dict[int, list] = {int(t): [] for t in open_}  # per task: every leaf's read keys, then their leaves
        sizes: dict[int, list] = {int(t): [] for t in open_}
        for c, n in zip(collected, self.sizes):
            if not n:
                for t in parts:
                    sizes[t].append(0)
                continue
            rk, rb, rt = np.asarray(c["read_keys"]), np.asarray(c["read_blocks"]), np.asarray(c["read_tail"])
            for t in parts:
                kk = rk[t, :int(rb[t])].reshape(-1)
                parts[t] += [kk, rt[t]]
                sizes[t].append(kk.size + rt[t].size)
        for t in parts:
            lo, hi = int(self.lo[t]), int(min(self.hi[t], int(_TOP)))
            glo, ghi = self.glo_i[:, t], self.ghi_i[:, t]
            keys = np.concatenate(parts[t]) if parts[t] else np.zeros(0, np.int32)
            # lo <= key < hi as one unsigned compare (keys and lo are >= 0: no overflow), over every leaf's keys at once
            sel = (keys - np.int32(lo)).view(np.uint32) < np.uint32(hi - lo)
            inside = keys[sel]
            leaf = np.repeat(np.arange(L, dtype=np.int32), sizes[t])[sel]  # the bracket's keys' leaves
            if np.any(np.bincount(leaf, minlength=L) != glo - ghi):
                continue  # not every key of the bracket came back (not read out this phase): keep counting
            r = int(self.ks[t] - ghi.sum())  # the k-th key is the r-th largest inside (G(lo) >= k > G(hi))
            v = int(np.partition(inside, inside.size - r)[inside.size - r])
            self.lo[t], self.hi[t] = v, v + 1
            self.glo_i[:, t] = ghi + np.bincount(leaf[inside >= v], minlength=L)
            self.ghi_i[:, t] = ghi + np.bincount(leaf[inside > v], minlength=L)

    def marked_intervals(self, counted: np.ndarray) -> np.ndarray | None:
        """Per task, the bits of the intervals between neighbouring thresholds ``counted`` (T, J, ascending: those of
        the phase that marked them) that make up its bracket ``[lo, hi)`` (:func:`_interval_marks`; 0 for a search
        that is done), or None when an open bracket is not a run of them (an end not one of those thresholds: a miss
        of the first phase, or a snap)."""
        mask = np.zeros(self.ks.size, np.dtype(_mark_dtype(counted.shape[1])))
        for t in np.flatnonzero(~self.done()):
            a, b = np.flatnonzero(counted[t] == self.lo[t]), np.flatnonzero(counted[t] == self.hi[t])
            if not a.size or not b.size or a[-1] >= b[0]:
                return None
            mask[t] = sum(1 << j for j in range(a[-1], b[0]))
        return mask

    def readable(self) -> bool:
        """Whether the next counting phase can read out the open searches' brackets: every leaf holds at most
        :func:`_read_capacity` entries of each (so at most that many blocks), and each bracket at most ``_G_READ``."""
        open_ = ~self.done()
        if not open_.any() or self.no_read:
            return False
        inside = (self.glo_i - self.ghi_i)[:, open_]  # (L, open)
        caps = np.array([_read_capacity(int(n)) for n in self.sizes], np.int64)
        return bool(inside.sum(0).max() <= _G_READ and np.all(inside.max(1) <= caps))

    def result(self, L):
        """Per leaf ``(v, quota, eq)`` (T,) each: keep ``key > v`` and the first ``quota`` of the leaf's
        ``eq`` entries equal to ``v`` (ties split in leaf order)."""
        T = self.ks.size
        total = int(self.sizes.sum())
        v = np.zeros(T, np.int64)
        quota = np.zeros((L, T), np.int64)
        eq = np.zeros((L, T), np.int64)
        for t in range(T):
            kt = int(self.ks[t])
            if kt <= 0:
                v[t] = int(_I32_MAX)
            elif kt >= total:
                v[t] = -1
            elif self.glo_i[:, t].sum() == kt:  # G(lo) == k: keep key >= lo, no ties to split
                v[t] = self.lo[t] - 1
            else:  # one key left: lo, with ties
                v[t] = self.lo[t]
                eq[:, t] = self.glo_i[:, t] - self.ghi_i[:, t]
                quota[:, t] = _split_ties(eq[:, t], kt - int(self.ghi_i[:, t].sum()))
        return v, quota, eq


def _sorted_keys(keys: np.ndarray, leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude keys (in ``[0, _INF_KEY]``) sorted ascending, with their ``leaf`` ids (non-negative, non-decreasing
    along ``keys``): the order of ``np.argsort(keys, kind="stable")`` up to the order of entries equal in key and
    leaf, which carry the same weight. One sort of (key, leaf) packed in int64: ~8x faster than the stable argsort
    on a whole-model sample (3.8 vs 29 ms for 300k keys)."""
    bits = max(int(leaf[-1]).bit_length(), 1) if leaf.size else 1
    packed = np.sort((np.asarray(keys, np.int64) << bits) | leaf)
    return packed >> bits, packed & ((1 << bits) - 1)


def _weights_from_top(cw: np.ndarray) -> np.ndarray:
    """From the cumulative weights ``cw`` of a sample sorted ascending, those of the same sample read from its
    largest key down (``up[::-1]``): ``out[j]`` estimates ``#{key >= up[-1 - j]}``. At the last entry of each run of
    equal keys these are the cumulative weights of the descending sort (``np.argsort(-keys, kind="stable")``), exactly
    when the weights are integers (a leaf's size over its sampled count, as a rule) and to rounding otherwise, so a
    ``searchsorted`` in them picks the same keys; the sample is sorted once for both directions."""
    return cw[-1] - np.concatenate([[0.0], cw[:-1]])[::-1]


def _distinct(ts: np.ndarray, sample: np.ndarray, centre: int) -> np.ndarray:
    """``ts`` (ascending keys) with repeated keys replaced by other sampled keys nearest ``centre``, ascending.

    With heavy ties (bfloat16 task vectors) the sample's order statistics around the expected k-th key are
    often one tied key; counting at distinct keys instead brackets the k-th key between neighbouring
    sampled keys, and ``centre + 1`` (``#{key > centre}``) ends the search in this one counting pass when
    ``centre``, tied, is the k-th key.
    """
    uniq = np.unique(ts)
    if uniq.size == ts.size:
        return ts
    if centre < int(_INF_KEY) and centre + 1 not in uniq:
        uniq = np.unique(np.append(uniq, centre + 1))
    keys = np.unique(np.clip(sample, 1, int(_INF_KEY)))
    keys = keys[~np.isin(keys, uniq)]
    i = int(np.searchsorted(keys, centre))
    lo, hi, extra = i - 1, i, []
    while len(extra) < ts.size - uniq.size and (lo >= 0 or hi < keys.size):  # nearest first, alternating
        if hi < keys.size and (lo < 0 or len(extra) % 2 == 0):
            extra.append(keys[hi])
            hi += 1
        else:
            extra.append(keys[lo])
            lo -= 1
    out = np.sort(np.concatenate([uniq, np.asarray(extra, np.int64)]))
    return np.concatenate([out, np.full(ts.size - out.size, out[-1], np.int64)])


def _g_put(carry: dict) -> int:
    while len(_G_CARRY) >= 64:  # abandoned searches (a merge that failed half-way)
        _G_CARRY.pop(next(iter(_G_CARRY)))
    token = next(_G_TOKENS)
    _G_CARRY[token] = carry
    return token


def _g_out(search: _GSearch, ts, token: int, L: int, mark: bool = False, marks: list | None = None,
           counted: np.ndarray | None = None) -> list:
    """The next counting phase's input per leaf: its thresholds, the brackets, whether it runs and reads out; ``mark``:
    ask the first phase for its marks (:func:`_g_count`); ``marks``: every leaf's marks from it (with the thresholds
    it ``counted``), passed on with the intervals that make up each open bracket (:meth:`_GSearch.marked_intervals`),
    from which a read-out finds its blocks."""
    run = bool(np.any(~search.done()))
    lo = jnp.asarray(search.lo.astype(np.int32))
    hi = jnp.asarray(np.minimum(search.hi, int(_TOP)).astype(np.int32))
    out = {"ts": jnp.asarray(ts.astype(np.int32)), "lo": lo, "hi": hi, "run": jnp.asarray(run),
           "token": jnp.asarray(np.int32(token))}
    read = run and search.readable()
    out["read"] = jnp.asarray(read)
    if mark:
        out["mark"] = jnp.asarray(True)
    if marks is None:
        return [out for _ in range(L)]
    mask = search.marked_intervals(counted) if read else None
    out["marked"] = jnp.asarray(mask is not None)  # else the read-out flags its blocks in a pass (a miss)
    out["mark_mask"] = jnp.asarray(mask if mask is not None else np.zeros(search.ks.size, np.dtype(marks[0].dtype)))
    return [dict(out, marks=m) for m in marks]


def global_topk_phases(name: str = "global_topk", density_key: str = "density",
                       rounding: Literal["round", "floor", "authors"] = "round") -> tuple[StatsPhase, ...]:
    """StatsPhases for a per-task top-k of ``|tau|`` over the whole model (all leaves together).

    Each task vector keeps ``round(density * N)`` entries, ``N`` its total size over all leaves;
    ``density`` is read from ``hp[density_key]`` (scalar or one per task, the same at every leaf).
    Ties at the threshold are broken by leaf order, then by flat index. Read the leaf's mask with
    :func:`global_topk_mask` in the update that follows.

    How: a strided sample of every leaf gives the first thresholds (five where the next phase can read the bracket
    out, else ten); each counting phase counts, per
    leaf and task, the entries at or above ten thresholds in one read (the packed counts of
    :func:`topk_mask_rows`), the host sums the counts and narrows the bracket of the k-th key (counts
    per leaf are kept, so tied entries are split in leaf order without another pass). On unsharded leaves a
    phase whose bracket fits reads its keys out instead and ends the search (right after the first phase, from
    the blocks that phase marked, where the statistics stay on the device). On smooth data
    the search ends within the counting phases; a search that has not (heavy ties) finishes with the
    radix histograms (65536 bins of the high, then of the low 16 bits of ``|tau|``). Phases with
    nothing left to do run an empty conditional. Only counts, snaps, samples, read-out keys and histograms leave
    the device.

    Args:
      name: stats name (the phases are ``name + "/sample"``, ``name + "/count<i>"``, ``name + "/hi"``
        and ``name``).
      density_key: hyperparameter holding the kept fraction.
      rounding: ``"round"`` keeps ``round(density * N)``, ``"floor"`` ``int(density * N)``, ``"authors"``
        ``int(density * N) + 1`` (at most ``N``), as the TIES authors' code.

    Returns:
      A tuple of :class:`StatsPhase` to pass as ``stats=`` to :func:`jmerge.transform`.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023) (trim over the whole model per task).
    """
    s_name, hi_name = name + "/sample", name + "/hi"
    c_names = [f"{name}/count{i}" for i in range(_G_PASSES)]
    prev_of = dict(zip(c_names, [s_name] + c_names[:-1]))

    def collect_sample(state: MergeState, hp):
        rows = _g_source(state)(lambda a: a)  # the rows the counting phases read
        n = rows[0].size
        target = min(_G_SAMPLE, max(n // 32, 1))
        keys = jnp.stack([_keys(_sample(r, target), True).reshape(-1) for r in rows]) if n else \
            jnp.zeros((len(rows), 0), jnp.int32)
        # whether the phase after the first can read its bracket out here (see _G_CS0_READ)
        return {"keys": keys, "n": jnp.int32(n), "read": jnp.asarray(not n or _read_allowed())}

    def finalize_sample(collected, hps):
        T, L = collected[0]["keys"].shape[0], len(collected)
        sizes = np.array([int(c["n"]) for c in collected], np.int64)
        total = int(sizes.sum())
        ks = _global_ks(hps, density_key, T, name, total, rounding)
        search = _GSearch(ks, sizes)
        keys = [np.asarray(c["keys"]) for c in collected]
        counts = np.array([kk.shape[1] for kk in keys], np.int64)
        wl = sizes / np.maximum(counts, 1)  # a sampled key's weight: its leaf's entries per sampled entry
        leaf = np.repeat(np.arange(L, dtype=np.int64), counts)
        allk = np.concatenate(keys, axis=1).astype(np.int64)  # (T, sampled entries of all leaves)
        kts = [min(max(int(ks[t]), 1), max(total, 1)) for t in range(T)]
        for t in range(T):
            if allk[t].size:
                search.samples[t] = (allk[t], leaf, wl)
        caps = np.array([_read_capacity(int(n)) for n in sizes], np.float64)
        # The five first thresholds where the next phase can read out and the sample expects each bracket between
        # them to fit (else, or on sharded leaves, the ten). Their errors come from the weighted sample's effective
        # size (leaves of different sizes weigh their keys differently: a 7B model's ~0.93M sampled keys count as
        # ~0.13M, and 2.3 errors from the plain count would be ~0.9 true ones); the ten spread over 7 errors keep the
        # plain count (their phases as before).
        read = all(bool(c.get("read", False)) for c in collected)
        for cs0 in ((_G_CS0_READ, _G_CS0) if read else (_G_CS0,)):
            n_eff = max(total ** 2 / max(float(np.sum(counts * wl ** 2)), 1.0), 1.0) if cs0 is _G_CS0_READ else \
                float(max(int(counts.sum()), 1))
            ts = np.zeros((T, cs0.size), np.int64)
            for t in range(T):
                if t not in search.samples:
                    ts[t] = np.arange(1, cs0.size + 1)
                    continue
                kt = kts[t]
                search.spread[t] = (kt, np.sqrt(kt * max(1.0 - kt / max(total, 1), 0.0) * total / n_eff) + 1.0)
                ts[t] = search.sample_thresholds(t, cs0[::-1])
            if cs0 is _G_CS0 or all(search.fits_read_out(t, ts[t], caps) for t in search.samples):
                break
        search.edges = (float(cs0[0]), float(cs0[-1]))
        token = _g_put({"search": search, "ts": ts})
        # the first phase's marks (the read-out's blocks, when the next phase reads out) where the statistics stay on
        # the device (jmerge.merge) and the leaves are not sharded: out of core every phase reads every tensor anyway,
        # and the host would hold the marks (T N / 32 bytes, twice that for ten thresholds). Later phases mark nothing:
        # their brackets often end at a snap or an older end, which no interval of theirs makes up.
        mark = read and isinstance(collected[0]["keys"], jax.Array)
        return _g_out(search, ts, token, L, mark=mark)

    def drop_marks(carry):  # the first phase's marks, once the phase after it ran or was skipped: memory freed, and
        # later programs (the merge's included) take the same arguments whichever way the search went
        for d in carry.pop("marked", ()):
            d.pop("marks", None)

    def finalize_count(collected, hps, last, first):
        token = int(collected[0]["token"])
        carry = _G_CARRY[token]
        drop_marks(carry)
        search, ts = carry["search"], carry["ts"]
        counts_i = np.stack([np.asarray(c["counts"], np.int64) for c in collected])  # (L, T, J)
        below = np.max([np.asarray(c["below"], np.int64) for c in collected], axis=0)
        above = np.min([np.asarray(c["above"], np.int64) for c in collected], axis=0)
        counted = ts  # the thresholds this phase counted (the first phase's ascending: its marks' intervals)
        if not np.all(search.done()):
            search.read_out(collected)
            if not any(bool(c.get("read_done", False)) for c in collected):  # a phase that read out counted nothing
                search.narrow(ts, counts_i, below, above)
                nts = search.next_thresholds(below, above)
                carry["ts"] = ts = search.after_miss(nts, ts) if first else nts
            elif not np.all(search.done()):  # a read-out that did not end every search (not expected: the host
                search.no_read = True  # checked the capacities): the next phase counts the same thresholds
        if last:
            return [{"fallback": jnp.asarray(bool(np.any(~search.done()))), "token": jnp.asarray(np.int32(token))}
                    ] * len(collected)  # one value for every leaf (no device array made per leaf)
        if first and "marks" in collected[0]:
            carry["marked"] = _g_out(search, ts, token, len(collected), marks=[c["marks"] for c in collected],
                                     counted=counted)
            return carry["marked"]
        return _g_out(search, ts, token, len(collected))

    def collect_hi(state: MergeState, hp):
        prev = state.stats[c_names[-1]]
        T = state.tau.shape[0]

        def run():
            u = _abs_u(jnp.stack(_g_source(state)(lambda a: a)))
            return _hist_rows((u >> 16).astype(jnp.int32), 65536)

        hist = lax.cond(jnp.asarray(prev["fallback"]), run, lambda: jnp.zeros((T, 65536), jnp.int32))
        return {"hist": hist, "fallback": prev["fallback"], "token": prev["token"]}

    def finalize_hi(collected, hps):
        fb = bool(collected[0]["fallback"])
        token = collected[0]["token"]
        T = collected[0]["hist"].shape[0]
        b1 = np.zeros(T, np.int32)
        if fb:
            hist = np.sum([np.asarray(c["hist"], np.int64) for c in collected], axis=0)  # (T, 65536)
            total = int(hist[0].sum())
            ks = _global_ks(hps, density_key, T, name, total, rounding)
            b1 = np.array([_boundary(hist[t], int(min(max(ks[t], 1), max(total, 1))))[0] for t in range(T)],
                          np.int32)
        return [{"b1": jnp.asarray(b1), "fallback": jnp.asarray(fb), "token": token}] * len(collected)

    def collect_lo(state: MergeState, hp):
        prev = state.stats[hi_name]
        T = state.tau.shape[0]
        b1 = prev["b1"]

        def run():
            u = _abs_u(jnp.stack(_g_source(state)(lambda a: a)))
            h = (u >> 16).astype(jnp.int32)
            b1c = b1.reshape((-1,) + (1,) * (h.ndim - 1))
            inbin = jnp.where(h == b1c, (u & np.uint32(0xFFFF)).astype(jnp.int32), 65536)
            return _hist_rows(inbin, 65536), _count_leaf(h > b1c)

        hist, above = lax.cond(jnp.asarray(prev["fallback"]), run,
                               lambda: (jnp.zeros((T, 65536), jnp.int32), jnp.zeros((T,), jnp.int32)))
        return {"hist": hist, "above": above, "n": jnp.int32(state.tau[0].size), "b1": b1,
                "fallback": prev["fallback"], "token": prev["token"]}

    def finalize_lo(collected, hps):
        carry = _G_CARRY.pop(int(collected[0]["token"]), None)
        L = len(collected)
        if not bool(collected[0]["fallback"]):
            v, quotas, eqs = carry["search"].result(L)
        else:
            v, quotas, eqs = _radix_result(collected, hps, density_key, name, rounding)
        vj = jnp.asarray(v.astype(np.int32))
        none = jnp.zeros(v.shape, jnp.int32)  # shared by the leaves without entries tied at v (most of them)
        as_j = lambda a: jnp.asarray(a.astype(np.int32)) if np.any(a) else none
        return [{"v": vj, "quota": as_j(quotas[i]), "eq": as_j(eqs[i])} for i in range(L)]

    # Skips (no pass over the inputs, out of core) once the search is done: the values the phases would give.
    def skip_count(so_far, hps, cn, last):
        token = int(so_far[0][prev_of[cn]]["token"])
        carry = _G_CARRY[token]
        if not np.all(carry["search"].done()):
            return None
        drop_marks(carry)
        if last:
            return [{"fallback": jnp.asarray(False), "token": jnp.asarray(np.int32(token))}] * len(so_far)
        if "done" not in carry:  # every later count phase is skipped with these same values
            carry["done"] = _g_out(carry["search"], carry["ts"], token, len(so_far))
        return carry["done"]

    def skip_hi(so_far, hps):
        prev = so_far[0][c_names[-1]]
        if bool(prev["fallback"]):
            return None
        T = _G_CARRY[int(prev["token"])]["search"].ks.size
        return [{"b1": jnp.zeros(T, jnp.int32), "fallback": jnp.asarray(False), "token": prev["token"]}] * len(so_far)

    def skip_lo(so_far, hps):
        prev = so_far[0][hi_name]
        if bool(prev["fallback"]):
            return None
        return finalize_lo([{"fallback": prev["fallback"], "token": prev["token"]} for _ in so_far], hps)

    phases = [StatsPhase(s_name, collect_sample, finalize_sample)]
    for i, cn in enumerate(c_names):
        last = i == _G_PASSES - 1
        phases.append(StatsPhase(cn, lambda state, hp, cn=cn, i=i: _g_count(state, state.stats[prev_of[cn]], i > 0),
                                 lambda collected, hps, last=last, i=i: finalize_count(collected, hps, last, i == 0),
                                 skip=lambda so_far, hps, cn=cn, last=last: skip_count(so_far, hps, cn, last)))
    phases += [StatsPhase(hi_name, collect_hi, finalize_hi, skip=skip_hi),
               StatsPhase(name, collect_lo, finalize_lo, skip=skip_lo)]
    return tuple(phases)


def _radix_result(collected, hps, density_key, name, rounding):
    """``(v, quota, eq)`` from the radix histograms (the fallback of :func:`global_topk_phases`)."""
    T = collected[0]["hist"].shape[0]
    hists = np.stack([np.asarray(c["hist"], np.int64) for c in collected])  # (L, T, 65536)
    hist = hists.sum(0)
    above = np.sum([np.asarray(c["above"], np.int64) for c in collected], axis=0)
    total = int(sum(int(c["n"]) for c in collected))
    b1 = np.asarray(collected[0]["b1"], np.int64)
    ks = _global_ks(hps, density_key, T, name, total, rounding)
    v = np.zeros(T, np.int64)
    quotas = np.zeros((len(collected), T), np.int64)
    eqs = np.zeros((len(collected), T), np.int64)
    for t in range(T):
        kt = int(ks[t])
        if kt <= 0:
            v[t] = int(_I32_MAX)  # nothing lies above it, and no quota
            continue
        if kt >= total:
            v[t] = -1  # every key of |tau| (>= 0) lies above it
            continue
        b2, above2 = _boundary(hist[t], kt - int(above[t]))
        v[t] = (int(b1[t]) << 16) | b2
        eqs[:, t] = hists[:, t, b2]
        quotas[:, t] = _split_ties(eqs[:, t], kt - int(above[t]) - above2)
    return v, quotas, eqs


def _split_ties(eq: np.ndarray, q: int) -> np.ndarray:
    """The ``q`` tied entries to keep, given to the leaves in order: per leaf at most its ``eq`` tied entries."""
    quota = np.zeros(eq.shape, np.int64)
    for i in range(eq.size):
        quota[i] = min(int(eq[i]), max(q, 0))
        q -= quota[i]
    return quota


def _global_ks(hps, key: str, T: int, name: str, total: int, rounding: str = "round") -> np.ndarray:
    n = _TENSOR_N.get()
    if n is not None:  # the leaves are chunks of one tensor (tensor_chunks)
        return tensor_topk_count(_global_density(hps, key, T, name), n, rounding)
    dens = _global_density(hps, key, T, name).astype(np.float64)
    x = dens * total
    if rounding == "round":
        return np.round(x).astype(np.int64)
    k = np.floor(x * (1.0 + 2.0 ** -21)).astype(np.int64)  # undo float32 error of density
    return np.minimum(k + 1, total) if rounding == "authors" else k


def _global_density(hps, key: str, T: int, name: str) -> np.ndarray:
    if not hps or key not in hps[0]:
        raise MergeInputError(f"global top-k '{name}' reads hyperparameter '{key}', which the method does not have.")
    vals = [np.broadcast_to(np.asarray(hp[key], np.float32), (T,)) for hp in hps]
    first = vals[0]
    for i, v in enumerate(vals[1:], 1):
        if not np.array_equal(v, first):
            raise MergeInputError(
                f"global top-k '{name}': '{key}' differs between leaves (leaf 0: {first.tolist()}, leaf {i}: "
                f"{v.tolist()}); a whole-model selection needs one {key} per task. Use a constant, or a "
                "per-tensor trim for per-layer values.")
    if np.any(first < 0) or np.any(first > 1) or not np.all(np.isfinite(first)):
        raise MergeInputError(f"global top-k '{name}': '{key}' = {first.tolist()} must lie in [0, 1].")
    return first


def global_topk_mask(state: MergeState, name: str = "global_topk") -> Bool[Array, "T *shape"]:
    """This leaf's ``(T, *shape)`` bool mask from :func:`global_topk_phases` statistics.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    if state.tau.size == 0:
        return jnp.zeros(state.tau.shape, bool)
    x = _leaf_rows(jnp.asarray(state.tau, jnp.float32))  # the leaf's own shape (sharding), flat order row-major
    v, cut = global_topk_thresholds(state, name)
    return _threshold_mask(x, v, cut, True).reshape(state.tau.shape)


def global_topk_keep(state: MergeState, name: str = "global_topk") -> tuple[Float[Array, "T *shape"], Bool[Array, "T *shape"]]:
    """``(where(mask, tau, 0), mask)`` for :func:`global_topk_mask`'s mask (float32 values), built per row
    like :func:`topk_keep_rows`: a consumer's ``kept[t]`` then folds into that row's expression, so XLA
    fuses the trim into the merge pass and never writes the stacked task vectors.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    tau = jnp.asarray(state.tau, jnp.float32)
    if tau.size == 0:
        return jnp.zeros(tau.shape, jnp.float32), jnp.zeros(tau.shape, bool)
    x = _leaf_rows(tau)  # the leaf's own shape (sharding), flat order row-major
    v, cut = global_topk_thresholds(state, name)
    masks = [_threshold_mask(x[t], v[t], cut[t], True).reshape(tau.shape[1:]) for t in range(tau.shape[0])]
    kept = jnp.stack([jnp.where(m, tau[t], np.float32(0)) for t, m in enumerate(masks)])
    return kept, jnp.stack(masks)


def global_topk_thresholds(state: MergeState, name: str = "global_topk") -> tuple[Int[Array, "T"], Int[Array, "T"]]:
    """This leaf's thresholds ``(v, cut)`` of :func:`global_topk_mask` (see :func:`topk_thresholds_rows`):
    row ``t`` keeps magnitude keys above ``v[t]`` and those equal to it at flat positions below ``cut[t]``.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    st = state.stats[name]
    v = jnp.asarray(st["v"], jnp.int32)
    quota = jnp.asarray(st["quota"], jnp.int32)
    eq = jnp.asarray(st["eq"], jnp.int32)  # entries equal to v per row, counted by the phases
    # The tie-cut conditional rebuilds the rows from the inputs (while tau is models - base): with tau as
    # its operand XLA would write the task vectors (and their stack) before every merge pass.
    return v, _tie_cuts(_g_source(state), v, quota, eq, True)
