"""Sparsifiers of task vectors: magnitude trim (top-k), DARE, Model Breadcrumbs and DELLA drops.

Each step rewrites ``state.tau`` (the stacked task vectors, ``(T, *shape)``) and leaves the
aggregation to a later step (``weighted_sum``, ``disjoint_merge`` ...). Every step works per task:
a per-model ``density`` (``jmerge.PerModel([...])``) gives each task its own ``k``. The keep masks
are stored in ``state.extras`` (``"trim_mask"``, ``"dare_mask"``, ``"breadcrumbs_mask"``,
``"della_mask"``) and returned by ``merge(..., return_extras=True)``.

Random drops (DARE, DELLA) draw from the leaf's PRNG key (seed folded with the leaf path), so the
same seed gives the same result whatever the leaf order and whether the model is merged whole or
tensor by tensor.

Rounding of ``k``: by default ``k = round(density * n)``. ``rounding="floor"`` gives mergekit's
``int(density * n)`` (with ``trim``, at least one entry is kept when ``density > 0``, as mergekit's
``magnitude``); ``rounding="authors"`` gives the TIES authors' ``int(density * n) + 1`` (their
``kthvalue`` threshold keeps one more entry; at most ``n``). Hyperparameters arrive as float32, so when ``density * n`` lies within float32
rounding of an integer the floor may differ from mergekit's float64 arithmetic by one entry.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch" (DARE, ICML 2024); Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks" (ECCV 2024); Deep et al., "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling" (2024).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core import HParamSpec, MergeInputError, MergeState, StatsPhase, Transform, transform
from ..core import select as _select
from ..core.chunks import chunk_size
from ..core.rank import difference_ranks, magnitude_ranks
from ..core.xla import bernoulli as _bernoulli, materialized, offset_draws as _offset_draws
from .basic import per_model

__all__ = ["trim", "dare", "breadcrumbs_drop", "della_drop", "rescale_l1", "l1_norms", "l1_block", "pairwise_sum"]

_ROUNDINGS = ("round", "floor", "authors")
_RESCALES = ("inverse", "l1", "none")
_L1_EPS = 1e-7  # below this L1 norm (before or after dropping) no rescaling, as mergekit


def _check_option(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MergeInputError(f"{what}={value!r} is not supported; use one of {list(allowed)}.")


def _per_task(v, T: int) -> jax.Array:
    """A scalar or per-model hyperparameter as a ``(T,)`` float32 vector."""
    return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (T,))


def _count(frac: jax.Array, n: int, rounding: str) -> jax.Array:
    """Number of entries ``frac * n`` (per task) as int32, clipped to ``[0, n]``."""
    if rounding == "round":
        k = jnp.round(frac * jnp.float32(n))
    else:  # floor; the tiny relative bump undoes float32's representation error of frac. n times the bump is
        # one float32 constant, as XLA folds (frac * n) * bump anyway: the count is the same on every compiler
        # and equals the host's (jmerge.core.select.tensor_topk_count)
        k = jnp.floor(frac * jnp.float32(np.float32(n) * np.float32(1.0 + 2.0 ** -21)))
        if rounding == "authors":  # the TIES authors' kthvalue keeps int(density * n) + 1
            k = k + 1
    return jnp.clip(k, 0, n).astype(jnp.int32)


def rescale_l1(tau: Float[Array, "T *shape"], kept: Float[Array, "T *shape"]) -> Float[Array, "T *shape"]:
    """Rescale each task's ``kept`` so its L1 norm equals that of ``tau`` (mergekit's ``rescale``).

    Tasks whose L1 norm before or after dropping is below 1e-7 are left unscaled.

    References: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch" (ICML 2024); mergekit's ``rescale`` (Goddard et al., "Arcee's MergeKit", EMNLP 2024).
    """
    return _times_factors(kept, _l1_factors(tau, kept))


def _times_factors(kept, factors) -> jax.Array:
    """``kept`` (``(T, *shape)``) times each task's factor: the same product per entry whole or in chunks."""
    return kept * factors.reshape((kept.shape[0],) + (1,) * (kept.ndim - 1))


