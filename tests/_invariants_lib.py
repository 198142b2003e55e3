"""Helpers shared by the all-methods invariant tests (single process and 8-device subprocess)."""

import numpy as np
import jax
import jax.numpy as jnp

import jmerge


def num_models_for(method):
    T = 3
    if method.max_models is not None:
        T = min(T, method.max_models)
    return max(T, method.min_models)


def flat(tree):
    paths, leaves, _ = jmerge.leaves_with_paths(tree)
    return dict(zip(paths, [np.asarray(jnp.asarray(x, jnp.float32)) for x in leaves]))


def float_hparams(method):
    """Numeric default hyperparameters with a nearby in-range value to switch to."""
    out = {}
    for name, v in method.hparams.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo, hi = method.ranges.get(name, (-np.inf, np.inf))
        new = v * 0.9 if v != 0 else 0.05
        new = float(np.clip(new, lo, hi))
        if new == v:
            new = float(np.clip(v + 0.05, lo, hi))
        if new != v:
            out[name] = new
    return out


def has_stats(method):
    return bool(method.stats)
