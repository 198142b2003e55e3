"""Learned merges: coefficients, masks or weights optimised with JAX gradients or closed forms.

AdaMerging and aTLAS (``_adamerging``), Concrete masks (``_concrete``), Fisher merging (``_fisher``),
RegMean (``_regmean``), adaptive projective gradient descent (``_projective``) and tangent-space
linearisation (``_tangent``); shared input checks and the jitted optax trainer live in ``_common``.
Learned merges are functions returning :class:`LearnedMerge`, not Transforms, so ``METHODS`` is empty.
"""

from . import _adamerging, _common, _concrete, _fisher, _projective, _regmean, _tangent
from ._adamerging import *  # noqa: F401,F403
from ._common import *  # noqa: F401,F403
from ._concrete import *  # noqa: F401,F403
from ._fisher import *  # noqa: F401,F403
from ._projective import *  # noqa: F401,F403
from ._regmean import *  # noqa: F401,F403
from ._tangent import *  # noqa: F401,F403

__all__ = (_common.__all__ + _adamerging.__all__ + _concrete.__all__ + _fisher.__all__ + _regmean.__all__
           + _projective.__all__ + _tangent.__all__)

METHODS: dict = {}
