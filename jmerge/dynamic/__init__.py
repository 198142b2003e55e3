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

__all__: list[str] = []
__all__ += ["twin_merge", "twin_apply", "twin_forward", "twin_storage", "TwinMerge", "smile_upscale", "smile_apply", "smile_linear", "smile_routing", "smile_storage", "SmileModel", "SmileLinear", "train_router", "init_router", "router_logits", "softmax_weights", "top_k_weights", "one_hot_weights", "RouterFit"]  # noqa: E501
