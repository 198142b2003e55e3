"""Layer-wise merges: LiNeS (depth-dependent scaling of the merged update) and layer swapping.

Both work through the hyperparameter system, without any change to the core: the per-leaf quantity
(a leaf's depth position for LiNeS, the index of the source model for layer swapping) is a
hyperparameter whose default spec is a callable ``f(path, t)`` resolved on the host from the leaf
path (``t = l / (L - 1)`` is the leaf's layer position, see :func:`jmerge.layer_positions`). Like
any hyperparameter it can be overridden with numbers, ``Rules``, pytrees or other callables, and new
values do not recompile.

References: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging" (ICLR 2025); Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in
Large Language Models" (ICLR 2025).
"""

from __future__ import annotations

import re
from typing import Callable

import jax.numpy as jnp

from ..core import HParamSpec, MergeState, Transform, chain, layer_index, model_sum, transform
from .basic import scale as _scale_step
from .basic import weighted_sum

__all__ = ["lines", "lines_scale", "lines_position", "layer_swap", "layer_swap_source", "select_model",
           "HEAD_FILTER"]

HEAD_FILTER = (r"(^|\.)(lm_head|head|heads|classifier|score|output|final_layer_norm|final_norm|norm_f|"
               r"ln_f|ln_post|post_layernorm|encoder_norm)(\.|$)|^(model\.)?norm(\.|$)|^proj$")
"""Default regex of the non-layer leaves that sit *after* the transformer layers (heads, final norms)."""


def lines_position(head_filter: str = HEAD_FILTER) -> Callable[[str, float], float]:
    """A callable hyperparameter spec giving each leaf's depth position in [0, 1].

    Leaves inside transformer layer ``l`` of ``L`` get ``l / (L - 1)``; other leaves get 1 when their
    path matches ``head_filter`` (heads and final norms, after the last layer) and 0 otherwise
    (embeddings and anything before the first layer).

    References: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
    (ICLR 2025).
    """
    rx = re.compile(head_filter)

    def position(path: str, t: float) -> float:
        if layer_index(path) is not None:
            return float(t)
        return 1.0 if rx.search(path) else 0.0

    return position


def _lines_scale(state: MergeState, hp) -> MergeState:
    factor = hp["alpha"] + hp["beta"] * hp["layer_position"]
    return state.replace(merged=factor * state.merged)


def lines_scale(alpha: HParamSpec = 0.0, beta: HParamSpec = 1.0, *, head_filter: str = HEAD_FILTER) -> Transform:
    """Scale an already merged update by ``alpha + beta · position`` (the LiNeS step).

    Chain it after any aggregation (task arithmetic, TIES ...). ``position`` is the hyperparameter
    ``layer_position`` (default :func:`lines_position` ``(head_filter)``): ``l / (L - 1)`` for
    layer ``l`` of ``L``, 0 for embeddings, 1 for heads and final norms.

    References: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
    Model Merging" (ICLR 2025).
    """
    return transform("lines_scale", _lines_scale,
                     hparams={"alpha": alpha, "beta": beta, "layer_position": lines_position(head_filter)})


def lines(alpha: HParamSpec = 0.0, beta: HParamSpec = 1.0, scale: HParamSpec = 1.0, weight: HParamSpec = 1.0, *,
          head_filter: str = HEAD_FILTER) -> Transform:
    """LiNeS on task arithmetic: ``θ = θ0 + scale · (α + β · l/(L−1)) · Σ_t w_t τ_t`` per layer ``l``.

    Shallow layers stay close to the base (preserving general features), deep layers receive the
    full update. Non-layer leaves: embeddings (and anything not matching ``head_filter``) sit at
    position 0 and get ``α``; heads and final norms (matching ``head_filter``) sit at position 1 and
    get ``α + β``. Override the hyperparameter ``layer_position`` to place leaves differently.

    Args:
      alpha: scale of the first layer's update.
      beta: extra scale reached at the last layer.
      scale: global multiplier (the task-arithmetic λ).
      weight: per-model weights of the sum (``PerModel``).
      head_filter: regex of the non-layer leaves that count as the top of the network.

    References: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
    Model Merging" (ICLR 2025).
    """
    return chain(weighted_sum(weight), lines_scale(alpha, beta, head_filter=head_filter), _scale_step(scale),
                 name="lines", aliases={"weight": "weighted_sum.weight", "alpha": "lines_scale.alpha",
                                        "beta": "lines_scale.beta", "layer_position": "lines_scale.layer_position",
                                        "scale": "scale.scale"})


