"""Dynamic merging: models merged per input by a router over task-specific parts.

Twin-Merging (shared knowledge + low-rank exclusive knowledge weighted per input), WEMoE (MLPs as
routed task-vector experts), SMILE (zero-shot routing between low-rank SVD experts) and mixtures of
LoRA experts, for any Flax model whose parameters are a pytree.

References: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
(NeurIPS 2024); Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts"
(ICML 2024); Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
Pre-Trained Foundation Models" (2024).
"""

from __future__ import annotations

from .router import RouterFit, init_router, one_hot_weights, router_logits, softmax_weights, top_k_weights, train_router  # noqa: E501
from .smile import SmileLinear, SmileModel, smile_apply, smile_linear, smile_routing, smile_storage, smile_upscale  # noqa: E501
from .twin import TwinMerge, twin_apply, twin_forward, twin_merge, twin_storage
from .wemoe import WEMoE, build_wemoe, entropy_loss, vit_mlp_groups, wemoe_apply, wemoe_storage, wemoe_tta, with_constant_routing  # noqa: E501
from .lora_experts import LoraExpert, LoraMoE, build_lora_moe, lora_expert_from_flax, lora_moe_apply, lora_moe_delta, read_peft_expert, train_lora_router, with_forced_expert  # noqa: E501

__all__: list[str] = []
__all__ += ["twin_merge", "twin_apply", "twin_forward", "twin_storage", "TwinMerge", "smile_upscale", "smile_apply", "smile_linear", "smile_routing", "smile_storage", "SmileModel", "SmileLinear", "train_router", "init_router", "router_logits", "softmax_weights", "top_k_weights", "one_hot_weights", "RouterFit"]  # noqa: E501
__all__ += ["build_wemoe", "wemoe_apply", "wemoe_tta", "wemoe_storage", "with_constant_routing", "vit_mlp_groups", "entropy_loss", "WEMoE", "build_lora_moe", "lora_moe_apply", "lora_moe_delta", "read_peft_expert", "lora_expert_from_flax", "train_lora_router", "with_forced_expert", "LoraExpert", "LoraMoE"]  # noqa: E501
