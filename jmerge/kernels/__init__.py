"""Fused Pallas kernels for jmerge's inner loops (GPU/TPU; run with ``interpret=True`` on CPU).

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (MLSys 2023).
"""

from .moe import MoEGroups, group_by_expert, grouped_matmul, moe_dense_reference, moe_dispatch, top_k_routing
from .ties import disjoint_merge, disjoint_merge_reference

__all__ = ["MoEGroups", "disjoint_merge", "disjoint_merge_reference", "group_by_expert", "grouped_matmul",
           "moe_dense_reference", "moe_dispatch", "top_k_routing"]
