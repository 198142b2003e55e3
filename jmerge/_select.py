"""Exact top-k selection by magnitude without a full sort.

Interface contract (other modules rely on it):

* ``topk_mask(x, k)``: bool mask of ``x``'s shape with exactly ``k`` True entries at the ``k``
  largest values of ``x`` (flattened); ties broken by the lowest flat index. ``k`` may be a traced
  integer scalar; ``k <= 0`` gives all False, ``k >= x.size`` all True.
* ``topk_mask_rows(x, k)``: the same for each row ``x[t]`` of a ``(T, ...)`` array, with ``k`` of
  shape ``(T,)`` (TIES trims each task vector separately).
* ``density_to_k(density, n)``: ``round(density * n)`` as int32 (traced-friendly).
* ``global_topk_phases(name, density_key)``: StatsPhases computing, over all leaves, the per-task
  global top-k of ``|state.tau|`` (k = density * total size of each task vector). After them,
  ``global_topk_mask(state, name)`` returns this leaf's ``(T, *shape)`` bool mask.

How it works. Values are compared as float32 with NaN counted as +inf and ``-0.0 == 0.0``
(subnormals may compare as zero where the backend flushes them), so all thresholds and counts are
exact comparisons and integer sums. ``topk_mask`` finds the exact k-th largest value ``v`` in a few
passes:

1. sort a strided sample (``~n/256`` elements) and take a bracket ``[lo, hi]`` of sample values
   around the estimated rank of the k-th largest value (+-4 standard deviations);
2. one fused pass counts the values ``> hi``, ``== hi``, ``== lo`` and in ``(lo, hi)``, and writes the
   candidates (values in ``(lo, hi)``, -inf elsewhere). Either ``v`` is ``hi`` or ``lo`` (common with
   ties), or it lies inside;
3. then the candidates (typically ~1% of the data) are extracted with a float ``lax.top_k`` over
   blocks of 1024 (at most 32 per block) and only they are sorted, giving ``v`` exactly; if fewer
   than all candidates came out (a block overflowed) the fast path declines;
4. the mask is ``key > v`` plus the first ``q = k - #(key > v)`` entries equal to ``v`` in flat order.
   When all equal entries fit (the usual case) that is ``key >= v``; otherwise per-block counts of
   equal entries and a cumulative sum over blocks locate the one boundary block, and a cumulative
   sum inside that block alone resolves the quota.

When the bracket misses the k-th value (an adversarial sample) or a block holds more candidates
than the extraction keeps, a ``lax.cond`` switches to an always-exact radix select: a 65536-bin
histogram of the high 16 bits, then one of the low 16 bits inside the boundary bin. Every step is
comparison and integer counting, so the result is deterministic and does not depend on how ``x``
is sharded. The radix path orders values by an int32 key of the float32 bit pattern.
Rows (``topk_mask_rows``) run batched; a branch taken by any row runs for all rows, so no
``vmap`` turns the branches into both-sides selects.

The global (whole-model) selection uses the same radix idea across leaves: phase 1 collects per
task a 65536-bin histogram of the high 16 bits of ``|tau|`` per leaf, the host sums them and finds
the boundary bin; phase 2 collects per leaf the histogram of the low 16 bits inside that bin, the
host finds the exact threshold and splits the quota of tied entries across leaves in leaf order
(ties are broken by leaf order, then by flat index). Only histograms leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import MergeState, StatsPhase
from ._tree import MergeInputError

__all__ = ["topk_mask", "topk_mask_rows", "density_to_k", "global_topk_phases", "global_topk_mask"]

_I32_MIN = np.int32(np.iinfo(np.int32).min)
_I32_MAX = np.int32(np.iinfo(np.int32).max)
_LOW = np.int32(_I32_MIN + 1)  # "minus infinity" bracket end: below every real key
_PAD = _I32_MIN  # padding key: below _LOW, never counted
_INF_KEY = np.int32(0x7F800000)  # NaN compares as +inf

_BLOCK = 1024  # block of the candidate extraction
_PER_BLOCK = 32  # candidates kept per block by the extraction
_ROW_MAP_MIN = 1 << 22  # rows at least this long are selected one at a time
_SAMPLE = 1 << 17  # target sample size (before striding rounds it)
_TIE_BLOCK = 4096  # block of the tie-quota resolution
_Z = 4.0  # bracket half-width in standard deviations of the sample rank


def density_to_k(density, n: int) -> jax.Array:
    """Number of entries kept at ``density``: ``round(density * n)`` as int32 (traced-friendly)."""
    return jnp.round(jnp.asarray(density, jnp.float32) * n).astype(jnp.int32)


def _keys(x: jax.Array) -> jax.Array:
    """Order-preserving int32 keys of float values (as float32): a < b  <=>  key(a) < key(b)."""
    x = jnp.asarray(x, jnp.float32)
    b = lax.bitcast_convert_type(x, jnp.int32)
    k = jnp.where(b < 0, b ^ np.int32(0x7FFFFFFF), b)
    k = jnp.where(x == 0, np.int32(0), k)  # -0.0 == 0.0
    return jnp.where(jnp.isnan(x), _INF_KEY, k)


def _from_keys(keys: jax.Array) -> jax.Array:
    """Inverse of :func:`_keys` (to float32)."""
    return lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ np.int32(0x7FFFFFFF), keys), jnp.float32)


_NEG_INF_KEY = np.int32(np.int32(np.float32(-np.inf).view(np.int32)) ^ np.int32(0x7FFFFFFF))


def _pad_blocks(keys: jax.Array, block: int) -> jax.Array:
    """(R, n) -> (R, nb, block), padded with a value equal to nothing (NaN) or below all keys."""
    R, n = keys.shape
    nb = -(-n // block)
    if nb * block != n:
        fill = jnp.nan if jnp.issubdtype(keys.dtype, jnp.floating) else _PAD
        keys = jnp.pad(keys, ((0, 0), (0, nb * block - n)), constant_values=fill)
    return keys.reshape(R, nb, block)


# ---------------------------------------------------------------------------------------------
# The exact k-th key, fast path and exact fallback. Inputs: keys (R, n), k (R,) in [1, n].
# Outputs per row: v (the k-th largest key), count_gt = #(key > v), count_eq = #(key == v).

def _radix_kth(keys: jax.Array, k: jax.Array):
    """Always-exact radix select by two 16-bit histograms (scatter-add passes)."""
    R, n = keys.shape
    u = lax.bitcast_convert_type(keys, jnp.uint32) ^ np.uint32(0x80000000)
    hi16 = (u >> 16).astype(jnp.int32)
    lo16 = (u & np.uint32(0xFFFF)).astype(jnp.int32)
    rows = jnp.arange(R, dtype=jnp.int32)[:, None]

    def level(bins, kk):
        hist = jnp.zeros((R, 65537), jnp.int32).at[rows, bins].add(1, mode="drop")[:, :65536]
        # count strictly above each bin, from the top
        above = jnp.flip(jnp.cumsum(jnp.flip(hist, 1), axis=1), 1) - hist
        b = jnp.sum((above + hist) >= kk[:, None], axis=1).astype(jnp.int32) - 1  # highest bin reaching kk
        b = jnp.clip(b, 0, 65535)
        ab = jnp.take_along_axis(above, b[:, None], 1)[:, 0]
        hb = jnp.take_along_axis(hist, b[:, None], 1)[:, 0]
        return b, ab, hb

    b1, above1, _ = level(hi16, k)
    inbin = jnp.where(hi16 == b1[:, None], lo16, 65536)
    b2, above2, eq = level(inbin, k - above1)
    vu = (b1.astype(jnp.uint32) << 16) | b2.astype(jnp.uint32)
    v = lax.bitcast_convert_type(vu ^ np.uint32(0x80000000), jnp.int32)
    return v, above1 + above2, eq


def _desc_order_stats(a: jax.Array, ranks: jax.Array) -> jax.Array:
    """Values of descending rank ``ranks`` (1-based, shape (R, m)) in each row of ``a`` (R, L).

    On CPU ``lax.top_k`` with k about L/2 costs a third of a full sort, so the order statistics are
    read from a top_k of the larger values, or of the smaller ones (negated) when every rank lies
    in the lower part; only ranks on both sides of the middle fall back to a sort.
    """
    R, L = a.shape
    K = min(L, L // 2 + L // 8 + 1)
    ranks = jnp.clip(ranks, 1, L)

    def from_top(_):
        t = lax.top_k(a, K)[0]
        return jnp.take_along_axis(t, jnp.clip(ranks - 1, 0, K - 1), 1)

    def from_bottom(_):
        t = -lax.top_k(-a, K)[0]  # ascending: t[:, j] is the (j+1)-th smallest
        return jnp.take_along_axis(t, jnp.clip(L - ranks, 0, K - 1), 1)

    def full(_):
        srt = jnp.sort(a, axis=1)
        return jnp.take_along_axis(srt, L - ranks, 1)

    if K >= L:
        return full(None)
    return lax.cond(jnp.all(ranks <= K), from_top,
                    lambda _: lax.cond(jnp.all(L - ranks + 1 <= K), from_bottom, full, None), None)


def _fast_kth(x: jax.Array, k: jax.Array):
    """Sample bracket + one fused counting/extraction pass on float32 ``x`` (NaN already +inf).

    Returns (v, gt, eq, ok) with ``v`` as a key; ``ok`` is False where the result is not proven.
    """
    R, n = x.shape
    stride = max(1, n // _SAMPLE)
    sample = x[:, ::stride]
    M = sample.shape[1]
    kf = k.astype(jnp.float32)
    q = kf / n
    pos = (1.0 - q) * M  # ascending sample position of the k-th largest value
    d = _Z * jnp.sqrt(M * q * (1.0 - q)) + 2.0
    j_lo = jnp.floor(pos - d).astype(jnp.int32)
    j_hi = jnp.ceil(pos + d).astype(jnp.int32)
    # ascending sample position j is descending rank M - j
    st = _desc_order_stats(sample, jnp.stack([M - jnp.clip(j_lo, 0, M - 1), M - jnp.clip(j_hi, 0, M - 1)], 1))
    lo = jnp.where(j_lo < 0, -jnp.inf, st[:, 0])
    hi = jnp.where(j_hi >= M, jnp.inf, st[:, 1])
    lo2, hi2 = lo[:, None], hi[:, None]
    mid = (x > lo2) & (x < hi2)
    # one pass: the counts, and the candidates in (lo, hi) for the blocked extraction
    n_gt_hi = jnp.sum(x > hi2, axis=1, dtype=jnp.int32)
    n_eq_hi = jnp.sum(x == hi2, axis=1, dtype=jnp.int32)
    n_eq_lo = jnp.where(lo == hi, 0, jnp.sum(x == lo2, axis=1, dtype=jnp.int32))
    n_mid = jnp.sum(mid, axis=1, dtype=jnp.int32)
    cand = jnp.where(mid, x, -jnp.inf)
    nb = -(-n // _BLOCK)
    if nb * _BLOCK != n:
        cand = jnp.pad(cand, ((0, 0), (0, nb * _BLOCK - n)), constant_values=-jnp.inf)
    ge_hi = n_gt_hi + n_eq_hi
    gt_lo = ge_hi + n_mid
    ge_lo = gt_lo + n_eq_lo
    is_hi = (n_gt_hi < k) & (k <= ge_hi)
    is_mid = (ge_hi < k) & (k <= gt_lo)
    is_lo = (gt_lo < k) & (k <= ge_lo)

    def extract(_):
        # lax.top_k is fast on float32 (not on int32) on CPU. The -inf filler is never a candidate.
        top = lax.top_k(cand.reshape(R, nb, _BLOCK), _PER_BLOCK)[0].reshape(R, -1)
        n_got = jnp.sum(top > lo2, axis=1, dtype=jnp.int32)  # < n_mid: some block overflowed
        L = top.shape[1]
        r = jnp.clip(k - ge_hi, 1, L)
        vm = _desc_order_stats(top, r[:, None])[:, 0]
        n_above = jnp.sum(top > vm[:, None], axis=1, dtype=jnp.int32)
        eq = jnp.sum(top == vm[:, None], axis=1, dtype=jnp.int32)
        return vm, ge_hi + n_above, eq, n_got == n_mid

    def no_extract(_):
        z = jnp.zeros((R,), jnp.int32)
        return jnp.zeros((R,), jnp.float32), z, z, jnp.ones((R,), bool)

    vm, gtm, eqm, okm = lax.cond(jnp.any(is_mid), extract, no_extract, None)
    v = jnp.where(is_hi, hi, jnp.where(is_lo, lo, vm))
    gt = jnp.where(is_hi, n_gt_hi, jnp.where(is_lo, gt_lo, gtm))
    eq = jnp.where(is_hi, n_eq_hi, jnp.where(is_lo, n_eq_lo, eqm))
    ok = is_hi | is_lo | (is_mid & okm)
    return _keys(v), gt, eq, ok


def _canon(x: jax.Array) -> jax.Array:
    """float32 with NaN -> +inf (so float comparisons give a total order; -0.0 == 0.0 already)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(jnp.isnan(x), jnp.inf, x)


