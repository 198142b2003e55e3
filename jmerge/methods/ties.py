"""Sign election, disjoint merge, and the TIES family: TIES, DARE, Breadcrumbs, DELLA, MagMax, SCE.

Paper versus mergekit. The papers' TIES trims over the whole model per task (``scope="global"``),
elects the sign of the unweighted sum, and averages the agreeing entries by count. mergekit trims
per tensor, multiplies each task vector by its weight before electing (``weighted=True``), divides
by the summed weights of the agreeing models (``normalize_by="weight"``, or sums with
``normalize: false`` = ``reduce="sum"``), and rescales DARE/DELLA survivors to the tensor's L1 norm
(``rescale="l1"``). Both are expressible with the options of each factory; with unit weights the
weighted/unweighted and count/weight choices coincide.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jax import lax

from ..core import (HParamSpec, MergeInputError, MergeState, Transform, chain, model_mean, model_sum,
                    transform)
from ..core.select import threshold_mask, threshold_word, topk_thresholds_rows
from ..core.xla import counts, materialized, rows, sign as _sign, totals
from ..kernels import backend as _kernel_backend
from ..kernels.arith import disjoint_aggregate
from .basic import per_model, scale as _scale_step, weighted_sum
from .sparsify import _check_option, breadcrumbs_drop, dare, della_drop, trim

__all__ = ["elect_sign", "disjoint_merge", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "magmax", "sce"]


# --------------------------------------------------------------------------------------------
# Steps

def _weights(hp_value, state: MergeState):
    return rows(state.rounded(per_model(hp_value, state)))


def _elect_sign(state: MergeState, hp, *, method: str, weighted: bool) -> MergeState:
    r = state.rounded  # identity in float32; rounds where a merge computed in bf16/fp16 rounds
    taus = rows(state.tau)
    x = [r(w * t) for w, t in zip(_weights(hp["weight"], state), taus)] if weighted else taus
    votes = r(sum(x[1:], x[0])) if method == "sum" else sum([_sign(v) for v in x[1:]], _sign(x[0]))
    sign = jnp.where(votes >= 0, 1.0, -1.0).astype(jnp.float32)
    return state.replace(extras={**state.extras, "sign": sign})


def _elementwise(step):
    """The step itself: it computes entry by entry, so it runs unchanged on a tensor's chunks."""
    return step


_elect_sign.chunk_form = _elementwise  # read by jmerge.core.chunks.chunked_form
_elect_sign.entrywise = True  # each entry's sign from the same entries alone (read by jmerge.core.chunks.entrywise)


