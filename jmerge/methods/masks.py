"""Mask-based merges: TALL masks, Consensus merging, PCB merging and EMR merging.

* **TALL masks** (Wang et al. 2024): per task, the entries where the fine-tuned model is closer to the
  multi-task vector than to the base, ``mask_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|`` with
  ``tau_MTL = sum_t tau_t``. They localise each task's information inside the merged vector, so one
  merged vector plus T bit masks (:func:`pack_masks`, 1 bit per entry) replaces T checkpoints:
  :func:`tall_task_models` rebuilds ``theta_0 + mask_t * tau_MTL``.
* **Consensus merging** (same paper): keep only the entries that at least ``k`` TALL masks select
  (``k = 2`` removes "selfish" weights used by one task and "catastrophic" ones used by none) in the
  merged task vector of task arithmetic or TIES.
* **PCB merging** (Du et al. 2024): intra- and inter-task balancing scores, drop the lowest scores,
  weight each task vector by its normalised score.
* **EMR merging** (Huang et al. 2024): elect a unified task vector, and per task a sign mask and a
  rescaler; :func:`emr_task_models` rebuilds the per-task models.

Getting the masks: run the named method with ``jmerge.merge(..., return_extras=True)``; the extras
pytree has, per leaf, ``"tall_masks"`` ``(T, *shape)`` bool (and ``"consensus_mask"``), or
``"emr_masks"`` and ``"emr_rescalers"`` ``(T,)``.

References: Wang et al., "Localizing Task Information for Improved Model Merging and Compression"
(ICML 2024); Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024); Huang et
al., "EMR-Merging: Tuning-Free High-Performance Model Merging" (NeurIPS 2024).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import (HParamSpec, MergeInputError, MergeState, StatsPhase, Transform, chain, check_task_vectors,
                    density_to_k,
                    leaves_with_paths, model_max, model_sum, topk_mask_rows, transform)
from ..core.select import threshold_mask, topk_thresholds_rows
from ..core import task_vectors as task_vectors_of
from ..core.xla import materialized, opaque_zero, rows, sign, totals, unfused, uniform_exp
from .basic import per_model, scale as _scale_step, weighted_sum

__all__ = [
    "tall_masks",
    "consensus_mask",
    "consensus_ta",
    "consensus_ties",
    "tall_merge",
    "tall_task_models",
    "extras_item",
    "PackedMask",
    "pack_masks",
    "unpack_masks",
    "pcb",
    "emr_merge",
    "emr_task_models",
]

_INF = float("inf")


# --------------------------------------------------------------------------------------------
# TALL masks and Consensus

def _tall(tau: jax.Array, tau_mtl: jax.Array, lam: jax.Array, strict: bool) -> jax.Array:
    lhs, rhs = jnp.abs(tau), lam * jnp.abs(tau_mtl[None] - tau)
    return lhs > rhs if strict else lhs >= rhs


def _tall_rows(rows: list, tau_mtl: jax.Array, lam: jax.Array, strict: bool) -> jax.Array:
    """:func:`_tall` row by row (the same numbers), stacked."""
    return jnp.stack([_tall(x[None], tau_mtl, lam[t][None], strict)[0] for t, x in enumerate(rows)])


def _tall_masks(state: MergeState, hp, *, strict: bool) -> MergeState:
    rows = state.tau_rows()
    masks = _tall_rows(rows, model_sum(rows), per_model(hp["lambda_"], state), strict)
    return state.replace(extras={**state.extras, "tall_masks": masks})


_tall_masks.entrywise = True  # each entry's masks from the same entries alone (read by jmerge.core.chunks.entrywise)


def tall_masks(lambda_: HParamSpec = 0.6, *, strict: bool = False) -> Transform:
    """Compute TALL masks and store them in ``state.extras["tall_masks"]`` (bool ``(T, *shape)``).

    ``mask_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|`` with ``tau_MTL = sum_t tau_t`` computed from
    the task vectors as they enter this step (put it first in a chain to use the raw task vectors).
    ``lambda_`` may be per task (``PerModel``), as the paper tunes it per task on validation data.
    The step does not aggregate: follow it with an aggregation step.

    Args:
      lambda_: mask threshold(s), ``>= 0``; larger values select fewer entries.
      strict: compare with ``>`` as the authors' code and FusionBench (differs only on exact ties).

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    return transform("tall_masks", _tall_masks, hparams={"lambda_": lambda_}, ranges={"lambda_": (0.0, _INF)},
                     static={"strict": bool(strict)}, per_model=("lambda_",))