def _kth(x: jax.Array, k: jax.Array):
    v, gt, eq, ok = _fast_kth(x, k)
    return lax.cond(jnp.all(ok), lambda _: (v, gt, eq), lambda _: _radix_kth(_keys(x), k), None)


# ---------------------------------------------------------------------------------------------
# Mask from a threshold key and a tie quota.

def _mask_from_threshold(keys: jax.Array, v: jax.Array, quota: jax.Array, eq: jax.Array) -> jax.Array:
    """``key > v`` plus the first ``quota`` entries with ``key == v`` (flat order), per row.

    ``keys`` are int32 order keys, or float32 values without NaN (then ``v`` is float32).

    ``eq`` is the number of entries equal to ``v`` in each row (``quota >= eq`` keeps them all).
    """
    R, n = keys.shape
    vv = v[:, None]

    def all_ties(_):
        return (keys > vv) | ((keys == vv) & (quota > 0)[:, None])

    def partial_ties(_):
        # The first `quota` equal entries are those before a cut position p*: find p* from per-block
        # counts of equal entries (a cumulative sum over blocks) and a cumulative sum inside the one
        # boundary block; the mask is then elementwise (no padding, no gather over the data).
        TB = _TIE_BLOCK
        nbf = n // TB
        parts = []
        if nbf:
            parts.append(jnp.sum(keys[:, :nbf * TB].reshape(R, nbf, TB) == vv[:, :, None], axis=2, dtype=jnp.int32))
        if nbf * TB != n:
            parts.append(jnp.sum(keys[:, nbf * TB:] == vv, axis=1, dtype=jnp.int32, keepdims=True))
        cnt = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # (R, nb)
        inc = jnp.cumsum(cnt, axis=1)
        bb = jnp.clip(jnp.sum(inc < quota[:, None], axis=1).astype(jnp.int32), 0, cnt.shape[1] - 1)
        rem = quota - jnp.take_along_axis(inc - cnt, bb[:, None], 1)[:, 0]
        idx = bb[:, None] * TB + jnp.arange(TB, dtype=jnp.int32)[None]
        fill = jnp.nan if jnp.issubdtype(keys.dtype, jnp.floating) else _PAD
        blk = jnp.take_along_axis(keys, idx, 1, mode="fill", fill_value=fill)
        cs = jnp.cumsum(blk == vv, axis=1, dtype=jnp.int32)
        cut = bb * TB + jnp.sum(cs < rem[:, None], axis=1).astype(jnp.int32) + 1  # after the rem-th tie
        cut = jnp.where(quota > 0, cut, 0)
        pos = lax.broadcasted_iota(jnp.int32, (R, n), 1)
        return (keys > vv) | ((keys == vv) & (pos < cut[:, None]))

    return lax.cond(jnp.any((quota < eq) & (quota > 0)), partial_ties, all_ties, None)


