"""Learned merges: coefficients, masks or weights optimised with JAX gradients or closed forms.

AdaMerging and aTLAS (``adamerging``), Concrete masks (``concrete``), Fisher merging (``fisher``),
RegMean (``regmean``), adaptive projective gradient descent (``projective``) and tangent-space
linearisation (``tangent``); shared input checks and the jitted optax trainer live in ``common``.
Learned merges are functions returning :class:`LearnedMerge`, not Transforms.

References: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024); see
each module for its method's paper.
"""

from __future__ import annotations

from .adamerging import adamerging, atlas, merge_with_coefficients
from .common import LearnedMerge, LearnedMergeError
from .concrete import concrete_mask, concrete_merge
from .fisher import fisher_information, fisher_merge
from .projective import adaptive_projective_gd
from .regmean import gram_matrices, regmean_merge
from .tangent import linearize

__all__ = ["LearnedMerge", "LearnedMergeError", "adamerging", "atlas", "merge_with_coefficients", "concrete_merge",
           "concrete_mask", "fisher_information", "fisher_merge", "gram_matrices", "regmean_merge",
           "adaptive_projective_gd", "linearize"]