def _consensus_mask(state: MergeState, hp, *, masks_from: str, strict: bool) -> MergeState:
    if state.merged is None:
        raise MergeInputError("consensus_mask needs a merged task vector: put it after an aggregation step "
                              "(weighted_sum, disjoint_merge, ...).")
    lam = per_model(hp["lambda_"], state)
    if masks_from == "merged":
        masks = _tall(state.raw_tau(), state.merged, lam, strict)
    else:
        masks = state.extras.get("tall_masks")
        if masks is None:
            rows = state.tau_rows()
            masks = _tall_rows(rows, model_sum(rows), lam, strict)
    # the stack's rows, each converted (a conversion of the whole stack made XLA:CPU write the stacked masks)
    count = model_sum([masks[t].astype(jnp.float32) for t in range(masks.shape[0])])
    keep = count >= hp["k"]
    return state.replace(merged=jnp.where(keep, state.merged, 0.0),
                         extras={**state.extras, "tall_masks": masks, "consensus_mask": keep})


_consensus_mask.entrywise = True  # (read by jmerge.core.chunks.entrywise)


def consensus_mask(k: HParamSpec = 2, lambda_: HParamSpec = 0.6, *,
                   masks_from: Literal["stored", "merged"] = "stored", strict: bool = False) -> Transform:
    """Zero the merged task vector where fewer than ``k`` TALL masks are on.

    Place it after the aggregation step (before scaling). The TALL masks come from:

    * ``masks_from="stored"``: ``state.extras["tall_masks"]`` when an earlier :func:`tall_masks` step
      stored them (the named methods compute them from the raw task vectors, before any trimming);
      otherwise from the current ``tau`` with ``tau_MTL = sum_t tau_t``;
    * ``masks_from="merged"``: ``|tau_t| >= lambda_t * |merged - tau_t|`` with the raw task vectors
      and the merged vector of the preceding steps (the authors' TALL masks "built with TIES").

    Stores the masks in ``extras["tall_masks"]`` and the kept entries in ``extras["consensus_mask"]``.

    Args:
      k: minimum number of tasks that must use an entry (paper: 2), ``>= 0``; ``k`` above the number of
        tasks zeroes everything.
      lambda_: TALL mask threshold(s) when the masks are computed here; may be per task.
      masks_from: ``"stored"`` or ``"merged"`` (see above).
      strict: compare with ``>`` (the authors' code).

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    if masks_from not in ("stored", "merged"):
        raise MergeInputError(f"consensus_mask: masks_from must be 'stored' or 'merged', got {masks_from!r}.")
    return transform("consensus_mask", _consensus_mask, hparams={"k": k, "lambda_": lambda_},
                     ranges={"k": (0.0, _INF), "lambda_": (0.0, _INF)}, per_model=("lambda_",),
                     static={"masks_from": masks_from, "strict": bool(strict)})


def consensus_ta(k: HParamSpec = 2, lambda_: HParamSpec = 0.6, scale: HParamSpec = 1.0) -> Transform:
    """Consensus task arithmetic: ``theta_0 + scale * consensus ⊙ sum_t tau_t``.

    ``consensus = [#{t : mask_t} >= k]`` with the TALL masks of :func:`tall_masks`. ``lambda_``
    binds to both ``tall_masks.lambda_`` and ``consensus_mask.lambda_``.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    return chain(tall_masks(lambda_), weighted_sum(1.0), consensus_mask(k, lambda_), _scale_step(scale),
                 name="consensus_ta", aliases={"k": "consensus_mask.k", "scale": "scale.scale",
                                               "lambda_": ("tall_masks.lambda_", "consensus_mask.lambda_")})


_CONSENSUS_AUTHORS = {"masks_from": "merged", "scope": "global", "reduce": "sum", "rounding": "authors",
                      "strict": True}


def consensus_ties(k: HParamSpec = 2, lambda_: HParamSpec = 0.6, density: HParamSpec = 0.2, scale: HParamSpec = 1.0,
                   *, variant: Literal["jmerge", "authors"] = "jmerge",
                   masks_from: Literal["stored", "merged"] | None = None,
                   scope: Literal["tensor", "global"] | None = None, reduce: Literal["mean", "sum"] | None = None,
                   rounding: Literal["round", "floor", "authors"] | None = None,
                   strict: bool | None = None) -> Transform:
    """Consensus TIES: the TIES merged task vector restricted to the entries of >= ``k`` TALL masks.

    ``variant="jmerge"`` (default): TALL masks from the untrimmed task vectors
    (``tau_MTL = sum_t tau_t``, ``>=``); TIES trims per tensor (``round(density * n)``), elects signs
    and takes the disjoint mean, as :func:`jmerge.ties`.

    ``variant="authors"``, as the Consensus authors' code (and FusionBench): TIES with a whole-model
    trim keeping ``int(density * N) + 1`` per task and the disjoint *sum*; TALL masks
    ``|tau_t| > lambda * |tau_TIES - tau_t|`` from the raw task vectors and that TIES vector. (Their
    sign election gives an exactly-zero sum the sign of the whole model's majority; jmerge elects +1
    there: it differs only where trimmed entries cancel exactly.)

    The keyword options override single choices of the variant.

    Args:
      k: minimum number of TALL masks (paper: 2).
      lambda_: TALL mask threshold(s), may be per task; binds to every step that has it.
      density: TIES trim density.
      scale: the final scaling lambda.
      variant: ``"jmerge"`` or ``"authors"``.
      masks_from: ``"stored"`` (masks from the raw sum, by a first ``tall_masks`` step) or ``"merged"``.
      scope, rounding: of the trim (see :func:`jmerge.trim`).
      reduce: of the disjoint merge (see :func:`jmerge.disjoint_merge`).
      strict: ``>`` in the TALL masks.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024); Yadav et al., "TIES-Merging" (NeurIPS 2023).
    """
    from .sparsify import trim  # noqa: PLC0415 - sibling family modules (they import nothing from here)
    from .ties import disjoint_merge, elect_sign  # noqa: PLC0415

    if variant not in ("jmerge", "authors"):
        raise MergeInputError(f"consensus_ties: variant must be 'jmerge' or 'authors', got {variant!r}.")
    base = dict(_CONSENSUS_AUTHORS) if variant == "authors" else \
        {"masks_from": "stored", "scope": "tensor", "reduce": "mean", "rounding": "round", "strict": False}
    given = {"masks_from": masks_from, "scope": scope, "reduce": reduce, "rounding": rounding, "strict": strict}
    o = {**base, **{n: v for n, v in given.items() if v is not None}}
    stored = o["masks_from"] == "stored"
    parts = [tall_masks(lambda_, strict=o["strict"])] if stored else []
    parts += [trim(density, scope=o["scope"], rounding=o["rounding"]), elect_sign(1.0),
              disjoint_merge(1.0, reduce=o["reduce"]),
              consensus_mask(k, lambda_, masks_from=o["masks_from"], strict=o["strict"]), _scale_step(scale)]
    lam = ("tall_masks.lambda_", "consensus_mask.lambda_") if stored else "consensus_mask.lambda_"
    return chain(*parts, name="consensus_ties",
                 aliases={"k": "consensus_mask.k", "lambda_": lam, "density": "trim.density", "scale": "scale.scale"})


def tall_merge(lambda_: HParamSpec = 0.6, scale: HParamSpec = 1.0) -> Transform:
    """Task arithmetic that also returns TALL masks for per-task model retrieval (compression).

    The merged model is ``theta_0 + scale * sum_t tau_t``; with ``return_extras=True`` the extras
    hold ``"tall_masks"`` (masks use the unscaled ``tau_MTL = sum_t tau_t``). Rebuild per-task
    models with :func:`tall_task_models` and store masks with :func:`pack_masks`.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    return chain(tall_masks(lambda_), weighted_sum(1.0), _scale_step(scale), name="tall_merge",
                 aliases={"lambda_": "tall_masks.lambda_", "scale": "scale.scale"})


# --------------------------------------------------------------------------------------------
# Bit-packed masks

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A boolean array stored 1 bit per entry (``np.packbits`` layout, big bit order).

    Attributes:
      bits: uint8 array of ``ceil(prod(shape) / 8)`` bytes.
      shape: shape of the unpacked boolean array.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024).
    """

    bits: Any
    shape: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.bits).nbytes)


