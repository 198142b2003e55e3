"""Building blocks of Llama-family decoders: linear maps in the Hugging Face ``[out, in]`` layout, RMSNorm,
rotary embeddings, grouped-query attention with a padding/causal/sliding-window mask, the SwiGLU MLP.

Numerics follow transformers: RMSNorm in float32 then cast back before the weight; rotary tables in float32
cast to the activations' dtype; attention scores and softmax in float32, probabilities cast back before ``@ v``.

References: Zhang & Sennrich (2019), RMSNorm; Su et al. (2021), RoFormer (rotary embeddings); Ainslie et al.
(2023), GQA; Shazeer (2020), GLU variants; Hugging Face transformers ``modeling_llama.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class Linear(nnx.Module):
    """``y = x W^T (+ b)`` with ``W`` stored ``[out, in]`` as in PyTorch checkpoints.

    References: PyTorch ``nn.Linear`` (the stored layout).
    """

    def __init__(self, weight: Array, bias: Array | None = None):
        """Wrap existing arrays (no initialisation: weights come from a checkpoint).

        Args:
          weight: ``[out, in]``.
          bias: ``[out]`` or None.

        References: PyTorch ``nn.Linear``.
        """
        self.weight = nnx.Param(jnp.asarray(weight))
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in float32 and cast back before the weight (transformers' order).

    References: Zhang & Sennrich (2019), Root Mean Square Layer Normalization.
    """

    def __init__(self, weight: Array, eps: float):
        """Wrap a norm weight.

        Args:
          weight: ``[d]``.
          eps: added to the mean square.

        References: Zhang & Sennrich (2019).
        """
        self.weight = nnx.Param(jnp.asarray(weight))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return self.weight[...] * rms_normalize(x, self.eps)


def rms_normalize(x: Array, eps: float) -> Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32, returned in ``x``'s dtype.

    Args:
      x: ``[..., d]``.
      eps: epsilon.

    Returns:
      The normalised array, dtype of ``x``.

    References: Zhang & Sennrich (2019), RMSNorm.
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: jnp.dtype) -> tuple[Array, Array]:
    """Cosine and sine tables of the default rotary embedding for integer positions.

    Args:
      positions: ``[B, T]`` integer positions.
      head_dim: rotated dimension (even).
      theta: rotary base.
      dtype: dtype of the returned tables (the activations').

    Returns:
      ``(cos, sin)``, each ``[B, T, head_dim]`` (the half-dimension frequencies repeated twice).

    References: Su et al. (2021), RoFormer; transformers ``LlamaRotaryEmbedding`` (default rope type).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` ``[B, T, H, D]`` by the tables ``[B, T, D]`` (the rotate-half convention).

    Args:
      x: queries or keys.
      cos: cosine table.
      sin: sine table.

    Returns:
      The rotated array.

    References: Su et al. (2021), RoFormer; transformers ``apply_rotary_pos_emb``.
    """
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def attention_bias(attention_mask: Array | None, batch: int, length: int, window: int | None) -> Array:
    """Boolean ``[B, T, T]`` mask of the keys each query may attend to (causal, padding, sliding window).

    Args:
      attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding, or None (all real).
      batch: B.
      length: T.
      window: sliding window in tokens (a query at ``i`` sees keys ``j`` with ``i - window < j <= i``) or None.

    Returns:
      ``[B, T, T]`` boolean, True where attention is allowed.

    References: transformers ``masking_utils`` (causal and sliding-window masks).
    """
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = jnp.broadcast_to(allowed, (batch, length, length))
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, :] != 0)
    return allowed


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (optional q/k/v biases, optional q/k RMSNorm).

    References: Vaswani et al. (2017), Attention Is All You Need; Ainslie et al. (2023), GQA; Su et al. (2021),
    RoFormer; transformers ``LlamaAttention`` / ``Qwen2Attention`` / ``Qwen3Attention``.
    """

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, rope_theta: float, window: int | None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        """Assemble from projections.

        Args:
          q_proj, k_proj, v_proj, o_proj: the four projections.
          num_heads, num_kv_heads, head_dim: the attention shape.
          rope_theta: rotary base.
          window: sliding window of this layer, or None.
          q_norm, k_norm: per-head RMSNorm of queries and keys (Qwen3), or None.

        References: transformers ``LlamaAttention``.
        """
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.window = window

    def __call__(self, x: Array, positions: Array, attention_mask: Array | None) -> Array:
        b, t, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, t, hq, d)
        k = self.k_proj(x).reshape(b, t, hk, d)
        v = self.v_proj(x).reshape(b, t, hk, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = rope_tables(positions, d, self.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = hq // hk
        q = q.reshape(b, t, hk, g, d)
        # transformers' eager order: q k^T and the scaling in the activations' dtype, softmax in float32
        scores = (jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * jnp.asarray(d ** -0.5, x.dtype)).astype(jnp.float32)
        allowed = attention_bias(attention_mask, b, t, self.window)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, t, hq * d)
        return self.o_proj(out)


class MLP(nnx.Module):
    """The SwiGLU feed-forward block ``down(silu(gate(x)) * up(x))``.

    References: Shazeer (2020), GLU Variants Improve Transformer; transformers ``LlamaMLP``.
    """

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
        """Assemble from projections.

        Args:
          gate_proj, up_proj, down_proj: the three projections.

        References: Shazeer (2020).
        """
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
