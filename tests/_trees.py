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


SMALL_SHAPES = {"a": (7,), "b": {"c": (16, 12)}, "d": (3, 4, 5)}


def small_tree(seed, T=3, dtype=np.float32, shapes=SMALL_SHAPES):
    """NumPy base and T models (base + N(0, 1) deltas) on a small nested tree."""
    import jax
    rng = np.random.default_rng(seed)
    base = jax.tree.map(lambda s: rng.normal(size=s).astype(dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    models = [jax.tree.map(lambda b: (b.astype(np.float32) + rng.normal(size=b.shape)).astype(dtype), base)
              for _ in range(T)]
    return base, models


def np_taus(base, models):
    """Per-leaf (path, base f32, tau (T, ...) f32) from the actual (possibly bf16) values."""
    from jmerge import leaves_with_paths
    paths, bl, _ = leaves_with_paths(base)
    mls = [leaves_with_paths(m)[1] for m in models]
    out = []
    for i, p in enumerate(paths):
        b = np.asarray(bl[i]).astype(np.float32)
        tau = np.stack([np.asarray(ml[i]).astype(np.float32) for ml in mls]) - b[None]
        out.append((p, b, tau))
    return out


def np_topk(x, k):
    """NumPy reference: mask of the k largest entries of flat x, ties broken by the lowest index."""
    order = np.argsort(-x, kind="stable")
    m = np.zeros(x.shape, bool)
    m[order[:k]] = True
    return m


def k_round(d, n):
    """NumPy reference for density -> kept count: round(float32(d) * n), clipped to [0, n]."""
    return int(np.clip(np.round(np.float32(d) * np.float32(n)), 0, n))