def _is_packed(x) -> bool:
    return isinstance(x, PackedMask)


def pack_masks(masks: Any) -> Any:
    """Pack every boolean leaf of ``masks`` into a :class:`PackedMask` (1 bit per entry, 32x smaller
    than float32). Runs on the host (NumPy); the result is a pytree of uint8 arrays.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    def pack(m):
        a = np.asarray(m)
        if a.dtype != np.bool_:
            raise MergeInputError(f"pack_masks: mask leaf has dtype {a.dtype} and shape {a.shape}; give boolean "
                                  "masks (e.g. the 'tall_masks' extras), or cast with `!= 0` first.")
        return PackedMask(bits=np.packbits(a.reshape(-1)), shape=tuple(a.shape))

    return jax.tree.map(pack, masks)


def unpack_masks(packed: Any) -> Any:
    """Inverse of :func:`pack_masks`: a pytree of NumPy boolean arrays with the original shapes.

    Leaves that are not packed pass through as booleans: NumPy stays NumPy, JAX arrays stay JAX arrays (so
    :func:`tall_task_models` runs under ``jax.jit`` with the masks as arguments).

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    def unpack(p):
        if not _is_packed(p):
            return p.astype(bool) if isinstance(p, jax.Array) else np.asarray(p, bool)
        n = int(np.prod(p.shape)) if p.shape else 1
        return np.unpackbits(np.asarray(p.bits, np.uint8), count=n).astype(bool).reshape(p.shape)

    return jax.tree.map(unpack, packed, is_leaf=_is_packed)


