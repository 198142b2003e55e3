"""Pytree helpers: parameter paths, structure checks, per-leaf PRNG keys.

A *path* is the dotted name of a leaf, e.g. ``model.layers.3.mlp.up_proj.weight`` for a nested dict
``{"model": {"layers": {"3": ...}}}`` or a Flax NNX state. Paths are what filters, per-layer
hyperparameters and error messages use, and what DARE-style randomness is keyed on.
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MergeInputError",
    "check_task_vectors",
    "path_str",
    "LeafKind",
    "leaf_kind",
    "optimizer_state_paths",
    "leaves_with_paths",
    "check_compatible",
    "leaf_key",
    "layer_index",
    "count_layers",
]


from .errors import MergeInputError

LeafKind = str
"""One of ``"float"`` (merged), ``"int"``, ``"bool"``, ``"key"`` (PRNG keys), ``"complex"``, ``"other"``."""


def leaf_kind(x: Any) -> LeafKind:
    """How the merge treats a leaf, from its dtype.

    ``"float"`` leaves (float16/32/64, bfloat16, float8 ...) and Python floats are merged; ``"int"``,
    ``"bool"`` and ``"key"`` (typed PRNG keys such as Flax NNX ``Rngs`` state) leaves are taken from the
    base by default; ``"complex"`` leaves are refused; anything else is ``"other"``.

    References: none (infrastructure).
    """
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "float"
    dt = getattr(x, "dtype", None)
    if dt is None:
        try:
            dt = np.asarray(x).dtype
        except Exception:  # noqa: BLE001 - not array-like at all
            return "other"
    if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
        return "key"
    if jnp.issubdtype(dt, jnp.complexfloating):
        return "complex"
    if jnp.issubdtype(dt, jnp.floating):
        return "float"
    if jnp.issubdtype(dt, jnp.bool_):
        return "bool"
    if jnp.issubdtype(dt, jnp.integer):
        return "int"
    return "other"


def optimizer_state_paths(tree: Any) -> list[tuple[str, str]]:
    """``(path, type name)`` of optimizer-state nodes in ``tree``: optax states (any node whose type
    comes from ``optax``), Flax NNX ``OptState`` variables, and ``opt_state`` path components.

    References: none (infrastructure).
    """
    found: list[tuple[str, str]] = []

    def visit(path, x):
        mod = type(x).__module__ or ""
        name = type(x).__name__
        if mod.split(".")[0] == "optax" or name in ("OptState", "OptArray", "OptVariable"):
            found.append((path_str(path), name))
            return True
        return False

    _walk(tree, (), visit)
    if not found:
        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            s = path_str(p)
            if "opt_state" in s.split("."):
                found.append((s.split("opt_state")[0] + "opt_state", "opt_state"))
                break
    return found


def _walk(x, path, visit):
    """Depth-first walk over pytree nodes (not only leaves), stopping below a node ``visit`` accepts."""
    if visit(path, x):
        return
    children, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    for p, c in children:
        if p and c is not x:
            _walk(c, path + tuple(p), visit)


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
    """Dotted name of a JAX key path (``('model', 'layers', 0, 'w')`` -> ``model.layers.0.w``).

    References: none (infrastructure).
    """
    return ".".join(_key_str(k) for k in keypath)


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flatten ``tree`` to (paths, leaves, treedef), in JAX's canonical leaf order.

    References: none (infrastructure).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:  # the dotted paths depend on the structure alone: built once per treedef
        paths, cacheable = _PATHS.get(treedef), True
    except TypeError:  # a node whose auxiliary data cannot be hashed: no caching
        paths, cacheable = None, False
    if paths is None:
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        if cacheable and len(_PATHS) < 256:
            _PATHS[treedef] = paths
    return list(paths), leaves, treedef


_PATHS: dict[Any, list[str]] = {}


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

    References: none (infrastructure).
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

    References: none (infrastructure).
    """
    h = zlib.crc32(path.encode()) & 0x7FFFFFFF
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return _int_seed_key(int(seed), h)
    return _fold(seed, h)


