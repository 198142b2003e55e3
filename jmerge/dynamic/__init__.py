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

__all__: list[str] = []