def _topk_rows(x: jax.Array, k: jax.Array) -> jax.Array:
    """Row-wise top-k mask of (R, n) values (any float dtype), k (R,)."""
    R, n = x.shape
    x = _canon(x)
    k = jnp.asarray(k).astype(jnp.int32)
    kc = jnp.clip(k, 1, n)
    v, gt, eq = _kth(x, kc)
    mask = _mask_from_threshold(x, _from_keys(v), kc - gt, eq)
    mask = jnp.where((k <= 0)[:, None], False, mask)
    return jnp.where((k >= n)[:, None], True, mask)


def topk_mask(x: jax.Array, k) -> jax.Array:
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
    return _topk_rows(x.reshape(1, -1), k.reshape(1)).reshape(x.shape)


def topk_mask_rows(x: jax.Array, k) -> jax.Array:
    """Per-row :func:`topk_mask`: row ``t`` of ``x`` (shape ``(T, ...)``) keeps its ``k[t]`` largest.

    Args:
      x: array of shape ``(T, ...)``; each ``x[t]`` is flattened and selected separately.
      k: integer scalar or ``(T,)`` array (may be traced).

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
    flat = x.reshape(T, -1)
    if T > 1 and flat.shape[1] >= _ROW_MAP_MIN:
        # Large rows one at a time: the selection's temporaries (keys, candidates, masks) then exist
        # for one task vector instead of all T, which bounds peak memory on embedding-sized leaves.
        out = lax.map(lambda a: _topk_rows(a[0][None], a[1][None])[0], (flat, k))
        return out.reshape(x.shape)
    return _topk_rows(flat, k).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Global (whole-model) top-k per task.

def _abs_u(tau: jax.Array) -> jax.Array:
    """(T, n) uint32 order keys of |tau| (non-negative floats: the bit pattern is monotone)."""
    T = tau.shape[0]
    return lax.bitcast_convert_type(_keys(jnp.abs(tau.reshape(T, -1))), jnp.uint32)


def _hist_rows(bins: jax.Array, nbins: int) -> jax.Array:
    """Per-row histogram of int32 ``bins`` (R, n) in [0, nbins]; bin ``nbins`` is dropped."""
    R = bins.shape[0]
    rows = jnp.arange(R, dtype=jnp.int32)[:, None]
    return jnp.zeros((R, nbins + 1), jnp.int32).at[rows, bins].add(1, mode="drop")[:, :nbins]


def _boundary(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Highest bin b with (#above b + hist[b]) >= k, and #above b (host, int64)."""
    above = np.cumsum(hist[::-1])[::-1] - hist
    b = int(np.sum(above + hist >= k)) - 1
    b = min(max(b, 0), hist.size - 1)
    return b, int(above[b])


