"""Hyperparameter specs that vary per leaf, per layer and per model.

A hyperparameter value given to a merge may be:

* a number: the same everywhere;
* a list of numbers or :class:`Gradient`: interpolated linearly over the transformer layers
  (mergekit's "gradient": layer ``l`` of ``L`` sits at ``t = l / (L - 1)``; tensors outside the
  layers, such as embeddings and the final norm, take ``t = 0``);
* :class:`Rules` (or mergekit's list of ``{"filter": ..., "value": ...}`` dicts): the first rule
  whose filter matches the leaf path wins (substring, or a regex given as ``re:...``);
* a pytree with the base's structure: one value per leaf;
* a callable ``f(path, t) -> number``;
* :class:`PerModel`: one spec per merged model (mergekit's per-model ``parameters``), giving a vector.

Specs are resolved outside ``jax.jit`` into small float32 arrays per leaf that are passed to the
jitted merge as arguments, so a new value never recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from .tree import MergeInputError, count_layers, layer_index, leaves_with_paths

__all__ = ["Gradient", "Rules", "PerModel", "resolve_hparams", "layer_positions"]


@dataclasses.dataclass(frozen=True)
class Gradient:
    """Values interpolated linearly across layers (mergekit gradient semantics)."""

    values: tuple[float, ...]

    def __init__(self, values: Sequence[float]):
        object.__setattr__(self, "values", tuple(float(v) for v in values))


@dataclasses.dataclass(frozen=True)
class Rules:
    """Path rules: ``Rules([("self_attn", 0.3), ("mlp", Gradient([0, 1]))], default=0.5)``.

    The first rule whose filter matches wins. A filter is a substring of the path, or a regular
    expression when written ``"re:<pattern>"``. ``default`` applies when no rule matches.
    """

    rules: tuple[tuple[str, Any], ...]
    default: Any = None

    def __init__(self, rules: Sequence[tuple[str, Any]], default: Any = None):
        object.__setattr__(self, "rules", tuple((str(f), v) for f, v in rules))
        object.__setattr__(self, "default", default)


@dataclasses.dataclass(frozen=True)
class PerModel:
    """One spec per merged model, e.g. ``PerModel([0.7, 0.3])`` for two models' weights."""

    specs: tuple[Any, ...]

    def __init__(self, specs: Sequence[Any]):
        object.__setattr__(self, "specs", tuple(specs))


def _matches(filt: str, path: str) -> bool:
    if filt.startswith("re:"):
        return re.search(filt[3:], path) is not None
    return filt in path


def layer_positions(paths: Sequence[str], num_layers: int | None = None) -> list[float]:
    """Position ``t`` in [0, 1] of each path for gradient interpolation (0 outside the layers)."""
    n = count_layers(paths) if num_layers is None else num_layers
    out = []
    for p in paths:
        i = layer_index(p)
        out.append(0.0 if i is None or n <= 1 else i / (n - 1))
    return out


def interp_gradient(values: Sequence[float], t: float) -> float:
    v = np.asarray(values, np.float64)
    if len(v) == 1:
        return float(v[0])
    return float(np.interp(t, np.linspace(0.0, 1.0, len(v)), v))


def _resolve_one(spec: Any, name: str, path: str, t: float, leaf_value: Any = None) -> Any:
    if isinstance(spec, PerModel):
        return np.stack([np.asarray(_resolve_one(s, name, path, t, leaf_value), np.float32)
                         for s in spec.specs])
    if isinstance(spec, Gradient):
        return interp_gradient(spec.values, t)
    if isinstance(spec, Rules):
        for filt, v in spec.rules:
            if _matches(filt, path):
                return _resolve_one(v, name, path, t)
        if spec.default is None:
            raise MergeInputError(
                f"hyperparameter '{name}': no rule matches leaf '{path}' and no default is set; "
                "add a rule without filter (or Rules(..., default=value))."
            )
        return _resolve_one(spec.default, name, path, t)
    if isinstance(spec, (list, tuple)):
        if spec and all(isinstance(r, Mapping) for r in spec):  # mergekit [{filter, value}, ...]
            rules, default = [], None
            for r in spec:
                if "filter" in r:
                    rules.append((r["filter"], r["value"]))
                elif default is None:
                    default = r["value"]
            return _resolve_one(Rules(rules, default), name, path, t)
        return interp_gradient([float(x) for x in spec], t)
    if isinstance(spec, Mapping) and "value" in spec and len(spec) <= 2:
        return _resolve_one(spec["value"], name, path, t)
    if callable(spec):
        return spec(path, t)
    if leaf_value is not None:
        return leaf_value
    if isinstance(spec, bool):
        return float(spec)
    if np.ndim(spec) == 0:
        return float(spec)
    raise MergeInputError(
        f"hyperparameter '{name}' at leaf '{path}': cannot use value {spec!r}; give a number, a "
        "list (per-layer gradient), Rules, PerModel, a callable or a pytree like the base."
    )


def resolve_hparams(specs: Mapping[str, Any], base: Any, *, num_layers: int | None = None,
                    num_models: int | None = None) -> list[dict[str, np.ndarray]]:
    """Resolve hyperparameter specs into one dict of float32 arrays per leaf of ``base``.

    Args:
      specs: name -> spec (see module docstring).
      base: the base params pytree (only its structure and paths are used).
      num_layers: layer count for gradients (default: inferred from the paths).
      num_models: when given, per-model vectors are checked to have this length.

    Returns:
      A list, in leaf order, of ``{name: np.float32 array}`` (scalar, or ``(T,)`` for PerModel).
    """
    paths, leaves, treedef = leaves_with_paths(base)
    ts = layer_positions(paths, num_layers)
    per_leaf: list[dict[str, np.ndarray]] = [dict() for _ in paths]
    for name, spec in specs.items():
        tree_vals = None
        if not isinstance(spec, (Gradient, Rules, PerModel, list, tuple, Mapping)) and not callable(spec) \
                and np.ndim(spec) == 0:
            tree_vals = None
        elif isinstance(spec, Mapping) and not ("value" in spec and len(spec) <= 2):
            try:
                tree_vals = treedef.flatten_up_to(spec)
            except (ValueError, TypeError) as e:
                raise MergeInputError(
                    f"hyperparameter '{name}' is a pytree that does not match the params tree: {e}. "
                    "Give one value per leaf in the same structure, or use Rules."
                ) from None
        for i, p in enumerate(paths):
            v = _resolve_one(spec, name, p, ts[i], None if tree_vals is None else tree_vals[i])
            if isinstance(v, (jax.Array,)):
                v = np.asarray(v)
            arr = np.asarray(v, np.float32)
            if num_models is not None and arr.ndim == 1 and arr.shape[0] != num_models:
                raise MergeInputError(
                    f"hyperparameter '{name}' at leaf '{p}' has {arr.shape[0]} per-model values "
                    f"but {num_models} models are merged."
                )
            per_leaf[i][name] = arr
    return per_leaf
