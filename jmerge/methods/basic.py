"""Aggregation and scaling steps, and the methods built only from them.

References: Wortsman et al., "Model soups" (ICML 2022); Ilharco et al., "Editing Models with Task
Arithmetic" (ICLR 2023).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ..core import HParamSpec, MergeState, Transform, chain, model_sum, transform

__all__ = ["per_model", "weighted_sum", "scale", "linear", "task_arithmetic", "negation"]


def per_model(hp_value: float | Float[Array, "*T"], state: MergeState) -> Float[Array, "T *ones"]:
    """Broadcast a scalar or per-model hyperparameter to shape ``(T, 1, ..., 1)`` for ``tau``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    v = jnp.broadcast_to(jnp.asarray(hp_value, jnp.float32), (state.num_models,))
    return v.reshape((state.num_models,) + (1,) * (state.tau.ndim - 1))


def _weighted_sum(state: MergeState, hp, *, normalize: bool) -> MergeState:
    r = state.rounded  # identity in float32; rounds where a merge computed in bf16/fp16 rounds
    w = r(per_model(hp["weight"], state))
    # Row by row (the numbers and order of model_sum(w * tau)): XLA folds a row of the stacked task vectors
    # into the expression that built it, where a product of the whole stack would make XLA:CPU write the
    # stack (models x leaf) first; while tau is as built, the rows are recomputed from the inputs.
    total = r(model_sum([r(w[t] * x) for t, x in enumerate(state.tau_rows())]))
    if normalize:
        total = r(total / r(jnp.sum(w)))
    return state.replace(merged=total)


_weighted_sum.entrywise = True  # each entry from the same entries alone (read by jmerge.core.chunks.entrywise)
_weighted_sum.chunk_form = lambda step: step  # elementwise: runs unchanged on a tensor's chunks (jmerge.core.chunks)


def weighted_sum(weight: HParamSpec = 1.0, normalize: bool = False) -> Transform:
    """Aggregate: ``merged = sum_t w_t tau_t`` (divided by ``sum_t w_t`` when ``normalize``).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    return transform("weighted_sum", _weighted_sum, hparams={"weight": weight}, static={"normalize": normalize},
                     per_model=("weight",))


def _scale(state: MergeState, hp) -> MergeState:
    return state.replace(merged=state.rounded(hp["scale"] * state.merged))


_scale.chunk_form = lambda step: step  # elementwise: runs unchanged on a tensor's chunks (jmerge.core.chunks)
_scale.entrywise = True


def scale(scale: HParamSpec = 1.0) -> Transform:
    """Multiply the merged task vector by ``scale`` (the paper's lambda).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    return transform("scale", _scale, hparams={"scale": scale})


def _linear(state: MergeState, hp, *, normalize: bool) -> MergeState:
    w = per_model(hp["weight"], state)
    rebuild = state.tau_rebuild() if state.precision is None else None
    if rebuild is None:
        avg = model_sum(w * state.models())
    else:  # state.models()'s rows, base + tau, recomputed from the inputs (see _weighted_sum)
        avg = model_sum([w[t] * (state.base + x) for t, x in enumerate(rebuild(lambda a: a))])
    if normalize:
        avg = avg / jnp.sum(w)
    return state.replace(merged=avg - state.base)


_linear.entrywise = True


def linear(weight: HParamSpec = 1.0, normalize: bool = True) -> Transform:
    """Weighted average of the fine-tuned models (a uniform "model soup" by default).

    ``theta = sum_t w_t theta_t / sum_t w_t``; with ``normalize=False`` the weights are used as given
    (mergekit's ``normalize: false``). The base only supplies the output dtype; to include it in the
    average, pass it among the models.

    References: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
    improves accuracy without increasing inference time" (ICML 2022).
    """
    return transform("linear", _linear, hparams={"weight": weight}, static={"normalize": normalize},
                     per_model=("weight",))


def task_arithmetic(scale: HParamSpec = 1.0, weight: HParamSpec = 1.0, normalize: bool = False) -> Transform:
    """Task arithmetic: ``theta = theta_0 + scale * sum_t w_t tau_t``.

    mergekit's ``task_arithmetic`` is ``scale=1`` with per-model ``weight`` (``normalize`` optional);
    FusionBench's is ``weight=1``, ``scale=0.3``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    return chain(weighted_sum(weight, normalize), globals()["scale"](scale), name="task_arithmetic",
                 aliases={"weight": "weighted_sum.weight", "scale": "scale.scale"})


def negation(scale: HParamSpec = 1.0) -> Transform:
    """Task negation (forgetting): ``theta = theta_0 - scale * sum_t tau_t``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    return chain(weighted_sum(-1.0), globals()["scale"](scale), name="negation", aliases={"scale": "scale.scale"})


METHODS = {"linear": linear, "task_arithmetic": task_arithmetic, "negation": negation}