def extras_item(extras: Any, key: str) -> Any:
    """One named output from the extras of ``merge(..., return_extras=True)``, as a pytree like the
    params, e.g. ``extras_item(extras, "tall_masks")``.

    Raises:
      MergeInputError: when a leaf's extras lack ``key``.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    is_leaf = lambda x: isinstance(x, dict) and (key in x or not x or
                                                 not any(isinstance(v, dict) for v in x.values()))

    def get(e):
        if not isinstance(e, dict) or key not in e:
            have = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise MergeInputError(f"extras_item: a leaf's extras have no '{key}' (they have {have}); run the "
                                  f"merge with a method that produces '{key}' and return_extras=True.")
        return e[key]

    return jax.tree.map(get, extras, is_leaf=is_leaf)


def _mask_leaves(masks, bpaths, base_leaves, what: str):
    if any(isinstance(x, dict) and "tall_masks" in x
           for x in jax.tree.leaves(masks, is_leaf=lambda x: isinstance(x, dict) and "tall_masks" in x)):
        masks = extras_item(masks, "tall_masks")
    masks = unpack_masks(masks)
    mpaths, mleaves, _ = leaves_with_paths(masks)
    if mpaths != bpaths:
        raise MergeInputError(f"{what}: the masks tree does not match the base tree (first leaves "
                              f"{mpaths[:3]} vs {bpaths[:3]}); give one (T, *shape) mask per base leaf.")
    T = None
    for p, b, m in zip(bpaths, base_leaves, mleaves):
        if tuple(np.shape(m))[1:] != tuple(np.shape(b)):
            raise MergeInputError(f"{what}: leaf '{p}' mask has shape {tuple(np.shape(m))}, expected "
                                  f"(T, *{tuple(np.shape(b))}).")
        if T is None:
            T = np.shape(m)[0]
        elif np.shape(m)[0] != T:
            raise MergeInputError(f"{what}: leaf '{p}' has masks for {np.shape(m)[0]} tasks, other leaves for {T}.")
    return mleaves, T or 0


@jax.jit
def _tall_leaf(b, tau_mtl, masks):
    return jnp.asarray(b, jnp.float32)[None] + jnp.where(masks, tau_mtl[None], 0.0)


def tall_task_models(base: Any, merged: Any, masks: Any, *, delta: bool = False, out_dtype: Any = None) -> list[Any]:
    """Per-task models ``theta_0 + mask_t ⊙ tau_MTL`` from one merged vector and T masks.

    Args:
      base: the base params pytree ``theta_0``.
      merged: the merged params (``tau_MTL = merged - base``), or ``tau_MTL`` itself when ``delta``.
      masks: pytree like ``base`` with ``(T, *shape)`` boolean leaves (``extras_item(extras,
        "tall_masks")``), or its :func:`pack_masks` form, or the extras pytree of
        ``merge(tall_merge(), ..., return_extras=True)`` itself.
      delta: whether ``merged`` is the task vector ``tau_MTL`` rather than params.
      out_dtype: dtype of the outputs (default: each base leaf's).

    Returns:
      A list of T params pytrees, one per task.

    Raises:
      MergeInputError: when the trees or shapes do not match.

    References: Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).
    """
    bpaths, base_leaves, treedef = leaves_with_paths(base)
    gpaths, merged_leaves, _ = leaves_with_paths(merged)
    if gpaths != bpaths:
        raise MergeInputError(f"tall_task_models: the merged tree does not match the base tree (first leaves "
                              f"{gpaths[:3]} vs {bpaths[:3]}).")
    mask_leaves, T = _mask_leaves(masks, bpaths, base_leaves, "tall_task_models")
    per_leaf = []
    for p, b, g, m in zip(bpaths, base_leaves, merged_leaves, mask_leaves):
        if np.shape(g) != np.shape(b):
            raise MergeInputError(f"tall_task_models: leaf '{p}' merged has shape {np.shape(g)} but the base "
                                  f"has {np.shape(b)}.")
        tau = jnp.asarray(g, jnp.float32) - (0.0 if delta else jnp.asarray(b, jnp.float32))
        dt = jnp.dtype(out_dtype) if out_dtype is not None else jnp.asarray(b).dtype
        per_leaf.append(_tall_leaf(b, tau, jnp.asarray(m)).astype(dt))
    return [jax.tree.unflatten(treedef, [x[t] for x in per_leaf]) for t in range(T)]


# --------------------------------------------------------------------------------------------
# PCB

def _minmax(x: jax.Array) -> jax.Array:
    """Min-max normalise each row of ``(..., n)`` to [0, 1]; a constant row gives zeros."""
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)
    rng = hi - lo
    return jnp.where(rng > 0, (x - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)


def _pcb_scores(rows_of, T: int, shape: tuple) -> list:
    """PCB's ``beta_t = intra_t * inter_t`` for the task vectors' rows, each in the leaf's own ``shape``.

    ``rows_of(form)`` gives the T rows of tau (``form`` as in :func:`jmerge.core.diff_rows`): the minima and
    maxima read ``m - b``, the exponentials ``m + (-b)`` (the same bits): with one expression in two passes
    XLA:CPU writes it to memory (fresh pages) first.

    ``softmax(T * Norm(tau_t * tau_s))`` is symmetric in (t, s), so the T (T + 1) / 2 distinct ones are
    computed (the intra term of task t is its (t, t) term). Every statistic reduces over all axes of the
    leaf (not flattened: a sharded leaf is reduced where it lives, never gathered): one variadic reduction
    for the minima and maxima of all pairs; the exponentials are written once (vectorized elementwise: fused
    into a reduction XLA:CPU computes them one at a time) and each pair's sum runs along the last axis first,
    then over the row sums (one variadic reduction over every entry is a sequential float32 loop on XLA:CPU,
    whose sums of ~3M terms were about 1.7% off). The softmax maximum is ``T * Norm(max) = T`` exactly (0 for
    a constant product), so it needs no pass of its own. The exponentials are :func:`uniform_exp`'s and every
    product that feeds an add is :func:`unfused`: equal inputs give equal scores in every lane, so the top-k
    breaks their tie by position, as NumPy's stable sort does (XLA:CPU contracts multiply-adds into FMAs
    and rounds ``exp`` differently in a fusion's vector lanes and in its remainder).

    Sharded, the sums add in another order, so scores agree with one device to float32 rounding, and an
    entry whose score lies within that rounding of the drop threshold may fall on either side.
    """
    n = int(np.prod(shape))
    ax = tuple(range(len(shape)))
    pairs = [(t, u) for t in range(T) for u in range(t, T)]
    P = len(pairs)
    r = rows_of("m-b")
    minmax = lambda a, b: (tuple(jnp.minimum(x, y) for x, y in zip(a[:P], b[:P]))
                           + tuple(jnp.maximum(x, y) for x, y in zip(a[P:], b[P:])))
    init = (np.float32(np.inf),) * P + (np.float32(-np.inf),) * P
    # along the last axis first, then the rest: XLA:CPU vectorizes a row reduction, not a whole one (1.9 -> 1.1 ms
    # on a (1024, 2816) leaf); minima and maxima are exact in any order
    ext = lax.reduce(tuple(r[t] * r[u] for t, u in pairs) * 2, init, minmax, ax[-1:])
    if len(ax) > 1:
        ext = lax.reduce(ext, init, minmax, ax[:-1])
    lo, hi = ext[:P], ext[P:]

    z = opaque_zero(lo[0])  # every product that feeds an add is rounded first, in every lane (unfused)

    def logits(i, r):  # T * Norm(tau_t * tau_u) minus its maximum
        t, u = pairs[i]
        d = hi[i] - lo[i]
        rng = jnp.where(d > 0, d, 1.0)
        norm = (unfused(r[t] * r[u], z) - lo[i]) / rng
        return jnp.where(d > 0, T * (norm - d / rng), 0.0)

    def exps():  # the rows are rebuilt inside the conditional (captured from outside, they would be its operands)
        r = rows_of("m+(-b)")
        return [uniform_exp(logits(i, r), z) for i in range(P)]

    e = materialized(exps, ext[0])
    sums = [jnp.sum(jnp.sum(x, axis=-1)) for x in e]
    sm = {pairs[i]: unfused(n * (e[i] / sums[i]), z) for i in range(P)}
    sm.update({(u, t): v for (t, u), v in list(sm.items())})
    beta = []
    for t in range(T):
        inter = jnp.zeros(shape, jnp.float32)
        for u in range(T):
            inter = inter + sm[(t, u)]
        beta.append(sm[(t, t)] * inter)
    return beta


def _pcb_paper(state: MergeState, ratio):
    """``(tau rows, kept scores rows)`` for the paper variant."""
    T = state.num_models
    shape = state.tau.shape[1:] or (1,)  # a 0-d leaf is one entry
    n = int(np.prod(shape))
    rows_of = lambda form: [jnp.reshape(x, shape) for x in state.tau_rows(form)]  # tau as built: the inputs
    # One buffer per task for the scores (computed from the inputs inside the conditional, so nothing is
    # written before it): the top-k's counting passes and its final mask must read the same values
    # (recomputed in two fusions, an entry at the threshold may round differently and flip).
    beta = materialized(lambda: _pcb_scores(rows_of, T, shape), state.tau)
    keep_k = jnp.broadcast_to(n - density_to_k(ratio, n), (T,))
    v, cut = topk_thresholds_rows(jnp.stack(beta), keep_k, rebuild=lambda g: [g(x) for x in beta])
    kept = [jnp.where(threshold_mask(x, v[t], cut[t]), x, 0.0) for t, x in enumerate(beta)]
    return rows_of("m-b"), kept


def _pcb_authors(tau2: jax.Array, ratio, outlier: float):
    T, n = tau2.shape
    a = jnp.abs(tau2)
    srt = jnp.sort(a, axis=1)
    lo_i, hi_i = int(n * outlier), max(int(n * (1 - outlier) - 1), 0)
    a = jnp.clip(a, srt[:, lo_i:lo_i + 1], srt[:, hi_i:hi_i + 1])
    clamped = sign(tau2) * a
    intra = jnp.exp(T * _minmax(a) ** 2)
    inter = jnp.tanh(tau2 * model_sum(tau2, keepdims=True))
    score = intra * inter
    idx = jnp.clip(jnp.floor(jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), (T,)) * n).astype(jnp.int32), 0, n - 1)
    thr = jnp.take_along_axis(jnp.sort(score, axis=1), idx[:, None], axis=1)
    return clamped, _minmax(jnp.maximum(score, thr))


def _pcb(state: MergeState, hp, *, variant: str, outlier: float) -> MergeState:
    T = state.num_models
    if variant == "authors":  # order statistics of the flattened tensor (sorted whole)
        tau2, beta = _pcb_authors(state.tau.reshape(T, -1), hp["ratio"], outlier)
        total = model_sum(beta, keepdims=True)
        w = beta / jnp.maximum(total, 1e-12)
        merged = hp["scale"] * model_sum(w * tau2)
    else:  # per task row (no stack): each row folds into the expression that built it
        tau_rows, kept = _pcb_paper(state, hp["ratio"])
        total = model_sum(kept)
        ws = [jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0) for x in kept]
        merged = hp["scale"] * model_sum([wt * x for wt, x in zip(ws, tau_rows)])
        w = jnp.stack(ws)
    return state.replace(merged=merged.reshape(state.tau.shape[1:]),
                         extras={**state.extras, "pcb_weights": w.reshape(state.tau.shape)})


def pcb(ratio: HParamSpec = 0.1, scale: HParamSpec = 1.0, *, variant: Literal["paper", "authors"] = "paper",
        outlier: float = 1e-4) -> Transform:
    """PCB merging: balance parameter competition within and across tasks, drop, rescale, merge.

    ``variant="paper"`` (default), per tensor, with ``N`` tasks, ``Norm`` the min-max
    normalisation over the tensor's entries (a constant tensor normalises to 0) and softmax over
    the tensor's entries:

    * intra-balancing ``beta_intra_t = softmax(N * Norm(tau_t ⊙ tau_t))``;
    * inter-balancing ``beta_inter_t = sum_s softmax(N * Norm(tau_t ⊙ tau_s))``;
    * ``beta_t = beta_intra_t ⊙ beta_inter_t``; per task, the lowest ``ratio`` fraction of
      ``beta_t`` (``round(ratio * n)`` entries, ties broken by index) is set to 0;
    * ``merged = scale * sum_t beta_t tau_t / sum_s beta_s`` (0 where no task is kept).

    ``variant="authors"`` follows the authors' released code, per tensor: ``|tau_t|`` clamped to its
    ``outlier`` and ``1 - outlier`` order statistics (``tau_t`` keeps its sign); intra
    ``exp(N * Norm(|tau_t|)^2)``; inter ``tanh(tau_t * sum_s tau_s)``; score = intra * inter;
    per task the score is clamped from below at its ``floor(ratio * n)``-th smallest value and
    min-max normalised (so the lowest ``ratio`` fraction gets weight 0, the rest weights in
    (0, 1]); ``merged = scale * sum_t w_t tau_t / max(sum_t w_t, 1e-12)``. The authors'
    ``pcb_ratio`` is the fraction *kept*: their ``pcb_ratio=0.1`` is ``ratio=0.9`` here; they
    flatten the whole model, jmerge scores per tensor.

    The per-task weights (divided by their sum over tasks) are in ``extras["pcb_weights"]``.

    Args:
      ratio: fraction of entries dropped per task and tensor, in [0, 1]; may be per model.
      scale: the final scaling lambda.
      variant: ``"paper"`` or ``"authors"`` (see above).
      outlier: ``"authors"`` only: fraction clamped at each end of ``|tau_t|`` (static).

    References: Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024).
    """
    if variant not in ("paper", "authors"):
        raise MergeInputError(f"pcb: variant must be 'paper' or 'authors', got {variant!r}.")
    if not 0.0 <= float(outlier) < 0.5:
        raise MergeInputError(f"pcb: outlier must be in [0, 0.5), got {outlier!r}.")
    return transform("pcb", _pcb, hparams={"ratio": ratio, "scale": scale}, per_model=("ratio",),
                     static={"variant": variant, "outlier": float(outlier)}, ranges={"ratio": (0.0, 1.0)})


# --------------------------------------------------------------------------------------------
# EMR

def _emr_parts(tau: jax.Array | list):
    """``(tau_uni, masks, num, den)`` from ``tau`` (T, *shape) or its rows (a list; see :meth:`MergeState.tau_rows`),
    row by row (model_sum's and model_max's order)."""
    rs = rows(tau) if not isinstance(tau, list) else tau
    T = len(rs)
    gamma = sign(model_sum(rs))  # core.xla.sign: jnp.sign, vectorized
    masks = [x * gamma > 0 for x in rs]
    kept = [jnp.where(m, jnp.abs(x), 0.0) for x, m in zip(rs, masks)]
    top = model_max(kept)  # |tau_uni|
    tau_uni = gamma * top
    # mask_t ⊙ |tau_uni| written as where(kept_t > 0, top, 0) (the same numbers: a kept entry is nonzero):
    # XLA:CPU's fused variadic reduction is then 7 ms per (3, 1024, 2816) leaf, not 26.
    sums = totals(*[jnp.abs(r) for r in rs], *[jnp.where(k > 0, top, 0.0) for k in kept])
    return tau_uni, jnp.stack(masks), jnp.stack(sums[:T]), jnp.stack(sums[T:])


_EMR_SCOPES = ("model", "model_sum", "tensor")


def _emr_stat(num, den, n: int, scope: str):
    """Per-tensor contribution to the whole-model rescaler: means (authors' code) or sums (paper)."""
    d = n if scope == "model" else 1
    return jnp.stack([num / d, den / d])


def _emr_collect_fn(scope: str):
    def collect(state: MergeState, hp):
        _, _, num, den = _emr_parts(state.tau_rows())
        return _emr_stat(num, den, state.tau[0].size, scope)
    return collect


def _emr_finalize(collected, hps):
    tot = np.sum([np.asarray(c, np.float64) for c in collected], axis=0)
    s = np.where(tot[1] > 0, tot[0] / np.where(tot[1] > 0, tot[1], 1.0), 1.0).astype(np.float32)
    return [jnp.asarray(s) for _ in collected]


def _emr_finalize_traced(collected, hps):
    tot = model_sum(jnp.stack(collected))  # inside a trace: float32 on the device
    s = jnp.where(tot[1] > 0, tot[0] / jnp.where(tot[1] > 0, tot[1], 1.0), 1.0)
    return [s for _ in collected]


def _emr(state: MergeState, hp, *, scope: str) -> MergeState:
    tau_uni, masks, num, den = _emr_parts(state.tau_rows())
    if scope == "tensor":
        s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)
    else:
        s = state.stats["emr_rescalers"]
    return state.replace(merged=tau_uni, extras={**state.extras, "emr_masks": masks, "emr_rescalers": s})


