"""Decoder configuration read from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE,
Qwen3-MoE, Gemma-2), with the rotary scalings ``linear``, ``dynamic``, ``llama3`` and ``yarn``.

References: Hugging Face transformers ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``,
``MixtralConfig``, ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``Gemma2Config`` (field names and defaults) and
``modeling_rope_utils.py`` (``rope_parameters`` of transformers 5, ``rope_scaling`` of transformers 4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ..io import CheckpointFormatError

#: ``model_type`` values :class:`DecoderConfig` understands.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2")
#: ``rope_type`` values :class:`RopeScaling` understands.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
#: ``hidden_act`` / ``hidden_activation`` values -> the activation of the MLP (``silu``, ``gelu_tanh``, ``gelu``).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are scaled (transformers' ``rope_type``), with the fields each type reads.

    Attributes:
      rope_type: ``default``, ``linear`` (frequencies / ``factor``), ``dynamic`` (NTK-aware base grown with the
        sequence beyond ``max_position_embeddings``), ``llama3`` (Llama 3.1 per-band scaling) or ``yarn``.
      factor: the scaling factor (1 for ``default``).
      max_position_embeddings: the config's length (``dynamic`` scales only beyond it).
      original_max_position_embeddings: the pre-training length (``llama3``, ``yarn``).
      low_freq_factor, high_freq_factor: ``llama3``'s band limits.
      beta_fast, beta_slow, truncate: ``yarn``'s ramp (defaults 32, 1, True).
      attention_factor: multiplies cos and sin (``yarn``; 1 otherwise).

    References: Chen et al. (2023), Extending Context Window of Large Language Models via Positional
    Interpolation (linear); bloc97 (2023), NTK-aware scaled RoPE (dynamic); Peng et al. (2023), YaRN; Meta
    (2024), Llama 3.1 (``llama3``); transformers ``modeling_rope_utils.py``.
    """

    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "tuple[float, RopeScaling]":
        """The rotary base and scaling of a parsed ``config.json``.

        ``rope_scaling`` (transformers 4; ``type`` or ``rope_type``) takes precedence over ``rope_parameters``
        (transformers 5), as transformers 5 reads them; ``rope_theta`` inside the dict wins over the top-level one.

        Args:
          cfg: the parsed JSON object.
          source: where it came from, for error messages.

        Returns:
          ``(rope_theta, scaling)``.

        Raises:
          CheckpointFormatError: an unsupported ``rope_type`` or ``partial_rotary_factor``, per-layer-type rotary
            parameters, or a missing field of the type.

        References: transformers ``RotaryEmbeddingConfigMixin.standardize_rope_params`` and
        ``ROPE_INIT_FUNCTIONS``.
        """
        params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if not isinstance(params, Mapping):
            raise CheckpointFormatError(f"{source}: rope_parameters/rope_scaling must be an object, got {params!r}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise CheckpointFormatError(
                f"{source}: rotary parameters per layer type ({', '.join(sorted(params))}) are not supported by "
                "jmerge.models; give one rope_parameters object")
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise CheckpointFormatError(
                f"{source}: partial_rotary_factor={partial} is not supported by jmerge.models (every head dimension "
                "is rotated); remove it or use 1.0")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointFormatError(
                f"{source}: rope_type {rope_type!r} is not supported by jmerge.models; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            return theta, cls()

        def need(key: str, where: Mapping[str, Any] = params) -> Any:
            v = where.get(key)
            if v is None:
                raise CheckpointFormatError(f"{source}: rope_type {rope_type!r} needs {key!r} in "
                                            f"{'rope_parameters' if where is params else 'config.json'}")
            return v

        max_pos = int(cfg.get("max_position_embeddings") or 0)
        orig = int(cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
        if rope_type in ("linear", "dynamic", "llama3"):
            factor = float(need("factor"))
        if rope_type == "linear":
            return theta, cls(rope_type, factor=factor)
        if rope_type == "dynamic":
            return theta, cls(rope_type, factor=factor,
                              max_position_embeddings=int(need("max_position_embeddings", cfg)))
        if not orig:
            raise CheckpointFormatError(f"{source}: rope_type {rope_type!r} needs original_max_position_embeddings "
                                        "(or max_position_embeddings)")
        if rope_type == "llama3":
            return theta, cls(rope_type, factor=factor, original_max_position_embeddings=orig,
                              low_freq_factor=float(need("low_freq_factor")),
                              high_freq_factor=float(need("high_freq_factor")))
        # yarn
        factor = params.get("factor")
        factor = float(factor) if factor is not None else float(need("max_position_embeddings", cfg)) / orig
        attn = params.get("attention_factor")
        if attn is None:
            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
            attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
        return theta, cls(rope_type, factor=factor, original_max_position_embeddings=orig,
                          beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                          truncate=bool(params.get("truncate", True)), attention_factor=float(attn))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The hyperparameters of a Llama-family decoder (dense or MoE), as ``config.json`` gives them.

    Attributes:
      model_type: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe`` or
        ``gemma2``.
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes.
      num_attention_heads, num_key_value_heads, head_dim: attention shape (GQA when KV < Q heads).
      rms_norm_eps, rope_theta: RMSNorm epsilon and the rotary base.
      rope_scaling: the rotary scaling (:class:`RopeScaling`; ``default``: none).
      tie_word_embeddings: the LM head is the embedding matrix.
      attention_bias: q/k/v projections have biases (Qwen2: always; Llama: ``attention_bias``).
      qk_norm: RMSNorm of q and k per head before the rotation (Qwen3).
      sliding_windows: per layer, the attention window in tokens, or None for full attention.
      num_experts, num_experts_per_tok, moe_intermediate_size: MoE shape (0 experts: dense).
      norm_topk_prob: renormalise the top-k routing weights to sum to 1 (Mixtral: always).
      shared_expert_intermediate_size: width of Qwen2-MoE's shared expert (0: none).
      moe_layers: per layer, whether its MLP is a mixture of experts.
      hidden_act: the dense MLP's activation: ``silu`` (SwiGLU), ``gelu_tanh`` or ``gelu`` (GeGLU; Gemma-2).
      norm_plus_one: RMSNorm multiplies by ``1 + w`` in float32 before the cast back (Gemma).
      embed_scale: multiply the embeddings by ``sqrt(hidden_size)`` in the parameters' dtype (Gemma).
      sandwich_norms: norms after attention and MLP too (Gemma-2's ``post_attention_layernorm`` on the attention
        output, ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP).
      query_pre_attn_scalar: attention scores scaled by its ``-1/2`` power instead of ``head_dim``'s (Gemma-2).
      attn_logit_softcapping, final_logit_softcapping: ``c * tanh(x / c)`` of attention scores and logits, or None.

    References: Hugging Face transformers configuration classes of the listed model types.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    rope_scaling: RopeScaling = RopeScaling()
    hidden_act: str = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def is_moe(self) -> bool:
        """Whether any layer is a mixture of experts."""
        return any(self.moe_layers)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "DecoderConfig":
        """Build from a parsed ``config.json``.

        Args:
          cfg: the parsed JSON object.
          source: where it came from, for error messages.

        Returns:
          The configuration.

        Raises:
          CheckpointFormatError: an unsupported ``model_type``, rotary scaling or activation, or a missing
            required field.

        References: Hugging Face transformers configuration classes (``rope_parameters`` of transformers 5,
        ``rope_theta`` / ``rope_scaling`` of transformers 4).
        """
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointFormatError(
                f"{source}: model_type {mt!r} is not supported by jmerge.models; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg.get("intermediate_size") or 0)
        except KeyError as e:
            raise CheckpointFormatError(f"{source}: missing field {e.args[0]!r} for a {mt} model") from None
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, scaling = RopeScaling.from_config(cfg, source)
        act_name = cfg.get("hidden_activation") if mt == "gemma2" else None
        act_name = act_name or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if mt == "gemma2" else "silu")
        if act_name not in ACTIVATIONS:
            raise CheckpointFormatError(f"{source}: hidden activation {act_name!r} is not supported by jmerge.models; "
                                        f"supported: {', '.join(ACTIVATIONS)}")
        act = ACTIVATIONS[act_name]
        window = cfg.get("sliding_window", 4096 if mt == "gemma2" else None)
        layer_types = cfg.get("layer_types")
        if mt == "gemma2":  # transformers: layer_types, else every other layer (0, 2, ...) slides
            types = layer_types or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
            windows = tuple(int(window) if t == "sliding_attention" and window else None for t in types)
        elif mt == "qwen3_moe":  # transformers 5: the window (if use_sliding_window) on every layer
            windows = (int(window) if cfg.get("use_sliding_window") and window else None,) * layers
        elif mt in ("qwen2", "qwen3", "qwen2_moe"):
            if layer_types:
                windows = tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
            elif cfg.get("use_sliding_window") and window:
                mwl = int(cfg.get("max_window_layers", layers))
                windows = tuple(int(window) if i >= mwl else None for i in range(layers))
            else:
                windows = (None,) * layers
        else:
            windows = (int(window) if window else None,) * layers
        n_exp = 0
        moe_layers = (False,) * layers
        top_k = 0
        moe_inter = 0
        shared = 0
        norm_topk = True
        if mt == "mixtral":
            n_exp = int(cfg.get("num_local_experts", 8))
            top_k = int(cfg.get("num_experts_per_tok", 2))
            moe_inter = inter
            moe_layers = (True,) * layers
        elif mt in ("qwen2_moe", "qwen3_moe"):  # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts
            n_exp = int(cfg.get("num_experts") or cfg.get("num_local_experts") or (60 if mt == "qwen2_moe" else 128))
            top_k = int(cfg.get("num_experts_per_tok") or (4 if mt == "qwen2_moe" else 8))
            moe_inter = int(cfg.get("moe_intermediate_size", inter))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
            norm_topk = bool(cfg.get("norm_topk_prob", False))
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(n_exp > 0 and i not in only and (i + 1) % step == 0 for i in range(layers))
        if n_exp and not 0 < top_k <= n_exp:
            raise CheckpointFormatError(f"{source}: num_experts_per_tok={top_k} must be in 1..{n_exp}")
        if any(moe_layers) and act != "silu":
            raise CheckpointFormatError(f"{source}: MoE experts with hidden_act {act_name!r} are not supported by "
                                        "jmerge.models; experts are SwiGLU (silu)")
        gemma = mt == "gemma2"

        def opt_float(key: str, default: float | None) -> float | None:
            v = cfg.get(key, default)
            return None if v is None else float(v)
        return cls(
            model_type=mt, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt == "gemma2")),
            attention_bias=(mt in ("qwen2", "qwen2_moe")) or bool(cfg.get("attention_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe"), sliding_windows=windows, num_experts=n_exp,
            num_experts_per_tok=top_k, moe_intermediate_size=moe_inter, norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=shared, moe_layers=moe_layers, rope_scaling=scaling, hidden_act=act,
            norm_plus_one=gemma, embed_scale=gemma, sandwich_norms=gemma,
            query_pre_attn_scalar=opt_float("query_pre_attn_scalar", 256.0) if gemma else None,
            attn_logit_softcapping=opt_float("attn_logit_softcapping", 50.0) if gemma else None,
            final_logit_softcapping=opt_float("final_logit_softcapping", 30.0) if gemma else None)