# --------------------------------------------------------------------------------------------
# Layer swapping

def _select_model(state: MergeState, hp) -> MergeState:
    src = jnp.round(jnp.asarray(hp["source"], jnp.float32)).astype(jnp.int32)
    onehot = (jnp.arange(state.num_models, dtype=jnp.int32) == src).astype(jnp.float32)
    onehot = onehot.reshape((state.num_models,) + (1,) * (state.tau.ndim - 1))
    return state.replace(merged=model_sum(onehot * state.tau))


def select_model(source: HParamSpec = 0, *, min_models: int = 1) -> Transform:
    """Aggregate by taking one model per leaf: ``merged = τ_source`` (``source = -1``: the base).

    ``source`` is a traced per-leaf hyperparameter (rounded to an integer index); an index outside
    ``[0, T)`` selects the base.

    References: Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large
    Language Models" (ICLR 2025).
    """
    return transform("select_model", _select_model, hparams={"source": source},
                     ranges={"source": (-1.0, float("inf"))}, min_models=min_models)


def layer_swap_source(k: int = 2, *, outer: int = 0, inner: int = 1, nonlayer: int | None = None,
                      k_top: int | None = None, num_layers: int | None = None) -> Callable[[str, float], float]:
    """A callable hyperparameter spec: the source model index of each leaf for layer swapping.

    Layers ``l < k`` and ``l >= L - k_top`` come from ``outer``, the other layers from ``inner``,
    non-layer leaves from ``nonlayer`` (default ``outer``). ``L`` is ``num_layers`` when given,
    else recovered from the leaf's layer position ``t = l / (L - 1)`` (so a ``num_layers`` passed to
    :func:`jmerge.merge` is honoured).

    References: Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models"
    (ICLR 2025).
    """
    k_top = k if k_top is None else int(k_top)
    nonlayer = outer if nonlayer is None else nonlayer

    def source(path: str, t: float) -> float:
        l = layer_index(path)
        if l is None:
            return float(nonlayer)
        if l < k:
            return float(outer)
        if num_layers is not None:
            L = int(num_layers)
        elif t > 0:
            L = int(round(l / t)) + 1
        else:
            L = l + 1 if l > 0 else 1 << 30  # layer 0 of an unknown count: never "top"
        return float(outer if l >= L - k_top else inner)

    return source


def layer_swap(k: int = 2, *, outer: int = 0, inner: int = 1, nonlayer: int | None = None,
               k_top: int | None = None, num_layers: int | None = None) -> Transform:
    """Layer swapping: the bottom ``k`` and top ``k_top`` (default ``k``) transformer layers from the
    ``outer`` expert, the middle layers from the ``inner`` expert.

    In the paper the outer layers come from a language expert and the middle ones from a task
    (math) expert fine-tuned from the same base. Non-layer parameters (embeddings, final norm,
    head) come from ``nonlayer``, by default the ``outer`` expert (a choice; the paper's recipe
    varies). Indices refer to the fine-tuned models; ``-1`` is the base. Implemented as a per-leaf
    ``source`` hyperparameter (:func:`layer_swap_source`) with a :func:`select_model` step; pass
    ``hparams={"source": Rules(...)}`` for any other assignment.

    References: Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large
    Language Models" (ICLR 2025).
    """
    nonlayer_i = outer if nonlayer is None else nonlayer
    need = max(int(outer), int(inner), int(nonlayer_i)) + 1
    spec = layer_swap_source(k, outer=outer, inner=inner, nonlayer=nonlayer, k_top=k_top, num_layers=num_layers)
    step = select_model(spec, min_models=max(1, need))
    return chain(step, name="layer_swap", aliases={"source": "select_model.source"})


METHODS = {"lines": lines, "layer_swap": layer_swap}
