"""The TIES family on GPU/TPU: the whole leaf as exact top-k thresholds (XLA) plus one fused Pallas pass.

A chain ``[drop or trim] -> elect_sign -> disjoint_merge [-> scale]`` whose ``disjoint_merge`` was built
for the Pallas backend (:mod:`jmerge.kernels.backend`: ``"pallas"`` forced, or ``"auto"`` on a single device
of a backend in ``AUTO_PALLAS_BACKENDS`` for leaves of at least ``AUTO_MIN_ENTRIES`` entries) runs per leaf as:

- the selection's parameters, computed by XLA from the inputs (the models and base are read by the
  counting passes; no trimmed task vector is written): per-model top-k thresholds ``(v, cut)``
  (:func:`jmerge.core.select.topk_thresholds_rows`, ties at the threshold kept at the lowest flat
  index, exactly as ``trim``), the global top-k's thresholds (``trim(scope="global")``), Model
  Breadcrumbs' keep and outlier thresholds, or for the random drops (DARE, DELLA with ``rescale="l1"``
  or ``"none"``) the keep mask (int8) and per-model rescale factors;
- one :func:`jmerge.kernels.masked_merge` call that reads the models and the base once, forms the task
  vectors, applies the selection, elects signs, aggregates, scales and writes ``base + delta`` in the
  output dtype.

The numbers are those of the XLA path bit for bit (the kernel is jmerge's arithmetic operation for
operation; tests compare them). Other prefixes (DELLA with ``rescale="inverse"``, whose factors are per
entry, user chains) run their steps on XLA and give the kernel the resulting task vectors (``stacked``):
the election, aggregation, scale and ``base + delta`` stay one pass. ``return_extras`` merges use the
step-by-step route (the masks are outputs then).

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Yu et al., "Language Models are Super Mario" (DARE, ICML 2024); Davari and Belilovsky, "Model Breadcrumbs"
(ECCV 2024); Deep et al., "DELLA-Merging" (2024).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from ..core import MergeState, Transform
from ..core import select as _select
from ..core.transform import run_steps
from ..core.xla import bernoulli as _bernoulli
from ..kernels import backend as _kernel_backend
from .basic import _scale, per_model
from .sparsify import (_TRIM_STATS, _breadcrumbs, _breadcrumbs_ks, _dare, _della, _l1_factors, _trim, _trim_k,
                       della_keep_probs)
from .ties import _disjoint_merge, _elect_sign

__all__ = ["fuse_chain"]


def _drop_factors(state: MergeState, keep, p, rescale: str):
    """The per-model factors of a drop's survivors (None: not rescaled); ``p`` per model ``(T, 1, ...)``
    (DARE's ``inverse``) or per entry (then only ``l1``/``none`` reach here)."""
    if rescale == "inverse":
        return jnp.where(p > 0, 1.0 / jnp.where(p > 0, p, 1.0), 0.0).reshape(-1)
    if rescale == "l1":
        return _l1_factors(state.tau, jnp.where(keep, state.tau, 0.0))
    return None


def _selection(prefix, state: MergeState, hp, stats) -> dict | None:
    """The kernel's selection arguments for the steps before ``elect_sign``; None where it has none."""
    kinds = [s.update for _, s in prefix]
    if not kinds:
        return {}
    (n0, s0) = prefix[0]
    st0 = dict(s0.static)
    if kinds == [_trim]:
        if st0["scope"] == "global":
            g = state.replace(stats=dict(stats.get(n0, {})))
            return {"thresholds": _select.global_topk_thresholds(g, _TRIM_STATS)}
        k = _trim_k(state, s0.own_hparams(n0, hp), st0["rounding"])
        # the counting passes read the models (tau_rebuild): the task vectors are never written
        return {"thresholds": _select.topk_thresholds_rows(state.tau, k, magnitude=True, rebuild=state.tau_rebuild())}
    if kinds == [_breadcrumbs]:
        k_keep, k_top = _breadcrumbs_ks(state, s0.own_hparams(n0, hp), st0["rounding"])
        # both searches read the models (the step materializes tau; here nothing reads it, so it is not built),
        # sharing their counting passes
        v, cut = _select.topk_thresholds_rows(state.tau, jnp.stack([k_top + k_keep, k_top]), magnitude=True,
                                              rebuild=state.tau_rebuild())
        return {"thresholds": (v[0], cut[0]), "drop_thresholds": (v[1], cut[1])}
    if kinds[0] is _dare and kinds[1:] in ([], [_trim]):
        p = per_model(s0.own_hparams(n0, hp)["density"], state)
        keep = _bernoulli(state.key, jnp.broadcast_to(p, state.tau.shape))
        out = {"masks": keep, "mask_scale": _drop_factors(state, keep, p, st0["rescale"])}
        if len(prefix) == 2:
            (n1, s1) = prefix[1]
            if dict(s1.static)["scope"] != "tensor":
                return None
            dropped = _dare(state, s0.own_hparams(n0, hp), **st0)  # the values the trim ranks (XLA, for the search)
            k = _trim_k(dropped, s1.own_hparams(n1, hp), dict(s1.static)["rounding"])
            out["thresholds"] = _select.topk_thresholds_rows(dropped.tau, k, magnitude=True)
        return out
    if kinds == [_della] and st0["rescale"] in ("l1", "none"):
        own = s0.own_hparams(n0, hp)
        p = della_keep_probs(state.tau, own["density"], own["epsilon"])
        keep = _bernoulli(state.key, p)
        return {"masks": keep, "mask_scale": _drop_factors(state, keep, p, st0["rescale"])}
    return None


def fuse_chain(method: Transform, state: MergeState, hp: Mapping[str, Any], stats: Mapping[str, Any], *,
               base_leaf: Any, model_leaves: Any, stacked: bool | str, out_dtype: Any):
    """The merged leaf of a TIES-family chain through the fused kernel, or None where this route does not
    apply (another backend, a chain of another form): the driver then runs the steps.

    Called by the driver (``jmerge.core.driver``) before the steps run, with the leaf's initial state.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    steps = method.steps
    updates = [s.update for _, s in steps]
    if updates.count(_elect_sign) != 1 or updates.count(_disjoint_merge) != 1:
        return None
    i = updates.index(_elect_sign)
    tail = updates[i + 2:]
    if i + 1 >= len(steps) or updates[i + 1] is not _disjoint_merge or tail not in ([], [_scale]):
        return None
    (es_name, es), (dm_name, dm) = steps[i], steps[i + 1]
    dm_static, es_static = dict(dm.static), dict(es.static)
    if not _kernel_backend.use_pallas(dm_static.get("backend", "xla"), state.base.size, state.precision):
        return None
    from ..kernels.fused import masked_merge

    dt = jnp.dtype(out_dtype) if out_dtype is not None else jnp.asarray(base_leaf).dtype
    common = dict(weights=hp[f"{dm_name}.weight"], elect_weights=hp[f"{es_name}.weight"],
                  weighted=es_static["weighted"], sign_method=es_static["method"], reduce=dm_static["reduce"],
                  normalize_by=dm_static["normalize_by"], scale=hp[f"{steps[-1][0]}.scale"] if tail else None,
                  precision=state.precision, out_dtype=dt)
    prefix = steps[:i]
    sel = _selection(prefix, state, hp, stats)
    if sel is None:  # the steps before the election on XLA; their task vectors feed the kernel
        done = run_steps(prefix, state, hp, stats)
        return masked_merge(done.tau, done.base, stacked=True, round_inputs=False, **common)
    sel = {k: v for k, v in sel.items() if v is not None}
    if stacked is True:  # stacked task vectors given: the kernel rounds them as the driver does
        return masked_merge(model_leaves, base_leaf, stacked=True, **sel, **common)
    models = model_leaves if stacked == "models" else list(model_leaves)
    return masked_merge(models, base_leaf, **sel, **common)