def _check_emr_scope(where: str, scope: str) -> None:
    if scope not in _EMR_SCOPES:
        raise MergeInputError(f"{where}: scope must be one of {list(_EMR_SCOPES)}, got {scope!r}.")


def emr_merge(scope: Literal["model", "model_sum", "tensor"] = "model") -> Transform:
    """EMR merging: the unified task vector ``tau_uni``, with per-task masks and rescalers as extras.

    ``gamma = sign(sum_t tau_t)``; ``mask_t = [tau_t * gamma > 0]``;
    ``tau_uni = gamma * max_t |tau_t| over the tasks with mask_t``; rescaler
    ``s_t = sum|tau_t| / sum|mask_t ⊙ tau_uni|``. The merged model is ``theta_0 + tau_uni`` (the
    "unified" model); per-task models ``theta_0 + s_t mask_t ⊙ tau_uni`` come from
    :func:`emr_task_models` or from the extras ``"emr_masks"`` (bool ``(T, *shape)``) and
    ``"emr_rescalers"`` (``(T,)``). Where ``sum_t tau_t = 0`` the sign is 0 and no task keeps the
    entry (FusionBench counts 0 as negative). A task whose mask is empty gets ``s_t = 1``.

    Args:
      scope: the rescaler ``s_t``: ``"model"`` (default): one per task for the whole model, as the
        authors' code and FusionBench compute it (the sum over tensors of the per-tensor mean
        ``|tau_t|`` over that of the per-tensor mean ``|mask_t ⊙ tau_uni|``); ``"model_sum"``: one per
        task from whole-model sums, the paper's formula literally; ``"tensor"``: one per task and
        tensor (streams without a statistics pass).

    References: Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging"
    (NeurIPS 2024).
    """
    _check_emr_scope("emr_merge", scope)
    stats = () if scope == "tensor" else \
        (StatsPhase("emr_rescalers", _emr_collect_fn(scope), _emr_finalize, _emr_finalize_traced),)
    return transform("emr_merge", _emr, static={"scope": scope}, stats=stats)


