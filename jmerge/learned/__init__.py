"""Learned merges: coefficients, masks or weights optimised with JAX gradients or closed forms.

AdaMerging and aTLAS (``_adamerging``), Concrete masks (``_concrete``), Fisher merging (``_fisher``),
RegMean (``_regmean``), adaptive projective gradient descent (``_projective``) and tangent-space
linearisation (``_tangent``); shared input checks and the jitted optax trainer live in ``_common``.
Learned merges are functions returning :class:`LearnedMerge`, not Transforms, so ``METHODS`` is empty.
"""

from . import adamerging as _adamerging, common as _common, concrete as _concrete, fisher as _fisher, projective as _projective, regmean as _regmean, tangent as _tangent
from .adamerging import *  # noqa: F401,F403
from .common import *  # noqa: F401,F403
from .concrete import *  # noqa: F401,F403
from .fisher import *  # noqa: F401,F403
from .projective import *  # noqa: F401,F403
from .regmean import *  # noqa: F401,F403
from .tangent import *  # noqa: F401,F403

__all__ = (_common.__all__ + _adamerging.__all__ + _concrete.__all__ + _fisher.__all__ + _regmean.__all__
           + _projective.__all__ + _tangent.__all__)

METHODS: dict = {}
