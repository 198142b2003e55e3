"""Pytree helpers: parameter paths, structure checks, per-leaf PRNG keys.

A *path* is the dotted name of a leaf, e.g. ``model.layers.3.mlp.up_proj.weight`` for a nested dict
``{"model": {"layers": {"3": ...}}}`` or a Flax NNX state. Paths are what filters, per-layer
hyperparameters and error messages use, and what DARE-style randomness is keyed on.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MergeInputError",
    "path_str",
    "leaves_with_paths",
    "check_compatible",
    "leaf_key",
    "layer_index",
    "count_layers",
]


class MergeInputError(ValueError):
    """Raised for inputs a merge cannot use; the message names the leaf path and what to do."""


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Sequence[Any]) -> str:
    """Dotted name of a JAX key path (``('model', 'layers', 0, 'w')`` -> ``model.layers.0.w``)."""
    return ".".join(_key_str(k) for k in keypath)


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flatten ``tree`` to (paths, leaves, treedef), in JAX's canonical leaf order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _desc(x: Any) -> str:
    return f"shape {tuple(np.shape(x))} dtype {getattr(x, 'dtype', type(x).__name__)}"


def check_compatible(base: Any, models: Sequence[Any], *, check_finite: bool = False,
                     same_dtype: bool = False) -> None:
    """Check that every model has the base's tree structure and leaf shapes.

    Args:
      base: the base (pretrained) params pytree.
      models: fine-tuned params pytrees.
      check_finite: also reject NaN/Inf values (one device sync per leaf; opt in).
      same_dtype: also require equal dtypes (by default mixed dtypes are computed in float32).

    Raises:
      MergeInputError: naming the first offending leaf path, its shapes and dtypes.
    """
    bpaths, bleaves, btd = leaves_with_paths(base)
    for i, m in enumerate(models):
        mpaths, mleaves, mtd = leaves_with_paths(m)
        if mtd != btd:
            missing = sorted(set(bpaths) - set(mpaths))
            extra = sorted(set(mpaths) - set(bpaths))
            raise MergeInputError(
                f"model {i} does not have the base's tree structure: "
                f"missing leaves {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"extra leaves {extra[:5]}{'...' if len(extra) > 5 else ''}. "
                "Give every model the same parameter tree as the base (same keys and containers)."
            )
        for p, b, x in zip(bpaths, bleaves, mleaves):
            if np.shape(b) != np.shape(x):
                raise MergeInputError(
                    f"leaf '{p}': model {i} has {_desc(x)} but the base has {_desc(b)}. "
                    "Models must share the base architecture; slice or pad the tensor first."
                )
            if same_dtype and jnp.dtype(x.dtype) != jnp.dtype(b.dtype):
                raise MergeInputError(
                    f"leaf '{p}': model {i} has {_desc(x)} but the base has {_desc(b)}; "
                    "cast the models to the base dtype or drop same_dtype=True."
                )
    if check_finite:
        for i, m in enumerate([base, *models]):
            for p, x in zip(*leaves_with_paths(m)[:2]):
                if not bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))):
                    who = "the base" if i == 0 else f"model {i - 1}"
                    raise MergeInputError(
                        f"leaf '{p}' of {who} ({_desc(x)}) has NaN or Inf values; "
                        "fix or drop that checkpoint before merging."
                    )


def leaf_key(seed: int | jax.Array, path: str) -> jax.Array:
    """PRNG key for one leaf: the seed folded with a stable hash (CRC32) of the leaf's path.

    Independent of leaf order, of the other leaves and of sharding, so a tensor-at-a-time
    (out-of-core) merge draws exactly the same random numbers as a whole-tree merge.
    """
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        key = seed
    else:
        key = jax.random.key(seed)
    return jax.random.fold_in(key, np.uint32(zlib.crc32(path.encode()) & 0x7FFFFFFF))


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoderblock|resblocks)[._]?(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """Transformer layer number in a parameter path (``model.layers.7.mlp...`` -> 7), else None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def count_layers(paths: Sequence[str]) -> int:
    """Number of transformer layers found in ``paths`` (max layer index + 1; 0 if none)."""
    idx = [i for i in (layer_index(p) for p in paths) if i is not None]
    return max(idx) + 1 if idx else 0
