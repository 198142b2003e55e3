"""Shared random pytrees for tests (plain nested dicts with transformer-like paths)."""

import numpy as np
import jax.numpy as jnp

SHAPES = {"embed": (11, 8), "layers.0.attn.w": (16, 12), "layers.0.norm": (7,), "layers.1.attn.w": (16, 12),
          "layers.1.norm": (7,), "layers.2.mlp.w": (3, 4, 5), "head": (8, 5)}


def nest(flat):
    out = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def random_trees(T=3, seed=0, dtype=jnp.float32, delta=0.1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    models = [{k: v + delta * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(T)]
    conv = lambda d: nest({k: jnp.asarray(v, dtype) for k, v in d.items()})
    return conv(base), [conv(m) for m in models]