def emr_task_models(base: Any, models: Sequence[Any] | None = None, *, task_vectors: Any = None,
                    scope: Literal["model", "model_sum", "tensor"] = "model", out_dtype: Any = None) -> list[Any]:
    """Per-task EMR models ``theta_0 + s_t * mask_t ⊙ tau_uni`` (see :func:`emr_merge`).

    Args:
      base: the base params pytree.
      models: the T fine-tuned params pytrees (or give ``task_vectors``, leaves ``(T, *shape)``).
      task_vectors: stacked task vectors instead of ``models``.
      scope: rescaler scope, ``"model"``, ``"model_sum"`` or ``"tensor"`` (see :func:`emr_merge`).
      out_dtype: dtype of the outputs (default: each base leaf's).

    Returns:
      A list of T params pytrees, one per task.

    Raises:
      MergeInputError: for mismatched trees or shapes, or a bad ``scope``.

    References: Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging"
    (NeurIPS 2024).
    """
    _check_emr_scope("emr_task_models", scope)
    if (models is None) == (task_vectors is None):
        raise MergeInputError("emr_task_models: give exactly one of `models` or `task_vectors`.")
    if task_vectors is None:
        tv = task_vectors_of(base, list(models))
    else:
        tv = task_vectors
    _, base_leaves, treedef = leaves_with_paths(base)
    _, tv_leaves, _ = check_task_vectors(base, tv, "emr_task_models")
    parts = [_emr_parts_jit(jnp.asarray(t, jnp.float32)) for t in tv_leaves]
    if scope != "tensor":
        s_model = _emr_finalize([_emr_stat(num, den, t[0].size, scope)
                                 for (_, _, num, den), t in zip(parts, tv_leaves)], None)[0]
    per_leaf = []
    for b, (tau_uni, masks, num, den) in zip(base_leaves, parts):
        s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0) if scope == "tensor" else s_model
        dt = jnp.dtype(out_dtype) if out_dtype is not None else jnp.asarray(b).dtype
        per_leaf.append(_emr_leaf(b, tau_uni, masks, s).astype(dt))
    T = per_leaf[0].shape[0] if per_leaf else 0
    return [jax.tree.unflatten(treedef, [x[t] for x in per_leaf]) for t in range(T)]


_emr_parts_jit = jax.jit(_emr_parts)


@jax.jit
def _emr_leaf(b, tau_uni, masks, s):
    b = jnp.asarray(b, jnp.float32)
    s = s.reshape((-1,) + (1,) * b.ndim)
    return b[None] + s * jnp.where(masks, tau_uni[None], 0.0)


METHODS = {
    "consensus_ta": consensus_ta,
    "consensus_ties": consensus_ties,
    "tall_merge": tall_merge,
    "pcb": pcb,
    "emr": emr_merge,
}
