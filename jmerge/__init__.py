"""jmerge: JAX-native model merging.

Task vectors, masks and merges (task arithmetic, TIES, DARE, TALL masks, PCB, AdaMerging ...) as
pure, jittable, shardable pytree transforms, composable like ``optax.chain``.

    import jmerge
    merged = jmerge.merge(jmerge.ties(density=0.2, scale=1.0), base_params, [ft1, ft2, ft3])
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# Each private module declares its public names in ``__all__``; they are re-exported here.
_MODULES = [
    "_tree",
    "_hparams",
    "_core",
    "_basic",
    "_select",
    "_sparsify",
    "_ties",
    "_masks",
    "_geometric",
    "_spectral",
    "_layers",
    "_learned",
    "_checkpoint",
    "_config",
    "_pipeline",
]

__all__ = ["__version__", "available_methods"]
_METHODS: dict = {}


def available_methods() -> dict:
    """Named merge methods: ``{name: factory}``; ``factory(**hparams)`` returns a Transform.

    Each family module lists its methods in a module-level ``METHODS`` dict.
    """
    return dict(_METHODS)


for _m in _MODULES:
    try:
        _mod = _import_module(f"jmerge.{_m}")
    except ModuleNotFoundError as _e:  # a family not written yet
        if _e.name != f"jmerge.{_m}":
            raise
        continue
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
    __all__ += list(getattr(_mod, "__all__", []))
    _METHODS.update(getattr(_mod, "METHODS", {}))
del _m, _mod, _import_module
