"""Building blocks of Llama-family decoders: linear maps in the Hugging Face ``[out, in]`` layout, RMSNorm
(also Gemma's ``1 + w``), rotary embeddings (default, ``linear``, ``dynamic``, ``llama3``, ``yarn``),
grouped-query attention with a padding/causal/sliding-window mask and optional logit soft-capping, the gated MLP
(SwiGLU, or GeGLU for Gemma).

Numerics follow transformers: RMSNorm in float32 then cast back before the weight (Gemma: weight applied in
float32, then cast); rotary frequencies and tables in float32 cast to the activations' dtype; attention as torch's
SDPA (transformers' default) computes it: float32 from the rounded q, k, v, one rounding of the output
(soft-capped models: transformers' eager order, scores scaled and capped in the activations' dtype, softmax in
float32, probabilities cast back before ``@ v``); MLP activations in float32, rounded once.

References: Zhang & Sennrich (2019), RMSNorm; Su et al. (2021), RoFormer (rotary embeddings); Ainslie et al.
(2023), GQA; Shazeer (2020), GLU variants; Gemma Team (2024), Gemma 2; Hugging Face transformers
``modeling_llama.py``, ``modeling_gemma2.py``, ``modeling_rope_utils.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import RopeScaling

Array = jax.Array


def rounded(x: Array) -> Array:
    """``x`` rounded to its own dtype where it is bfloat16/float16, also inside XLA fusions.

    XLA may keep an elementwise chain in float32 and round only its end ("excess precision"); torch rounds
    the result of every operation. Marking the points where torch rounds makes a jitted bf16 forward give
    torch's numbers (a no-op for float32).

    Args:
      x: an array.

    Returns:
      ``x`` with every value representable in ``x.dtype`` (same dtype).

    References: XLA ``ReducePrecision`` (kept inside fusions); PyTorch's per-operation rounding of
    reduced-precision tensors.
    """
    if x.dtype == jnp.bfloat16:
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if x.dtype == jnp.float16:
        return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    return x


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
        y = rounded(jnp.einsum("...i,oi->...o", x, self.weight[...]))
        if self.bias is not None:
            y = rounded(y + self.bias[...])
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in float32 and cast back before the weight (transformers' order);
    with ``plus_one`` (Gemma), ``x_hat * (1 + w)`` in float32, then cast back.

    References: Zhang & Sennrich (2019), Root Mean Square Layer Normalization; transformers ``Gemma2RMSNorm``.
    """

    def __init__(self, weight: Array, eps: float, *, plus_one: bool = False):
        """Wrap a norm weight.

        Args:
          weight: ``[d]``.
          eps: added to the mean square.
          plus_one: the stored weight is ``w`` of ``1 + w``, applied in float32 before the cast (Gemma).

        References: Zhang & Sennrich (2019).
        """
        self.weight = nnx.Param(jnp.asarray(weight))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: Array) -> Array:
        if self.plus_one:
            xf = x.astype(jnp.float32)
            xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return rounded(self.weight[...] * rms_normalize(x, self.eps))


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
    return rounded((xf * jax.lax.rsqrt(var + eps)).astype(x.dtype))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  positions: Array | None = None) -> Array:
    """The ``head_dim / 2`` rotary inverse frequencies (float32) of a rope type, as transformers computes them.

    * ``default``: ``theta^(-2i/d)``; ``linear``: divided by ``factor``.
    * ``dynamic``: with ``L = max(positions) + 1`` above ``max_position_embeddings`` (``M``), the base becomes
      ``theta * (factor * L / M - (factor - 1))^(d / (d - 2))``; otherwise the default frequencies (traced: no
      recompilation per length). This is a freshly loaded transformers model's first forward; transformers also
      keeps grown frequencies across later calls on shorter (still > ``M``) inputs, which a pure function does not.
    * ``llama3``: wavelengths longer than ``original / low_freq_factor`` divided by ``factor``, shorter than
      ``original / high_freq_factor`` kept, the band between interpolated.
    * ``yarn``: a linear ramp between interpolated (``/ factor``) and extrapolated frequencies over the
      correction range of ``beta_fast`` / ``beta_slow`` rotations.

    Args:
      head_dim: rotated dimension (even).
      theta: rotary base.
      scaling: the rope type and its fields; None: default.
      positions: ``[B, T]`` integer positions (``dynamic`` reads their maximum).

    Returns:
      ``[head_dim // 2]`` float32.

    References: Chen et al. (2023), Positional Interpolation; bloc97 (2023), NTK-aware scaled RoPE; Peng et al.
    (2023), YaRN; Meta (2024), Llama 3.1; transformers ``modeling_rope_utils.py``.
    """
    d = head_dim
    exps = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    inv = 1.0 / (theta ** exps)
    s = scaling
    if s is None or s.rope_type == "default":
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "dynamic":
        if positions is None:
            return inv
        m = s.max_position_embeddings
        seq = jnp.max(positions).astype(jnp.int32) + 1
        seq_f = jnp.maximum(seq, m).astype(jnp.float32)
        base = theta * ((s.factor * seq_f / m) - (s.factor - 1)) ** (d / (d - 2))
        return jnp.where(seq > m, 1.0 / (base ** exps), inv)
    if s.rope_type == "llama3":
        orig, lo, hi = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
        low_wl, high_wl = orig / lo, orig / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / s.factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return jnp.where(medium, smoothed, scaled)
    if s.rope_type == "yarn":
        orig = s.original_max_position_embeddings

        def corr_dim(rotations: float) -> float:
            return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(s.beta_fast), corr_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        pos_freqs = theta ** exps
        ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        return (1.0 / (s.factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    raise ValueError(f"rope_type {s.rope_type!r} is not supported")


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: jnp.dtype,
                scaling: RopeScaling | None = None) -> tuple[Array, Array]:
    """Cosine and sine tables of the rotary embedding for integer positions.

    Args:
      positions: ``[B, T]`` integer positions.
      head_dim: rotated dimension (even).
      theta: rotary base.
      dtype: dtype of the returned tables (the activations').
      scaling: the rotary scaling (:func:`rope_inv_freq`); None: default. ``yarn``'s ``attention_factor``
        multiplies both tables (in float32, before the cast).

    Returns:
      ``(cos, sin)``, each ``[B, T, head_dim]`` (the half-dimension frequencies repeated twice).

    References: Su et al. (2021), RoFormer; transformers ``LlamaRotaryEmbedding``.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling is not None and scaling.attention_factor != 1.0:
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


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
    return rounded(rounded(x * cos[:, :, None, :]) + rounded(rot * sin[:, :, None, :]))


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
    """Grouped-query self-attention with rotary embeddings (optional q/k/v biases, optional q/k RMSNorm, optional
    score scale and tanh soft-capping).

    References: Vaswani et al. (2017), Attention Is All You Need; Ainslie et al. (2023), GQA; Su et al. (2021),
    RoFormer; Gemma Team (2024), Gemma 2 (soft-capping); transformers ``LlamaAttention`` / ``Qwen2Attention`` /
    ``Qwen3Attention`` / ``Gemma2Attention``.
    """

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, rope_theta: float, window: int | None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                 rope_scaling: RopeScaling | None = None, scale: float | None = None,
                 softcap: float | None = None):
        """Assemble from projections.

        Args:
          q_proj, k_proj, v_proj, o_proj: the four projections.
          num_heads, num_kv_heads, head_dim: the attention shape.
          rope_theta: rotary base.
          window: sliding window of this layer, or None.
          q_norm, k_norm: per-head RMSNorm of queries and keys (Qwen3), or None.
          rope_scaling: the rotary scaling (:func:`rope_inv_freq`), or None (default).
          scale: multiplies ``q k^T`` (default ``head_dim ** -0.5``; Gemma-2: ``query_pre_attn_scalar ** -0.5``).
          softcap: scores become ``c * tanh(s / c)`` before the mask (Gemma-2), or None.

        References: transformers ``LlamaAttention``, ``Gemma2Attention``.
        """
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.window = window
        self.rope_scaling = rope_scaling
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.softcap = softcap

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
        cos, sin = rope_tables(positions, d, self.rope_theta, x.dtype, self.rope_scaling)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = hq // hk
        q = q.reshape(b, t, hk, g, d)
        if self.softcap is not None:
            # transformers' eager order (its attention for soft-capped models): q k^T, the scaling and the
            # soft-capping in the activations' dtype, softmax in float32, probabilities cast back before @ v
            scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * jnp.asarray(self.scale, x.dtype)
            cap = jnp.asarray(self.softcap, x.dtype)
            scores = (jnp.tanh(scores / cap) * cap).astype(jnp.float32)
        else:
            # SDPA's order (transformers' default attention; also a fused kernel's): everything in float32 from
            # the rounded q, k, v, one rounding of the output -- in bfloat16 this follows torch's SDPA closely
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
            scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * jnp.float32(self.scale)
        allowed = attention_bias(attention_mask, b, t, self.window)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # a query with no key to attend to (a left-padding position) gets zeros, as torch's SDPA gives
        # (transformers' default attention): padded positions' hidden states then equal transformers'
        probs = jnp.where(allowed.any(-1)[:, None, None, :, None], probs, 0).astype(v.dtype)
        out = rounded(jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, t, hq * d).astype(x.dtype))
        return self.o_proj(out)


#: MLP activations by :attr:`~jmerge.models.DecoderConfig.hidden_act`.
ACT_FNS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
           "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class MLP(nnx.Module):
    """The gated feed-forward block ``down(act(gate(x)) * up(x))``: SwiGLU (``silu``) or GeGLU (Gemma's tanh GELU).

    References: Shazeer (2020), GLU Variants Improve Transformer; transformers ``LlamaMLP``, ``Gemma2MLP``.
    """

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, act: str = "silu"):
        """Assemble from projections.

        Args:
          gate_proj, up_proj, down_proj: the three projections.
          act: ``silu``, ``gelu_tanh`` or ``gelu``.

        References: Shazeer (2020).
        """
        if act not in ACT_FNS:
            raise ValueError(f"act must be one of {', '.join(ACT_FNS)}; got {act!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act = act

    def __call__(self, x: Array) -> Array:
        # the activation in float32 with one rounding, as torch computes it for bf16/fp16 tensors
        act = rounded(ACT_FNS[self.act](self.gate_proj(x).astype(jnp.float32)).astype(x.dtype))
        return self.down_proj(rounded(act * self.up_proj(x)))
