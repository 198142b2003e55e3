"""Decoder configuration read from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE).

References: Hugging Face transformers ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``,
``MixtralConfig``, ``Qwen2MoeConfig`` (field names and defaults).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..io import CheckpointFormatError

#: ``model_type`` values :class:`DecoderConfig` understands.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The hyperparameters of a Llama-family decoder (dense or MoE), as ``config.json`` gives them.

    Attributes:
      model_type: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``mixtral`` or ``qwen2_moe``.
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes.
      num_attention_heads, num_key_value_heads, head_dim: attention shape (GQA when KV < Q heads).
      rms_norm_eps, rope_theta: RMSNorm epsilon and the rotary base.
      tie_word_embeddings: the LM head is the embedding matrix.
      attention_bias: q/k/v projections have biases (Qwen2: always; Llama: ``attention_bias``).
      qk_norm: RMSNorm of q and k per head before the rotation (Qwen3).
      sliding_windows: per layer, the attention window in tokens, or None for full attention.
      num_experts, num_experts_per_tok, moe_intermediate_size: MoE shape (0 experts: dense).
      norm_topk_prob: renormalise the top-k routing weights to sum to 1 (Mixtral: always).
      shared_expert_intermediate_size: width of Qwen2-MoE's shared expert (0: none).
      moe_layers: per layer, whether its MLP is a mixture of experts.

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
          CheckpointFormatError: an unsupported ``model_type`` or a missing required field.

        References: Hugging Face transformers configuration classes (``rope_parameters`` of transformers 5,
        ``rope_theta`` of transformers 4).
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
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type not in ("default", None) or cfg.get("rope_scaling"):
            raise CheckpointFormatError(
                f"{source}: rope_type {rope_type!r} (rope scaling) is not supported by jmerge.models yet; "
                "only the default rotary embedding is")
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if mt in ("qwen2", "qwen3", "qwen2_moe"):
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
        elif mt == "qwen2_moe":
            n_exp = int(cfg.get("num_experts", 60))
            top_k = int(cfg.get("num_experts_per_tok", 4))
            moe_inter = int(cfg.get("moe_intermediate_size", inter))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
            norm_topk = bool(cfg.get("norm_topk_prob", False))
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(n_exp > 0 and i not in only and (i + 1) % step == 0 for i in range(layers))
        if n_exp and not 0 < top_k <= n_exp:
            raise CheckpointFormatError(f"{source}: num_experts_per_tok={top_k} must be in 1..{n_exp}")
        return cls(
            model_type=mt, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=(mt in ("qwen2", "qwen2_moe")) or bool(cfg.get("attention_bias", False)),
            qk_norm=mt == "qwen3", sliding_windows=windows, num_experts=n_exp, num_experts_per_tok=top_k,
            moe_intermediate_size=moe_inter, norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=shared, moe_layers=moe_layers)