def _fold(seed: int | jax.Array, h: int) -> jax.Array:
    key = seed if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) \
        else jax.random.key(seed)
    return jax.random.fold_in(key, np.uint32(h))


@functools.lru_cache(maxsize=1 << 12)
def _int_seed_key(seed: int, h: int) -> jax.Array:
    """``leaf_key`` of an integer seed, computed once and kept (the last 4,096 (seed, path) pairs): a merge of
    N leaves otherwise dispatches 4N small ops per call (15 ms of a 23 ms TIES merge of 37 leaves on CPU).

    With JAX's default threefry keys the key's two words are computed here on the host
    (:func:`_threefry_fold_in_data`) and wrapped, dispatching nothing: computed by JAX the first key cost
    0.15-0.3 s of compiles in every process (a CLI merge of a Llama checkpoint, before any tensor merged).
    Other key implementations, and seeds outside ``[0, 2**31)``, are computed by JAX (eagerly, also inside a
    trace)."""
    with jax.ensure_compile_time_eval():  # a concrete key, also inside a trace (it is kept)
        if 0 <= seed < 2**31 and str(jax.config.jax_default_prng_impl) == "threefry2x32":
            return jax.random.wrap_key_data(_threefry_fold_in_data(seed, h), impl="threefry2x32")
        return _fold(seed, h)


_M32 = 0xFFFFFFFF


def _threefry_fold_in_data(seed: int, h: int) -> np.ndarray:
    """The data (two uint32 words) of ``jax.random.fold_in(jax.random.key(seed), h)`` with threefry2x32 keys,
    for ``0 <= seed < 2**31`` and a uint32 ``h``: the key of a seed is ``(0, seed)``, and folding in ``h``
    hashes the count ``(0, h)`` with Threefry-2x32 (20 rounds) under that key.

    References: Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (SC 2011), Threefry-2x32-20.
    """
    k0, k1 = 0, seed & _M32
    ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
    rot = ((13, 15, 26, 6), (17, 29, 16, 24))
    x0, x1 = (0 + ks[0]) & _M32, (h + ks[1]) & _M32
    for i in range(5):
        for r in rot[i % 2]:
            x0 = (x0 + x1) & _M32
            x1 = ((x1 << r) | (x1 >> (32 - r))) & _M32
            x1 ^= x0
        x0 = (x0 + ks[(i + 1) % 3]) & _M32
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & _M32
    return np.array([x0, x1], np.uint32)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoderblock|resblocks)[._]?(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """Transformer layer number in a parameter path (``model.layers.7.mlp...`` -> 7), else None.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for the layer numbering of gradients.
    """
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def count_layers(paths: Sequence[str]) -> int:
    """Number of transformer layers found in ``paths`` (max layer index + 1; 0 if none).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for the layer count of gradients.
    """
    idx = [i for i in (layer_index(p) for p in paths) if i is not None]
    return max(idx) + 1 if idx else 0


def check_task_vectors(base: Any, task_vectors: Any, where: str = "merge") -> tuple[list[str], list[Any], int]:
    """Check stacked task vectors against the base: same tree, each leaf ``(T, *base_leaf.shape)``.

    Returns:
      ``(paths, task-vector leaves, T)``.

    Raises:
      MergeInputError: naming the first leaf whose shape does not fit.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    bpaths, base_leaves, treedef = leaves_with_paths(base)
    _, tv_leaves, ttd = leaves_with_paths(task_vectors)
    if ttd != treedef:
        raise MergeInputError(f"{where}: task_vectors must have the base's tree structure (leaves shaped (T, *shape)).")
    for p, b, tv in zip(bpaths, base_leaves, tv_leaves):
        if tuple(np.shape(tv))[1:] != tuple(np.shape(b)):
            raise MergeInputError(f"{where}: leaf '{p}': task vectors have shape {tuple(np.shape(tv))}, expected "
                                  f"(T, *{tuple(np.shape(b))}).")
    return bpaths, tv_leaves, int(np.shape(tv_leaves[0])[0]) if tv_leaves else 0
