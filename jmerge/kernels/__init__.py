"""Fused Pallas kernels for jmerge's inner loops (GPU/TPU; run with ``interpret=True`` on CPU).

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from .ties import disjoint_merge, disjoint_merge_reference

__all__ = ["disjoint_merge", "disjoint_merge_reference"]