def global_topk_phases(name: str = "global_topk", density_key: str = "density"):
    """StatsPhases for a per-task top-k of ``|tau|`` over the whole model (all leaves together).

    Each task vector keeps ``round(density * N)`` entries, ``N`` its total size over all leaves;
    ``density`` is read from ``hp[density_key]`` (scalar or one per task, the same at every leaf).
    Ties at the threshold are broken by leaf order, then by flat index. Read the leaf's mask with
    :func:`global_topk_mask` in the update that follows.

    Args:
      name: stats name (two phases: ``name + "/hi"`` and ``name``).
      density_key: hyperparameter holding the kept fraction.

    Returns:
      A tuple of two :class:`StatsPhase` to pass as ``stats=`` to :func:`jmerge._core.transform`.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023) (trim over the whole model per task).
    """
    hi_name = name + "/hi"

    def collect_hi(state: MergeState, hp):
        u = _abs_u(state.tau)
        return _hist_rows((u >> 16).astype(jnp.int32), 65536)

    def finalize_hi(collected, hps):
        T = collected[0].shape[0]
        hist = np.sum([np.asarray(c, np.int64) for c in collected], axis=0)  # (T, 65536)
        total = int(hist[0].sum())
        ks = _global_ks(hps, density_key, T, name, total)
        b1 = np.array([_boundary(hist[t], int(min(max(ks[t], 1), max(total, 1))))[0] for t in range(T)],
                      np.int32)
        return [{"b1": jnp.asarray(b1)} for _ in collected]

    def collect_lo(state: MergeState, hp):
        u = _abs_u(state.tau)
        b1 = state.stats[hi_name]["b1"]
        h = (u >> 16).astype(jnp.int32)
        inbin = jnp.where(h == b1[:, None], (u & np.uint32(0xFFFF)).astype(jnp.int32), 65536)
        return {"hist": _hist_rows(inbin, 65536), "above": jnp.sum(h > b1[:, None], axis=1, dtype=jnp.int32),
                "n": jnp.int32(h.shape[1]), "b1": b1}

    def finalize_lo(collected, hps):
        T = collected[0]["hist"].shape[0]
        hists = np.stack([np.asarray(c["hist"], np.int64) for c in collected])  # (L, T, 65536)
        hist = hists.sum(0)
        above = np.sum([np.asarray(c["above"], np.int64) for c in collected], axis=0)
        total = int(sum(int(c["n"]) for c in collected))
        b1 = np.asarray(collected[0]["b1"], np.int64)
        ks = _global_ks(hps, density_key, T, name, total)
        v = np.zeros(T, np.int64)
        quotas = np.zeros((len(collected), T), np.int64)
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
            q = kt - int(above[t]) - above2  # tied entries to keep, given to leaves in order
            for i in range(len(collected)):
                quotas[i, t] = min(int(hists[i, t, b2]), max(q, 0))
                q -= quotas[i, t]
        vj = jnp.asarray(v.astype(np.int32))
        return [{"v": vj, "quota": jnp.asarray(quotas[i].astype(np.int32))} for i in range(len(collected))]

    return (StatsPhase(hi_name, collect_hi, finalize_hi), StatsPhase(name, collect_lo, finalize_lo))


def _global_ks(hps, key: str, T: int, name: str, total: int) -> np.ndarray:
    dens = _global_density(hps, key, T, name).astype(np.float64)
    return np.round(dens * total).astype(np.int64)


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


def global_topk_mask(state: MergeState, name: str = "global_topk") -> jax.Array:
    """This leaf's ``(T, *shape)`` bool mask from :func:`global_topk_phases` statistics.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    st = state.stats[name]
    T = state.tau.shape[0]
    if state.tau.size == 0:
        return jnp.zeros(state.tau.shape, bool)
    keys = _keys(jnp.abs(state.tau.reshape(T, -1)))
    v = jnp.asarray(st["v"], jnp.int32)
    quota = jnp.asarray(st["quota"], jnp.int32)
    eq = jnp.sum(keys == v[:, None], axis=1, dtype=jnp.int32)
    return _mask_from_threshold(keys, v, quota, eq).reshape(state.tau.shape)