def _l1_factors(tau, kept) -> jax.Array:
    """The ``(T,)`` factors of :func:`rescale_l1` (also read by the fused TIES kernel's route)."""
    return _factors(l1_norms(tau), l1_norms(kept), jnp)


def _factors(before, after, xp):
    """``before / after`` where both norms reach ``_L1_EPS``, else 1 (``xp``: jnp, or np on the host)."""
    ok = (before >= np.float32(_L1_EPS)) & (after >= np.float32(_L1_EPS))
    return xp.where(ok, before / xp.where(ok, after, np.float32(1.0)), np.float32(1.0))


def l1_block(n: int) -> int:
    """Entries per block of the L1 norm of a tensor of ``n`` entries (:func:`l1_norms`), or 0 for one reduction:
    the out-of-core executor's chunk size for that tensor (:func:`jmerge.core.chunks.chunk_size`: 2^22 from
    2^22 entries, 2^19 from 2^19), so that each chunk of a chunked merge is one block.

    References: none (infrastructure).
    """
    return chunk_size(n)


def l1_norms(x: Float[Array, "T *shape"]) -> Float[Array, " T"]:
    """Per task the L1 norm ``sum |x_t|`` of ``x`` (``(T, *shape)``), float32.

    A tensor of 2^19 entries or more is summed in blocks of :func:`l1_block` flat entries (the last zero-padded
    to a whole block), each block one reduction, and the block sums are added pairwise (:func:`pairwise_sum`).
    The out-of-core executor's chunks of such a tensor are those blocks, so it merges the tensor chunk by chunk
    (each chunk's sums a statistic, the tree on the host) with the bits of the whole tensor's norms
    (:func:`jmerge.core.chunks.merge_chunked`). A smaller tensor, and a leaf the driver knows to be sharded
    (an eager call, :func:`jmerge.core.select.sharded_leaf`), is one reduction over its axes, summed where it
    lives; its norms then agree with one device's to float32 rounding. Inside a caller's ``jax.jit`` the
    sharding is unknown and a large sharded leaf is flattened into blocks.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) (the L1 rescale); Higham,
    "Accuracy and Stability of Numerical Algorithms" (2002), 4.2 (pairwise summation).
    """
    T = x.shape[0]
    n = int(np.prod(x.shape[1:], dtype=np.int64))
    s = l1_block(n)
    if not s or _select.leaf_is_sharded():
        return jnp.sum(jnp.abs(x), axis=tuple(range(1, x.ndim)))
    f = jnp.abs(x).reshape(T, n)
    sums = []
    for lo in range(0, n, s):  # one reduction per block: XLA:CPU sums (T, s) in one fast loop, (T, blocks, s) not
        blk = f[:, lo:lo + s]
        if blk.shape[1] < s:
            blk = jnp.pad(blk, ((0, 0), (0, s - blk.shape[1])))
        sums.append(jnp.sum(blk, axis=1))
    return pairwise_sum(jnp.stack(sums, axis=1), jnp)


