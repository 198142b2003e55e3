"""Mixture-of-experts feed-forward blocks: top-k softmax routing and the expert computation.

:func:`moe_ffn` is the one place experts are evaluated. By default it calls the dispatch kernel
:func:`jmerge.kernels.moe_dispatch` (tokens grouped by expert, grouped matmul: ``jax.lax.ragged_dot`` on CPU,
Pallas on GPU/TPU); ``impl="dense"`` keeps the reference path, where every expert runs on every token and a
one-hot combine matrix ``[N, E]`` (the top-k weights scattered to their experts) mixes the outputs.

References: Shazeer et al. (2017), Outrageously Large Neural Networks (sparsely-gated MoE); Jiang et al.
(2024), Mixtral of Experts; Qwen Team (2024), Qwen1.5-MoE (shared expert with a sigmoid gate);
Hugging Face transformers ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock`` and ``Qwen3MoeSparseMoeBlock``
(Qwen2-MoE without the shared expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..kernels import moe_dispatch
from .layers import MLP, Linear

Array = jax.Array
#: ``impl`` values of :func:`moe_ffn`.
MOE_IMPLS = ("auto", "ragged", "pallas", "dense")


def route(router_logits: Array, top_k: int, normalize: bool) -> tuple[Array, Array]:
    """Top-k routing: softmax over experts in float32, the k largest probabilities, optionally renormalised.

    Args:
      router_logits: ``[N, E]``.
      top_k: experts per token.
      normalize: divide the k weights by their sum (Mixtral; Qwen-MoE's ``norm_topk_prob``).

    Returns:
      ``(weights [N, k] float32, indices [N, k] int32)``, weights in decreasing order.

    References: Shazeer et al. (2017); transformers ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, indices = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, indices.astype(jnp.int32)


def combine_weights(weights: Array, indices: Array, num_experts: int) -> Array:
    """The dense ``[N, E]`` combine matrix: each token's top-k weights at their experts, zeros elsewhere.

    Args:
      weights: ``[N, k]``.
      indices: ``[N, k]`` expert ids.
      num_experts: E.

    Returns:
      ``[N, E]`` in ``weights``' dtype.

    References: Shazeer et al. (2017) (the one-hot dispatch/combine formulation).
    """
    onehot = jax.nn.one_hot(indices, num_experts, dtype=weights.dtype)
    return jnp.einsum("nk,nke->ne", weights, onehot)


def moe_ffn(x: Array, router_logits: Array, gate: Array, up: Array, down: Array, top_k: int, *,
            normalize: bool = True, weights_dtype: jnp.dtype | None = None, impl: str = "auto") -> Array:
    """Routed SwiGLU experts: the dispatch kernel, or the dense reference (every expert on every token).

    Args:
      x: ``[N, H]`` tokens.
      router_logits: ``[N, E]`` router outputs (``x @ router^T``).
      gate: ``[E, I, H]`` expert gate projections (``[out, in]`` per expert).
      up: ``[E, I, H]`` expert up projections.
      down: ``[E, H, I]`` expert down projections.
      top_k: experts per token.
      normalize: renormalise the top-k weights.
      weights_dtype: cast the routing weights to this dtype before combining (Qwen2-MoE casts them to the
        activations' dtype; Mixtral keeps float32); None keeps float32.
      impl: ``"auto"`` / ``"ragged"`` / ``"pallas"``: :func:`jmerge.kernels.moe_dispatch` with that ``impl``
        (weights transposed to its ``x @ W`` layout); ``"dense"``: every expert on every token, one-hot combine.

    Returns:
      ``[N, H]`` in ``x``'s dtype.

    References: Shazeer et al. (2017); Jiang et al. (2024), Mixtral of Experts; Gale et al. (2023), MegaBlocks;
    transformers ``MixtralExperts``.
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(MOE_IMPLS)}; got {impl!r}")
    if impl != "dense":
        if weights_dtype is not None and jnp.dtype(weights_dtype) != x.dtype:
            raise ValueError(f"weights_dtype must be None or x's dtype ({x.dtype}) with impl={impl!r}")
        return moe_dispatch(x, router_logits, jnp.swapaxes(gate, 1, 2), jnp.swapaxes(up, 1, 2),
                            jnp.swapaxes(down, 1, 2), top_k, normalize=normalize, impl=impl,
                            cast_weights=weights_dtype is not None)
    weights, indices = route(router_logits, top_k, normalize)
    if weights_dtype is not None:
        weights = weights.astype(weights_dtype)
    comb = combine_weights(weights, indices, gate.shape[0])
    h = jax.nn.silu(jnp.einsum("nh,eih->nei", x, gate)) * jnp.einsum("nh,eih->nei", x, up)
    y = jnp.einsum("nei,ehi->neh", h, down)
    out = jnp.einsum("ne,neh->nh", comb.astype(jnp.promote_types(comb.dtype, y.dtype)), y)
    return out.astype(x.dtype)


class Experts(nnx.Module):
    """The stacked expert weights of one MoE layer: ``gate``/``up`` ``[E, I, H]``, ``down`` ``[E, H, I]``.

    References: transformers 5 ``MixtralExperts`` (fused storage; here gate and up are kept apart).
    """

    def __init__(self, gate: Array, up: Array, down: Array):
        """Wrap stacked expert weights.

        Args:
          gate: ``[E, I, H]``.
          up: ``[E, I, H]``.
          down: ``[E, H, I]``.

        References: transformers ``MixtralExperts``.
        """
        self.gate = nnx.Param(jnp.asarray(gate))
        self.up = nnx.Param(jnp.asarray(up))
        self.down = nnx.Param(jnp.asarray(down))


class SparseMoE(nnx.Module):
    """A routed MoE block: router, experts, and optionally Qwen2-MoE's shared expert with its sigmoid gate.

    References: Jiang et al. (2024), Mixtral of Experts; Qwen Team (2024), Qwen1.5-MoE; transformers
    ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``.
    """

    def __init__(self, router: Linear, experts: Experts, top_k: int, *, normalize: bool,
                 shared_expert: MLP | None = None, shared_expert_gate: Linear | None = None,
                 cast_weights: bool = False, impl: str = "auto"):
        """Assemble an MoE block.

        Args:
          router: ``[E, H]`` linear map to router logits.
          experts: the stacked experts.
          top_k: experts per token.
          normalize: renormalise the top-k weights.
          shared_expert: an MLP every token goes through (Qwen2-MoE), or None.
          shared_expert_gate: ``[1, H]``; the shared expert's output is scaled by ``sigmoid(x @ g^T)``.
          cast_weights: cast routing weights to the activations' dtype (Qwen2-MoE) before combining.
          impl: :func:`moe_ffn`'s ``impl`` (``"auto"``: the dispatch kernel).

        References: transformers ``Qwen2MoeSparseMoeBlock``.
        """
        if impl not in MOE_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(MOE_IMPLS)}; got {impl!r}")
        self.router, self.experts = router, experts
        self.top_k, self.normalize, self.cast_weights = top_k, normalize, cast_weights
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        self.impl = impl

    def __call__(self, x: Array, *, allowed: Array | None = None, token_mask: Array | None = None,
                 counts: bool = False) -> Array | tuple[Array, Array]:
        """The block's output, optionally with the expert counts of the routed tokens.

        Args:
          x: ``[..., H]`` activations.
          allowed: ``[E]`` bool, experts tokens may be routed to; the others' router logits become ``-inf``
            (switched off). Allowing only some experts forces the tokens onto them. None: all.
          token_mask: ``x.shape[:-1]``, 1 for real tokens, 0 for padding (not counted); None: all count.
          counts: also return the ``[E]`` int32 number of (token, slot) assignments per expert.

        Returns:
          ``[..., H]``, or ``(output, counts)``.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        if allowed is not None:
            logits = jnp.where(jnp.asarray(allowed, bool)[None, :], logits, jnp.array(-jnp.inf, logits.dtype))
        out = moe_ffn(flat, logits, self.experts.gate[...], self.experts.up[...], self.experts.down[...],
                      self.top_k, normalize=self.normalize,
                      weights_dtype=x.dtype if self.cast_weights else None, impl=self.impl)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        out = out.reshape(shape)
        if not counts:
            return out
        _, idx = route(logits, self.top_k, self.normalize)
        tm = jnp.ones(flat.shape[0], jnp.int32) if token_mask is None else \
            jnp.asarray(token_mask).reshape(-1).astype(jnp.int32)
        hits = jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.int32)  # [N, k, E]
        if allowed is not None:  # a switched-off expert picked only to fill the k slots (weight 0) is not counted
            hits = hits * jnp.asarray(allowed, jnp.int32)[None, None, :]
        hits = hits.sum(axis=1)
        return out, jnp.sum(hits * tm[:, None], axis=0)