def elect_sign(weight: HParamSpec = 1.0, *, method: Literal["sum", "count"] = "sum",
               weighted: bool = True) -> Transform:
    """Elect one sign per entry and store it in ``state.extras["sign"]`` (+1 or -1).

    ``method="sum"``: the sign of ``sum_t x_t`` (the TIES paper: the sign of the larger total mass);
    ``method="count"``: the majority of the signs of ``x_t``. ``x_t = w_t tau_t`` when ``weighted``
    (mergekit) else ``tau_t`` (the paper, which has no weights). A zero total elects +1 (as
    mergekit); since zero entries never agree with a sign, entries that are zero in every task
    merge to 0 whatever the elected sign.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    _check_option("method", method, ("sum", "count"))
    return transform("elect_sign", _elect_sign, hparams={"weight": weight},
                     static={"method": method, "weighted": bool(weighted)}, per_model=("weight",))


def _disjoint_merge(state: MergeState, hp, *, reduce: str, normalize_by: str, backend: str = "xla") -> MergeState:
    if "sign" not in state.extras:
        raise MergeInputError("disjoint_merge needs an elected sign: put elect_sign(...) before it in the chain.")
    sign = state.extras["sign"]
    if _kernel_backend.use_pallas(backend, state.base.size, state.precision):  # the fused Pallas pass
        from ..kernels.fused import masked_merge
        return state.replace(merged=masked_merge(state.tau, stacked=True, sign=sign, weights=hp["weight"],
                                                 reduce=reduce, normalize_by=normalize_by, add_base=False,
                                                 precision=state.precision, round_inputs=False))
    # state.rounded: identity in float32; rounds where a merge computed in bf16/fp16 rounds
    total = disjoint_aggregate(rows(state.tau), _weights(hp["weight"], state), sign, reduce=reduce,
                               normalize_by=normalize_by, r=state.rounded)
    return state.replace(merged=total)


def _fuse_chain(*args, **kwargs):
    """The whole chain as one fused pass where the Pallas backend applies (``methods.ties_fused``)."""
    from .ties_fused import fuse_chain  # imported when a leaf is traced: no import cycle

    return fuse_chain(*args, **kwargs)


_disjoint_merge.fuse_chain = _fuse_chain  # offered to the driver (jmerge.core.driver._fused_leaf)
_disjoint_merge.chunk_form = lambda step: None if dict(step.static).get("backend") == "pallas" else step
_disjoint_merge.entrywise = lambda step: dict(step.static).get("backend") != "pallas"  # (jmerge.core.chunks.entrywise)


def disjoint_merge(weight: HParamSpec = 1.0, *, reduce: Literal["mean", "sum"] = "mean",
                   normalize_by: Literal["count", "weight"] = "count") -> Transform:
    """Aggregate the entries that agree with the elected sign (``state.extras["sign"]``).

    An entry of task ``t`` agrees when its weighted contribution ``w_t tau_t`` is nonzero and has
    the elected sign. ``merged = sum_{t agreeing} w_t tau_t``, divided for ``reduce="mean"`` by the
    number of agreeing tasks (``normalize_by="count"``, the paper's disjoint mean) or by the sum of
    their weights (``normalize_by="weight"``, mergekit's ``normalize: true``); a zero divisor counts
    as 1. ``reduce="sum"`` skips the division (mergekit's ``normalize: false``, FusionBench's
    ``merge_func: sum``).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    _check_option("reduce", reduce, ("mean", "sum"))
    _check_option("normalize_by", normalize_by, ("count", "weight"))
    return transform("disjoint_merge", _disjoint_merge, hparams={"weight": weight},
                     static={"reduce": reduce, "normalize_by": normalize_by,
                             "backend": _kernel_backend.requested_merge_backend()}, per_model=("weight",))


def _sign_and_merge(weight: HParamSpec, sign_method: str, weighted: bool, reduce: str,
                    normalize_by: str) -> tuple[Transform, Transform]:
    return (elect_sign(weight, method=sign_method, weighted=weighted),
            disjoint_merge(weight, reduce=reduce, normalize_by=normalize_by))


# Public names of the TIES-style chains: one weight for the election and the merge.
_TIES_ALIASES = {"weight": ("elect_sign.weight", "disjoint_merge.weight"), "scale": "scale.scale"}


# --------------------------------------------------------------------------------------------
# Named methods

def ties(density: HParamSpec = 0.2, scale: HParamSpec = 1.0, weight: HParamSpec = 1.0, *,
         scope: Literal["tensor", "global"] = "tensor", reduce: Literal["mean", "sum"] = "mean",
         normalize_by: Literal["count", "weight"] = "count", weighted: bool = True,
         sign_method: Literal["sum", "count"] = "sum",
         rounding: Literal["round", "floor", "authors"] = "round") -> Transform:
    """TIES-Merging: trim, elect sign, disjoint merge, scale: ``theta_0 + scale * merged``.

    Steps ``trim``, ``elect_sign``, ``disjoint_merge``, ``scale``; ``density`` binds to
    ``trim.density``, ``weight`` to both ``elect_sign.weight`` and ``disjoint_merge.weight``.

    Defaults follow the paper (density 0.2, scale 1.0, disjoint mean by count) except the trim
    scope: ``scope="tensor"`` ranks per tensor (mergekit, streamable); the paper's whole-model
    top-k per task is ``scope="global"`` (FusionBench; also ``reduce="sum"`` there). The authors'
    code keeps ``int(density * n) + 1`` entries: ``rounding="authors"``. mergekit's ``ties`` is
    ``scope="tensor", weighted=True, normalize_by="weight", rounding="floor"`` (``normalize: false``
    -> ``reduce="sum"``, mergekit's ``lambda`` is ``scale``); the paper's unweighted election is
    ``weighted=False`` (identical with unit weights).

    Args:
      density: fraction of each task vector kept by the trim, in [0, 1]; may be per model.
      scale: the paper's lambda.
      weight: per-model weights (``PerModel``), applied to the contributions.
      scope, rounding: see :func:`jmerge.trim`.
      reduce, normalize_by: see :func:`jmerge.disjoint_merge`.
      weighted, sign_method: see :func:`jmerge.elect_sign`.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023).
    """
    return chain(trim(density, scope=scope, rounding=rounding),
                 *_sign_and_merge(weight, sign_method, weighted, reduce, normalize_by),
                 _scale_step(scale), name="ties", aliases={"density": "trim.density", **_TIES_ALIASES})


def dare_linear(density: HParamSpec = 0.5, scale: HParamSpec = 1.0, weight: HParamSpec = 1.0, *,
                rescale: Literal["inverse", "l1", "none"] = "inverse", normalize: bool = False) -> Transform:
    """DARE then task arithmetic: ``theta_0 + scale * sum_t w_t dare(tau_t)``.

    The paper rescales survivors by ``1 / density``; mergekit's ``dare_linear`` rescales to the
    tensor's L1 norm (``rescale="l1"``), and ``normalize: true`` divides by the weight sum.

    References: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch" (ICML 2024).
    """
    return chain(dare(density, rescale=rescale), weighted_sum(weight, normalize), _scale_step(scale),
                 name="dare_linear", aliases={"density": "dare.density", "weight": "weighted_sum.weight",
                                              "scale": "scale.scale"})


def dare_ties(density: HParamSpec = 0.5, scale: HParamSpec = 1.0, weight: HParamSpec = 1.0, *,
              rescale: Literal["inverse", "l1", "none"] = "inverse", reduce: Literal["mean", "sum"] = "mean",
              normalize_by: Literal["count", "weight"] = "count", weighted: bool = True,
              sign_method: Literal["sum", "count"] = "sum", trim_density: HParamSpec | None = None,
              rounding: Literal["round", "floor", "authors"] = "round") -> Transform:
    """DARE then TIES' sign election and disjoint merge, then scale; optionally a TIES trim after the drop.

    Steps ``dare`` (``density``), [``trim`` (``trim_density``)], ``elect_sign``, ``disjoint_merge``,
    ``scale``. Paper: ``rescale="inverse"`` and the disjoint mean. mergekit's ``dare_ties``:
    ``rescale="l1", reduce="sum"`` (its ``normalize`` defaults to false; ``normalize: true`` is
    ``reduce="mean", normalize_by="weight"``), no trim. The DARE authors' code and FusionBench trim
    the dropped task vectors to their top 20% by magnitude before the election:
    ``trim_density=0.2``.

    Args:
      density: DARE keep probability.
      trim_density: when given, keep this fraction of each dropped task vector (top-k by magnitude,
        per tensor, with ``rounding``) before electing signs; ``None`` (default) skips the trim.
      rounding: the trim's rounding (see :func:`jmerge.trim`).

    References: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch" (ICML 2024); Yadav et al., "TIES-Merging" (NeurIPS 2023).
    """
    parts = [dare(density, rescale=rescale)]
    aliases = {"density": "dare.density", **_TIES_ALIASES}
    if trim_density is not None:
        parts.append(trim(trim_density, rounding=rounding))
        aliases["trim_density"] = "trim.density"
    return chain(*parts, *_sign_and_merge(weight, sign_method, weighted, reduce, normalize_by),
                 _scale_step(scale), name="dare_ties", aliases=aliases)


def breadcrumbs(density: HParamSpec = 0.9, gamma: HParamSpec = 0.01, scale: HParamSpec = 1.0,
                weight: HParamSpec = 1.0, *, normalize: bool = False,
                rounding: Literal["round", "floor"] = "round") -> Transform:
    """Model Breadcrumbs: drop outliers and small entries per tensor, then task arithmetic.

    mergekit's ``breadcrumbs`` uses ``rounding="floor"``; when ``gamma * n`` rounds to 0 no outliers
    are dropped here (some mergekit releases then keep nothing).

    References: Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks" (ECCV 2024).
    """
    return chain(breadcrumbs_drop(density, gamma, rounding=rounding), weighted_sum(weight, normalize),
                 _scale_step(scale), name="breadcrumbs",
                 aliases={"density": "breadcrumbs.density", "gamma": "breadcrumbs.gamma",
                          "weight": "weighted_sum.weight", "scale": "scale.scale"})


def breadcrumbs_ties(density: HParamSpec = 0.9, gamma: HParamSpec = 0.01, scale: HParamSpec = 1.0,
                     weight: HParamSpec = 1.0, *, reduce: Literal["mean", "sum"] = "mean",
                     normalize_by: Literal["count", "weight"] = "count", weighted: bool = True,
                     sign_method: Literal["sum", "count"] = "sum",
                     rounding: Literal["round", "floor"] = "round") -> Transform:
    """Model Breadcrumbs mask, then TIES' sign election and disjoint merge, then scale.

    mergekit's ``breadcrumbs_ties``: ``reduce="sum", rounding="floor"`` (``normalize: true`` is
    ``reduce="mean", normalize_by="weight"``).

    References: Davari and Belilovsky, "Model Breadcrumbs" (ECCV 2024); Yadav et al.,
    "TIES-Merging" (NeurIPS 2023).
    """
    return chain(breadcrumbs_drop(density, gamma, rounding=rounding),
                 *_sign_and_merge(weight, sign_method, weighted, reduce, normalize_by),
                 _scale_step(scale), name="breadcrumbs_ties",
                 aliases={"density": "breadcrumbs.density", "gamma": "breadcrumbs.gamma", **_TIES_ALIASES})


def della(density: HParamSpec = 0.7, epsilon: HParamSpec = 0.15, scale: HParamSpec = 1.0, weight: HParamSpec = 1.0,
          *, rescale: Literal["inverse", "l1", "none"] = "inverse", reduce: Literal["mean", "sum"] = "mean",
          normalize_by: Literal["count", "weight"] = "count", weighted: bool = True,
          sign_method: Literal["sum", "count"] = "sum") -> Transform:
    """DELLA: magnitude-ranked random drop (MagPrune), sign election, disjoint merge, scale.

    Paper: survivors rescaled by ``1 / p_i``. mergekit's ``della``: ``rescale="l1",
    normalize_by="weight"`` (its ``normalize`` defaults to true), ``lambda`` = ``scale``.

    References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024).
    """
    return chain(della_drop(density, epsilon, rescale=rescale),
                 *_sign_and_merge(weight, sign_method, weighted, reduce, normalize_by),
                 _scale_step(scale), name="della",
                 aliases={"density": "della.density", "epsilon": "della.epsilon", **_TIES_ALIASES})


def della_linear(density: HParamSpec = 0.7, epsilon: HParamSpec = 0.15, scale: HParamSpec = 1.0,
                 weight: HParamSpec = 1.0, *, rescale: Literal["inverse", "l1", "none"] = "inverse",
                 normalize: bool = False) -> Transform:
    """DELLA's MagPrune drop, then task arithmetic (mergekit's ``della_linear``: ``rescale="l1"``).

    References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024).
    """
    return chain(della_drop(density, epsilon, rescale=rescale), weighted_sum(weight, normalize),
                 _scale_step(scale), name="della_linear",
                 aliases={"density": "della.density", "epsilon": "della.epsilon", "weight": "weighted_sum.weight",
                          "scale": "scale.scale"})


def _magmax(state: MergeState, hp, *, tie: str) -> MergeState:
    # Unrolled over the model axis (see model_sum).
    picked = state.tau[0]
    for t in range(1, state.num_models):
        a, b = jnp.abs(state.tau[t]), jnp.abs(picked)
        better = a >= b if tie == "last" else a > b
        picked = jnp.where(better, state.tau[t], picked)
    return state.replace(merged=picked)


def magmax(scale: HParamSpec = 0.5, *, tie: Literal["last", "first"] = "last") -> Transform:
    """MagMax: per entry, the task vector entry of largest magnitude; ``theta_0 + scale * tau_max``.

    Args:
      scale: the final scaling lambda.
      tie: which model wins an exact tie in magnitude: ``"last"`` (the latest task, as the authors'
        code and FusionBench, whose comparison is ``>=``) or ``"first"`` (the earliest).

    References: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning"
    (ECCV 2024).
    """
    _check_option("tie", tie, ("last", "first"))
    return chain(transform("magmax", _magmax, static={"tie": tie}), _scale_step(scale), name="magmax",
                 aliases={"scale": "scale.scale"})


def _sce(state: MergeState, hp, *, rounding: str) -> MergeState:
    # Row by row (the models' rows of tau, never stacked: XLA:CPU wrote tau and the selected tau as
    # (T, *shape) arrays when steps took them whole); the same arithmetic as on the stack. The passes read
    # tau in three forms of the same bits (state.tau_rebuild): the variance from base - model_t (its
    # squares do not see the sign), the energies from model_t + (-base), the result from model_t - base;
    # with one expression in several passes XLA:CPU wrote tau's rows to memory to read them in each.
    T = state.num_models
    r = state.rounded  # identity in float32; rounds where a merge computed in bf16/fp16 rounds
    taus = [state.tau[t] for t in range(T)]
    form = state.tau_rows  # tau's rows in a form of the same bits (each pass its own)

    def variance(xs):  # population variance across tasks; the same bits for -xs
        mu = model_sum(xs) / T
        return r(model_sum([jnp.square(x - mu) for x in xs]) / T)

    # written once: the count, the top-k search and the energies read it
    var = materialized(lambda: variance(form("b-m")), state.base)
    nonzero = counts(var != 0)[0]
    d = jnp.asarray(hp["density"], jnp.float32)
    x = d * nonzero.astype(jnp.float32)
    k = jnp.round(x) if rounding == "round" else jnp.floor(x * (1.0 + 2.0 ** -21))
    k = jnp.where(d >= 1, var.size, jnp.clip(k, 0, var.size)).astype(jnp.int32)
    v, cut = topk_thresholds_rows(var[None], k[None])  # in the leaf's shape: a sharded leaf is not gathered
    # mean(tau_t^2) per model over the selected entries: the T sums in one variadic reduction over the
    # leaf's own shape (not flattened: sharding), the selection as an int32 word (threshold_word)
    word = threshold_word(var, v[0], cut[0])
    bits = lambda y: lax.bitcast_convert_type(y, jnp.int32)
    sq = [lax.bitcast_convert_type(bits(r(jnp.square(x))) & word, jnp.float32) for x in form("m+(-b)")]
    sums = totals(*sq, flatten=False)
    energy = r(jnp.stack(sums) / jnp.float32(max(var.size, 1)))
    esum = r(jnp.sum(energy))
    wt = jnp.where(jnp.abs(esum) < 1e-6, r(jnp.full((T,), 1.0 / T)), r(energy / jnp.where(esum == 0, 1.0, esum)))
    select = threshold_mask(var, v[0], cut[0])
    taus = [jnp.where(select, x, 0.0) for x in taus]
    votes = r(model_sum(taus))
    sign = jnp.where(votes >= 0, 1.0, -1.0)
    ew = [jnp.where(_sign(x) == sign, wt[t], 0.0) for t, x in enumerate(taus)]  # erase
    merged = r(r(model_sum([r(x * e) for x, e in zip(taus, ew)])) / r(jnp.maximum(r(model_sum(ew)), 1e-6)))
    return state.replace(merged=merged, extras={**state.extras, "sign": sign, "sce_mask": select})


def sce(density: HParamSpec = 1.0, scale: HParamSpec = 1.0, *,
        rounding: Literal["round", "floor"] = "floor") -> Transform:
    """SCE (Select, Calculate, Erase), as defined by mergekit's ``sce``.

    Per tensor: Select keeps the ``k = density * (number of entries with nonzero variance)``
    entries of largest variance across the task vectors (one mask for all tasks; ``density >= 1``
    keeps all); Calculate weighs task ``t`` by ``mean(tau_t^2) / sum_s mean(tau_s^2)`` over the
    selected tensor (uniform when that sum is below 1e-6); Erase keeps only entries agreeing with
    the sign of the (unweighted) sum; ``merged = sum_t w_t m_t tau_t / max(sum_t w_t m_t, 1e-6)``,
    then ``scale``. mergekit's ``select_topk`` is ``density`` here (``rounding="floor"`` as its ``int``).

    References: Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (SCE merging, 2024).
    """
    _check_option("rounding", rounding, ("round", "floor"))
    return chain(transform("sce", _sce, hparams={"density": density}, static={"rounding": rounding},
                           ranges={"density": (0.0, 1.0)}), _scale_step(scale), name="sce",
                 aliases={"density": "sce.density", "scale": "scale.scale"})


METHODS = {
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "magmax": magmax,
    "sce": sce,
}