def pairwise_sum(v, xp=jnp):
    """Sum over the last axis as a pairwise tree: neighbours added level by level (``v[..., 0::2] +
    v[..., 1::2]``, an odd level's last entry plus zero), the same float32 additions on the host (``xp=np``) as in
    XLA.

    References: Higham, "Accuracy and Stability of Numerical Algorithms" (2002), 4.2.
    """
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = xp.concatenate([v, xp.zeros(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


# --------------------------------------------------------------------------------------------
# trim: top-k by magnitude

_TRIM_STATS = "trim_global_topk"


def _trim_k(state: MergeState, hp, rounding: str) -> jax.Array:
    """Entries kept per task by a per-tensor trim, ``(T,)`` int32 (also read by the fused TIES route)."""
    n = state.tau[0].size
    d = _per_task(hp["density"], state.num_models)
    k = _count(d, n, rounding)
    if rounding == "floor":  # mergekit keeps at least one entry when density > 0
        k = jnp.where(d > 0, jnp.maximum(k, min(1, n)), k)
    return k


def _trim(state: MergeState, hp, *, scope: str, rounding: str) -> MergeState:
    if scope == "global":  # per row, so that the merge pass fuses the trim (no stacked tau written)
        kept, mask = _select.global_topk_keep(state, _TRIM_STATS)
    else:
        k = _trim_k(state, hp, rounding)
        # While tau is models - base, the counting passes read the models: tau is never materialized.
        kept, mask = _select.topk_keep_rows(state.tau, k, magnitude=True, rebuild=state.tau_rebuild())
    return state.replace(tau=kept, extras={**state.extras, "trim_mask": mask})


def _trim_chunk_form(step):
    """On the chunks of one tensor (``jmerge.core.chunks``) a per-tensor trim is the whole-model trim over
    the chunks, which then keeps the per-tensor count (``select.tensor_chunks``)."""
    st = dict(step.static)
    if st["scope"] != "tensor":
        return None
    return trim(step.hparams["density"], scope="global", rounding=st["rounding"]).steps[0][1]


_trim.chunk_form = _trim_chunk_form  # read by jmerge.core.chunks.chunked_form


def trim(density: HParamSpec = 0.2, *, scope: Literal["tensor", "global"] = "tensor",
         rounding: Literal["round", "floor", "authors"] = "round") -> Transform:
    """Keep each task vector's ``k = density * n`` entries of largest magnitude; zero the rest.

    Args:
      density: fraction kept, in [0, 1]; scalar, per layer, or per model (``PerModel``).
      scope: ``"tensor"`` ranks within each tensor (mergekit); ``"global"`` ranks over the whole
        model per task, as the TIES paper (``n`` is then the task vector's total size, and the
        density of the first leaf is used).
      rounding: ``"round"`` (default), ``"floor"`` (mergekit's ``int(density * n)``, at least one
        entry kept when ``density > 0``) or ``"authors"`` (the TIES authors' ``int(density * n) + 1``;
        also for ``scope="global"``, where ``n`` is the task vector's total size).

    Ties in magnitude at the k-th largest are broken deterministically: the tied entries with the
    lowest flat (row-major) index are kept (with ``scope="global"``: leaf order first). mergekit ranks
    with an unstable ``argsort``, so among entries tied at its threshold (frequent in bf16/fp16 task
    vectors, whose magnitudes take few values) it keeps an arbitrary subset; results then differ from
    jmerge's only at those tied entries.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    _check_option("scope", scope, ("tensor", "global"))
    _check_option("rounding", rounding, _ROUNDINGS)
    stats = _select.global_topk_phases(_TRIM_STATS, "density", rounding) if scope == "global" else ()
    return transform("trim", _trim, hparams={"density": density}, static={"scope": scope, "rounding": rounding},
                     ranges={"density": (0.0, 1.0)}, stats=stats, per_model=("density",))


# --------------------------------------------------------------------------------------------
# DARE: random drop and rescale

def _apply_rescale(tau, kept, p, rescale):
    if rescale == "inverse":
        return kept * jnp.where(p > 0, 1.0 / jnp.where(p > 0, p, 1.0), 0.0)
    if rescale == "l1":
        return rescale_l1(tau, kept)
    return kept


def _kept_rescaled(state: MergeState, keep, p, rescale: str) -> jax.Array:
    """tau's entries where ``keep``, rescaled (DARE's and DELLA's survivors; ``p``: keep probabilities, per
    model or per entry). ``"l1"`` sums over the stack as before (summed per row, the last bit may differ); the
    other rescalings run row by row, the same numbers: a later step's row of tau folds into the expression
    that built it (XLA:CPU writes the stacked task vectors, models x leaf, when an elementwise op takes the
    whole stack)."""
    if rescale == "l1":
        return _apply_rescale(state.tau, jnp.where(keep, state.tau, 0.0), p, rescale)
    return jnp.stack([_apply_rescale(None, jnp.where(keep[t], x, 0.0), p[t], rescale)
                      for t, x in enumerate(state.tau_rows())])


def _dare_keep(state: MergeState, hp, own: bool = False) -> jax.Array:
    """DARE's keep mask: ``jax.random.bernoulli``'s bits, fused; a block of rows (or a chunk) draws the whole
    tensor's bits at its entries. ``own``: computed into a buffer of its own, for the L1 rescale, whose norms and
    output would otherwise each draw the bits again, in fusions XLA:CPU does not vectorize (a ``(3, 2**22)``
    chunk's norms 0.19 s)."""
    p = per_model(hp["density"], state)
    draw = lambda: _bernoulli(state.key, jnp.broadcast_to(p, state.tau.shape), offset=state.offset,
                              whole=state.whole, block_ndim=state.base.ndim)
    return materialized(draw, state.base) if own else draw()


def _dare(state: MergeState, hp, *, rescale: str) -> MergeState:
    p = per_model(hp["density"], state)
    keep = _dare_keep(state, hp, own=rescale == "l1")
    tau = _kept_rescaled(state, keep, p, rescale)
    return state.replace(tau=tau, extras={**state.extras, "dare_mask": keep})


# read by jmerge.core.chunks.entrywise: each entry from the same entries and its own draw, keyed by its flat index
# (plus the block's offset), except for the L1 rescale (a norm of the whole tensor)
_dare.entrywise = lambda step: dict(step.static).get("rescale") != "l1" and _offset_draws()

_DARE_L1 = "dare_l1_norms"


def _dare_l1_collect(state: MergeState, hp):
    """A chunk's ``(2, T)`` L1 norms before and after the drop (its blocks of :func:`l1_norms`; its draws at its
    offset)."""
    keep = _dare_keep(state, hp, own=True)
    return jnp.stack([l1_norms(state.tau), l1_norms(jnp.where(keep, state.tau, 0.0))])


def _dare_l1_finalize(collected: list, hps: list) -> list:
    """The tensor's ``(T,)`` L1 factors from its chunks' norms (added as :func:`l1_norms`' tree, on the host), per
    chunk."""
    v = np.stack([np.asarray(c, np.float32) for c in collected], axis=-1)  # (2, T, chunks)
    f = _factors(*pairwise_sum(v, np), np)
    return [f] * len(collected)


def _dare_chunks(state: MergeState, hp, *, rescale: str) -> MergeState:
    """:func:`_dare` with ``rescale="l1"`` on one chunk of a tensor: the factors from the chunks' statistic. The
    draws are made again (their fused threefry costs less than unpacking a mask kept from the statistics pass:
    0.017 against 0.036 s for a ``(3, 2**22)`` chunk)."""
    keep = _dare_keep(state, hp, own=True)
    tau = _times_factors(jnp.where(keep, state.tau, 0.0), jnp.asarray(state.stats[_DARE_L1]))
    return state.replace(tau=tau, extras={**state.extras, "dare_mask": keep})


_dare_chunks.chunk_offset = True  # its draws take each chunk's flat offset (read by jmerge.core.chunks)


def _dare_chunk_form(step):
    """On the chunks of one tensor (``jmerge.core.chunks``) DARE with the L1 rescale takes its norms from a
    statistic over the chunks (:func:`l1_norms`' tree: the whole tensor's bits); the other rescalings are
    entrywise (blocks of rows, not chunks)."""
    st = dict(step.static)
    if st.get("rescale") != "l1" or not _offset_draws():
        return None
    return transform("dare", _dare_chunks, hparams={"density": step.hparams["density"]}, static={"rescale": "l1"},
                     ranges={"density": (0.0, 1.0)}, per_model=("density",),
                     stats=(StatsPhase(_DARE_L1, _dare_l1_collect, _dare_l1_finalize),)).steps[0][1]


_dare.chunk_form = _dare_chunk_form  # read by jmerge.core.chunks.chunked_form


def dare(density: HParamSpec = 0.5, *, rescale: Literal["inverse", "l1", "none"] = "inverse") -> Transform:
    """DARE: drop each task-vector entry with probability ``1 - density``, rescale the survivors.

    The keep mask is Bernoulli(``density``) drawn from the leaf's PRNG key.

    Args:
      density: keep probability in [0, 1] (the paper's ``1 - p``); scalar, per layer or per model.
      rescale: ``"inverse"`` multiplies survivors by ``1 / density`` (the paper, unbiased);
        ``"l1"`` rescales each task's tensor so its L1 norm matches the undropped one (mergekit's
        ``rescale: true``); ``"none"`` keeps survivors as they are.

    References: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch" (ICML 2024).
    """
    _check_option("rescale", rescale, _RESCALES)
    return transform("dare", _dare, hparams={"density": density}, static={"rescale": rescale},
                     ranges={"density": (0.0, 1.0)}, per_model=("density",))


# --------------------------------------------------------------------------------------------
# Model Breadcrumbs: drop the largest outliers and the smallest entries

def _breadcrumbs_ks(state: MergeState, hp, rounding: str) -> tuple[jax.Array, jax.Array]:
    """``(k_keep, k_top)`` per task (also read by the fused TIES route)."""
    T = state.num_models
    n = state.tau[0].size
    k_keep = _count(_per_task(hp["density"], T), n, rounding)
    k_top = _count(_per_task(hp["gamma"], T), n, rounding)
    return k_keep, jnp.minimum(k_top, n - k_keep)  # fewer outliers dropped when density needs them


def _breadcrumbs(state: MergeState, hp, *, rounding: str) -> MergeState:
    k_keep, k_top = _breadcrumbs_ks(state, hp, rounding)
    # Each task's rows in the leaf's own shape (not flattened: a sharded leaf stays sharded). While tau is
    # models - base, the counting passes read the models and tau is never materialized; the masked rows are
    # stacked row by row, so that a later step's row folds into the expression that built it.
    rebuild = state.tau_rebuild()
    # Both cuts of a task come from one search with two targets: each counting pass reads the task once.
    v, cut = _select.topk_thresholds_rows(state.tau, jnp.stack([k_top + k_keep, k_top]), magnitude=True,
                                          rebuild=rebuild)
    rows = state.tau_rows()
    masks = [_select.threshold_mask(x, v[0, t], cut[0, t], magnitude=True)
             & ~_select.threshold_mask(x, v[1, t], cut[1, t], magnitude=True) for t, x in enumerate(rows)]
    kept = jnp.stack([jnp.where(m, jnp.asarray(x, jnp.float32), 0.0) for m, x in zip(masks, rows)])
    return state.replace(tau=kept, extras={**state.extras, "breadcrumbs_mask": jnp.stack(masks)})


def breadcrumbs_drop(density: HParamSpec = 0.9, gamma: HParamSpec = 0.01, *,
                     rounding: Literal["round", "floor"] = "round") -> Transform:
    """Model Breadcrumbs mask: per tensor and task, drop the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping ``density * n`` entries.

    When ``density + gamma > 1`` fewer outliers are dropped so that ``density`` is kept (as mergekit).
    When ``gamma * n`` rounds to 0 no outliers are dropped and the ``density * n`` largest entries
    are kept (older mergekit releases kept nothing in that case: a bug not reproduced here).

    Args:
      density: fraction kept, in [0, 1].
      gamma: fraction of largest entries dropped, in [0, 1].
      rounding: ``"round"`` or ``"floor"`` (mergekit's ``int``) for both counts.

    References: Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks" (ECCV 2024).
    """
    _check_option("rounding", rounding, ("round", "floor"))
    return transform("breadcrumbs", _breadcrumbs, hparams={"density": density, "gamma": gamma},
                     static={"rounding": rounding}, ranges={"density": (0.0, 1.0), "gamma": (0.0, 1.0)},
                     per_model=("density", "gamma"))


breadcrumbs = breadcrumbs_drop  # the step's short name (``jmerge.breadcrumbs`` is the named method)


# --------------------------------------------------------------------------------------------
# DELLA: magnitude-ranked random drop

def _rows_view(tau: jax.Array) -> jax.Array:
    """``(T, R, m)`` view: rows are the leading axis of the leaf (one row for vectors and scalars)."""
    T = tau.shape[0]
    if tau.ndim >= 3:
        return tau.reshape(T, tau.shape[1], -1)
    return tau.reshape(T, 1, -1)


def _magnitude_ranks(x: jax.Array) -> jax.Array:
    """Ascending rank of ``|x|`` along the last axis (ties by lower index; NaN ranks as +inf), int32.

    :func:`jmerge.core.rank.magnitude_ranks`: on a one-device CPU, NumPy's SIMD sorts of the packed
    (key, position) rows on the host; elsewhere one one-operand int32 sort of the magnitude keys with the
    positions packed into their low bits, an exact correction within runs of equal high bits, and a batched
    scatter back to row order.
    """
    return magnitude_ranks(x)


def della_keep_probs(tau: Float[Array, "T *shape"], density: float | Float[Array, "*T"],
                     epsilon: float | Float[Array, "*T"], *, ranks: Array | None = None) -> Float[Array, "T *shape"]:
    """DELLA keep probabilities ``(density - eps) + 2 eps * rank / (m - 1)``, clipped to [0, 1].

    ``rank`` is the ascending magnitude rank of an entry within its row (ties by lower index, NaN
    ranks as +inf); a row of one entry gets ``density``. ``density >= 1`` keeps everything and ``density <= 0``
    drops everything whatever ``epsilon`` (as mergekit). Returned with ``tau``'s shape. ``ranks``: those
    ranks when already known, ``(T, R, m)`` (:func:`jmerge.core.rank.difference_ranks`).
    """
    T = tau.shape[0]
    x = _rows_view(tau)
    m = x.shape[-1]
    ranks = (_magnitude_ranks(x) if ranks is None else ranks.reshape(x.shape)).astype(jnp.float32)
    rank_norm = ranks / (m - 1) if m > 1 else jnp.full(x.shape, 0.5, jnp.float32)
    d = _per_task(density, T).reshape(T, 1, 1)
    e = _per_task(epsilon, T).reshape(T, 1, 1)
    p = jnp.clip(d - e + 2.0 * e * rank_norm, 0.0, 1.0)
    p = jnp.where(d >= 1.0, 1.0, jnp.where(d <= 0.0, 0.0, p))  # density 1 keeps all, 0 drops all
    return p.reshape(tau.shape)


def _della_ranks(state: MergeState):
    """The magnitude ranks of ``tau`` from the inputs while it is ``models - base`` as built (float32, no
    emulated precision): the host ranks then read the inputs, and the stacked task vectors are never written
    (:func:`jmerge.core.rank.difference_ranks`); else None."""
    if state.precision is not None or state.tau_rebuild() is None:
        return None
    _, base_leaf, model_leaves = state.source
    return difference_ranks(base_leaf, model_leaves)


def _della(state: MergeState, hp, *, rescale: str) -> MergeState:
    p = della_keep_probs(state.tau, hp["density"], hp["epsilon"], ranks=_della_ranks(state))
    keep = _bernoulli(state.key, p)  # jax.random.bernoulli's bits, fused
    tau = _kept_rescaled(state, keep, p, rescale)
    return state.replace(tau=tau, extras={**state.extras, "della_mask": keep})


def della_drop(density: HParamSpec = 0.7, epsilon: HParamSpec = 0.15, *,
               rescale: Literal["inverse", "l1", "none"] = "inverse") -> Transform:
    """DELLA's MagPrune: drop entries at random with keep probabilities rising with magnitude.

    Within each row (the leaf's leading axis; vectors are one row) entries are ranked by magnitude
    (ascending, rank normalised to [0, 1]); entry ``i`` is kept with probability
    ``p_i = (density - epsilon) + 2 * epsilon * rank_i`` (clipped to [0, 1]; mergekit instead rejects
    ``density +- epsilon`` outside (0, 1)); ``density`` 1 keeps every entry and 0 drops every entry
    (mergekit's shortcuts, also its default density 1). For leaves of 3 or more dimensions a row is everything
    under one index of the leading axis (mergekit ranks along axis 1 of the unflattened tensor).

    Args:
      density: mean keep probability, in [0, 1].
      epsilon: spread of keep probabilities, in [0, 0.5].
      rescale: ``"inverse"`` multiplies survivors by ``1 / p_i`` (the paper); ``"l1"`` matches each
        task's tensor L1 norm (mergekit's ``rescale: true``); ``"none"``.

    References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024).
    """
    _check_option("rescale", rescale, _RESCALES)
    return transform("della", _della, hparams={"density": density, "epsilon": epsilon},
                     static={"rescale": rescale}, ranges={"density": (0.0, 1.0), "epsilon": (0.0, 0.5)},
                     per_model=("density", "epsilon"))


della = della_drop  # the step's short name (``jmerge.della`` is the named method)
