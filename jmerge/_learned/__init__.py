"""Learned merges: coefficients, masks or weights optimised with JAX gradients or closed forms.

AdaMerging, aTLAS, Concrete masks, Fisher merging, RegMean, adaptive projective gradient descent and
tangent-space (linearised) models. Learned merges are functions returning :class:`LearnedMerge`,
not Transforms, so ``METHODS`` is empty.
"""

from importlib import import_module as _imp

__all__ = []
_SUBMODULES = ["_common", "_adamerging", "_concrete", "_fisher", "_regmean", "_projective", "_tangent"]

for _m in _SUBMODULES:
    try:
        _mod = _imp(f"{__name__}.{_m}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_m}":
            raise
        continue
    for _n in _mod.__all__:
        globals()[_n] = getattr(_mod, _n)
    __all__ += list(_mod.__all__)
del _m, _mod, _imp

METHODS: dict = {}
