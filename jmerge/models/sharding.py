"""Sharding of decoder parameters over a device mesh, derived from each parameter's role in the layout.

Megatron-style tensor parallelism on one mesh axis (``model_axis``): q/k/v/gate/up projections split their
output rows, o/down projections their input columns, embeddings and the LM head their vocabulary rows; MoE
experts split their expert axis over ``expert_axis`` (when given) and their width over ``model_axis``.
Norms, routers and the shared-expert gate are replicated. A dimension the axis size does not divide stays
whole, so any mesh is valid; XLA inserts the collectives.

References: Shoeybi et al. (2019), Megatron-LM (tensor parallelism); Lepikhin et al. (2020), GShard (expert
parallelism); JAX ``NamedSharding`` / ``PartitionSpec``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .llama import DecoderLM

_ROW = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_COL = ("o_proj", "down_proj")


def _keys(path: tuple[Any, ...]) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def _spec(names: list[str], shape: tuple[int, ...], mesh: Mesh, model_axis: str | None,
          expert_axis: str | None) -> PartitionSpec:
    names = [n for n in names if n != "value"]
    leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
    axes: list[str | None] = [None] * len(shape)
    if owner == "experts" and len(shape) == 3:
        axes[0] = expert_axis
        axes[2 if leaf == "down" else 1] = model_axis
    elif owner in _ROW:
        axes[0] = model_axis
    elif owner in _COL and leaf == "weight":
        axes[1] = model_axis
    elif leaf in ("embed_tokens", "lm_head"):
        axes[0] = model_axis
    for i, a in enumerate(axes):  # keep a dimension whole when the axis does not divide it
        if a is not None and (a not in mesh.shape or shape[i] % mesh.shape[a]):
            axes[i] = None
    return PartitionSpec(*axes)


def param_specs(model: DecoderLM, mesh: Mesh, *, model_axis: str | None = "model",
                expert_axis: str | None = None) -> Any:
    """A ``PartitionSpec`` for every parameter, as a pytree shaped like ``nnx.state(model, nnx.Param)``.

    Args:
      model: the model.
      mesh: the device mesh (its axis sizes decide which dimensions can be split).
      model_axis: mesh axis of tensor parallelism, or None.
      expert_axis: mesh axis of expert parallelism, or None.

    Returns:
      The pytree of ``PartitionSpec`` (same structure as the parameter state, ``PartitionSpec`` leaves).

    References: Shoeybi et al. (2019), Megatron-LM; Lepikhin et al. (2020), GShard.
    """
    state = nnx.state(model, nnx.Param)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _spec(_keys(p), tuple(x.shape), mesh, model_axis, expert_axis), state)


def shard_model(model: DecoderLM, mesh: Mesh, *, model_axis: str | None = "model",
                expert_axis: str | None = None) -> DecoderLM:
    """A copy of ``model`` whose parameters are placed on ``mesh`` by :func:`param_specs` (input unchanged).

    Args:
      model: the model.
      mesh: the device mesh.
      model_axis: mesh axis of tensor parallelism, or None.
      expert_axis: mesh axis of expert parallelism, or None.

    Returns:
      The sharded model (same graph, new parameter arrays).

    References: JAX ``NamedSharding``; Flax NNX ``split`` / ``merge``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    specs = param_specs(model, mesh, model_axis=model_axis, expert_axis=expert_axis)
    placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs,
                          is_leaf=lambda s: isinstance(s, PartitionSpec))
    return nnx.merge(graphdef, placed, rest)
