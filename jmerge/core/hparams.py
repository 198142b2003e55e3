"""Hyperparameter specs that vary per leaf, per layer and per model.

A hyperparameter value given to a merge may be:

* a number (or a 0-d array, possibly traced): the same everywhere;
* :class:`Gradient`: values interpolated linearly over the transformer layers (mergekit's
  "gradient": layer ``l`` of ``L`` sits at ``t = l / (L - 1)``; tensors outside the layers, such as
  embeddings and the final norm, take ``t = 0``);
* :class:`PerModel`: one spec (or one entry of a 1-D array) per merged model, giving a vector;
* :class:`Rules` (or mergekit's list of ``{"filter": ..., "value": ...}`` dicts): the first rule
  whose filter matches the leaf path wins (substring, or a regex given as ``re:...``); a filter that
  no leaf uses is an error unless ``allow_unused=True``;
* a pytree with the base's structure: one value per leaf;
* a callable ``f(path, t) -> number``.

:data:`HParamSpec` is the type of any of these values, the annotation of every hyperparameter
argument of the method factories (``jmerge.ties(density: HParamSpec = 0.2, ...)``).

A bare list, tuple or 1-D array is refused: ``[0.7, 0.3]`` could mean one value per layer or one per
model, so write ``Gradient([...])`` or ``PerModel([...])``.

Specs are resolved outside ``jax.jit`` into small float32 arrays per leaf that are passed to the
jitted merge as arguments, so a new value never recompiles. Values that are JAX tracers (a merge
inside the user's ``jax.jit`` or ``jax.vmap``) stay traced.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for gradients and filters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .errors import MergeInputError
from .tree import count_layers, layer_index

__all__ = ["HParamSpec", "Gradient", "Rules", "PerModel", "resolve_hparams", "layer_positions", "interp_gradient"]


@dataclasses.dataclass(frozen=True)
class Gradient:
    """Values interpolated linearly across layers (mergekit gradient semantics).

    ``Gradient([0.0, 1.0])`` is 0 at the first layer and 1 at the last; ``Gradient([a])`` is ``a``.
    Values may be JAX arrays (also traced).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for its ``gradient`` values.
    """

    values: tuple[Any, ...]

    def __init__(self, values: Sequence[Any]):
        vals = tuple(values)
        if not vals:
            raise MergeInputError("Gradient needs at least one value.")
        object.__setattr__(self, "values", tuple(v if _is_tracer(v) else float(v) for v in vals))


@dataclasses.dataclass(frozen=True)
class Rules:
    """Path rules: ``Rules([("self_attn", 0.3), ("mlp", Gradient([0, 1]))], default=0.5)``.

    The first rule whose filter matches wins. A filter is a substring of the path, or a regular
    expression when written ``"re:<pattern>"``; the empty filter matches everything. ``default``
    applies when no rule matches. A rule that no leaf uses (its filter matches nothing, or earlier
    rules win wherever it matches) is an error naming it, unless ``allow_unused=True``.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for its ``filter``/``value`` lists.
    """

    rules: tuple[tuple[str, Any], ...]
    default: Any = None
    allow_unused: bool = False

    def __init__(self, rules: Sequence[tuple[str, Any]], default: Any = None, *, allow_unused: bool = False):
        object.__setattr__(self, "rules", tuple((str(f), v) for f, v in rules))
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "allow_unused", bool(allow_unused))


@dataclasses.dataclass(frozen=True)
class PerModel:
    """One spec per merged model, e.g. ``PerModel([0.7, 0.3])`` for two models' weights.

    ``PerModel(jnp.array([...]))`` takes a 1-D array (concrete or traced) as the vector itself.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for per-model parameters.
    """

    specs: Any

    def __init__(self, specs: Any):
        if _is_array(specs) and np.ndim(specs) == 1:
            object.__setattr__(self, "specs", specs)
        else:
            object.__setattr__(self, "specs", tuple(specs))


HParamSpec = Union[float, int, bool, jax.Array, np.ndarray, Gradient, PerModel, Rules, Callable[[str, float], Any],
                   Mapping[str, Any], Sequence[Mapping[str, Any]]]
"""A hyperparameter value (see the module docstring): a number or 0-d array (possibly traced), a
:class:`Gradient`, :class:`PerModel` or :class:`Rules`, a callable ``f(path, t) -> number``, a pytree
(mapping) with the base's structure, or mergekit's ``{"filter": ..., "value": ...}`` entries.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for gradients, per-model values and filters."""


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _matches(filt: str, path: str) -> bool:
    if filt.startswith("re:"):
        return re.search(filt[3:], path) is not None
    return filt in path


def layer_positions(paths: Sequence[str], num_layers: int | None = None) -> list[float]:
    """Position ``t`` in [0, 1] of each path for gradient interpolation (0 outside the layers).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for gradient positions.
    """
    n = count_layers(paths) if num_layers is None else num_layers
    out = []
    for p in paths:
        i = layer_index(p)
        out.append(0.0 if i is None or n <= 1 else i / (n - 1))
    return out


def interp_gradient(values: Sequence[Any], t: float) -> float | jax.Array:
    """Linear interpolation of ``values`` (evenly spaced over [0, 1]) at ``t``; traced values stay traced.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for gradient interpolation.
    """
    if len(values) == 1:
        return values[0]
    grid = np.linspace(0.0, 1.0, len(values))
    if any(_is_tracer(v) for v in values):
        return jnp.interp(jnp.float32(t), jnp.asarray(grid, jnp.float32), jnp.stack([jnp.asarray(v, jnp.float32)
                                                                                      for v in values]))
    return float(np.interp(t, grid, np.asarray(values, np.float64)))


class _Usage:
    """Which rules of which :class:`Rules` objects some leaf used (for the unused-rule check)."""

    def __init__(self):
        self.used: dict[int, set] = {}
        self.matched: dict[int, set] = {}
        self.objs: dict[int, Rules] = {}

    def note(self, rules: Rules, used: int | None, matched: Sequence[int]):
        k = id(rules)
        self.objs[k] = rules
        self.used.setdefault(k, set())
        self.matched.setdefault(k, set()).update(matched)
        if used is not None:
            self.used[k].add(used)

    def check(self, name: str, paths: Sequence[str]):
        for k, r in self.objs.items():
            if r.allow_unused:
                continue
            for i, (filt, _) in enumerate(r.rules):
                if i in self.used[k]:
                    continue
                if i in self.matched[k]:
                    why = "earlier rules win at every leaf it matches"
                else:
                    why = "it matches no leaf"
                ex = ", ".join(f"'{p}'" for p in list(paths)[:3])
                raise MergeInputError(
                    f"hyperparameter {name}: the rule with filter '{filt}' is never used ({why}; leaves look "
                    f"like {ex}). Fix the filter, or pass Rules(..., allow_unused=True) to allow it.")


def _bare_sequence_error(name: str, spec) -> MergeInputError:
    try:
        shown = [float(x) for x in np.asarray(spec).reshape(-1)[:6]]
    except Exception:  # noqa: BLE001 - a traced array
        shown = f"array of shape {np.shape(spec)}"
    return MergeInputError(
        f"hyperparameter {name} = {shown}: a bare list or 1-D array is ambiguous (one value per layer, or one "
        f"per model?). Write jmerge.PerModel([...]) for one value per merged model, or jmerge.Gradient([...]) to "
        "interpolate across the layers.")


def _resolve_one(spec: Any, name: str, path: str, t: float, usage: _Usage, leaf_value: Any = None) -> Any:
    # ``name`` is the label used in messages, e.g. "'density' (step 'trim')"
    if isinstance(spec, PerModel):
        if _is_array(spec.specs):
            return spec.specs if _is_tracer(spec.specs) else np.asarray(spec.specs, np.float32)
        vals = [_resolve_one(s, name, path, t, usage) for s in spec.specs]
        if any(_is_tracer(v) or np.ndim(v) != 0 for v in vals):
            if any(np.ndim(v) != 0 for v in vals):
                raise MergeInputError(f"hyperparameter {name} at leaf '{path}': PerModel entries must be scalars.")
            return jnp.stack([jnp.asarray(v, jnp.float32) for v in vals])
        return np.asarray(vals, np.float32)
    if isinstance(spec, Gradient):
        return interp_gradient(spec.values, t)
    if isinstance(spec, Rules):
        hits = [i for i, (f, _) in enumerate(spec.rules) if _matches(f, path)]
        usage.note(spec, hits[0] if hits else None, hits)
        if hits:
            return _resolve_one(spec.rules[hits[0]][1], name, path, t, usage)
        if spec.default is None:
            raise MergeInputError(
                f"hyperparameter {name}: no rule matches leaf '{path}' and no default is set; "
                "add a rule with the empty filter '' or Rules(..., default=value).")
        return _resolve_one(spec.default, name, path, t, usage)
    if leaf_value is not None:
        return _resolve_one(leaf_value, name, path, t, usage)
    if isinstance(spec, (list, tuple)):
        raise _bare_sequence_error(name, spec)
    if callable(spec) and not _is_array(spec):
        return spec(path, t)
    if isinstance(spec, (bool, int, float, np.number)):
        return float(spec)
    if _is_array(spec):
        if np.ndim(spec) == 0:
            return spec if _is_tracer(spec) else float(np.asarray(spec))
        raise _bare_sequence_error(name, spec)
    raise MergeInputError(
        f"hyperparameter {name} at leaf '{path}': cannot use value {spec!r}; give a number, Gradient, "
        "PerModel, Rules, a callable f(path, t) or a pytree like the base.")


def _is_filter_entry(x) -> bool:
    return isinstance(x, Mapping) and "value" in x and set(x) <= {"filter", "value"}


def _normalize(spec):
    """mergekit's ``[{filter, value}, ...]`` lists and single ``{filter, value}`` dicts as :class:`Rules`:
    the first entry whose filter is a substring of the path wins; an entry without filter (or ``*``)
    matches every path; a list value is a :class:`Gradient`."""
    entries = [spec] if _is_filter_entry(spec) else spec
    if isinstance(entries, (list, tuple)) and entries and all(_is_filter_entry(r) for r in entries):
        rules = []
        for r in entries:
            v = r["value"]
            v = Gradient(v) if isinstance(v, (list, tuple)) else v  # a list is a gradient, as in mergekit
            f = r.get("filter")
            rules.append(("" if f in (None, "*") else f, v))  # no filter: matches every leaf, in its place
        return Rules(rules)
    return spec


def _is_tree_spec(spec) -> bool:
    return isinstance(spec, Mapping)


def resolve_hparams(specs: Mapping[str, HParamSpec], paths: Any, *, treedef: Any = None,
                    num_layers: int | None = None, num_models: int | None = None,
                    per_model: Callable[[str], bool] | None = None,
                    labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Resolve hyperparameter specs into one dict of float32 values per leaf.

    Args:
      specs: name -> spec (see the module docstring).
      paths: the leaf paths, in leaf order, or the params pytree itself (its paths and structure).
      treedef: the params' tree structure, needed for pytree-valued specs given with ``paths``.
      num_layers: layer count for gradients (default: inferred from the paths).
      num_models: when given, per-model vectors must have this length.
      per_model: ``per_model(name)`` tells whether ``name`` accepts one value per model; a vector for
        any other hyperparameter is an error (default: all accept vectors).
      labels: how to name each hyperparameter in error messages (default ``'name'``).

    Returns:
      A list, in leaf order, of ``{name: value}``: NumPy float32 arrays (scalar, or ``(T,)`` for
      per-model values), or JAX arrays where the spec holds traced values.

    Raises:
      MergeInputError: naming the hyperparameter and the leaf.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    if not (isinstance(paths, (list, tuple)) and all(isinstance(p, str) for p in paths)):
        from .tree import leaves_with_paths  # noqa: PLC0415
        paths, _, treedef = leaves_with_paths(paths)
    paths = list(paths)
    ts = layer_positions(paths, num_layers)
    per_leaf: list[dict[str, Any]] = [dict() for _ in paths]
    for name, spec in specs.items():
        lab = (labels or {}).get(name, f"'{name}'")
        spec = _normalize(spec)
        tree_vals = None
        if _is_tree_spec(spec):
            if treedef is None:
                raise MergeInputError(f"hyperparameter {lab} is a mapping but no params tree is known here; "
                                      "use Rules([(filter, value), ...]) to give values by path.")
            try:
                tree_vals = treedef.flatten_up_to(spec)
            except (ValueError, TypeError) as e:
                raise MergeInputError(
                    f"hyperparameter {lab} is a pytree that does not match the params tree: {e}. "
                    "Give one value per leaf in the same structure, or use Rules.") from None
        usage = _Usage()
        for i, p in enumerate(paths):
            v = _resolve_one(spec, lab, p, ts[i], usage, None if tree_vals is None else tree_vals[i])
            if _is_tracer(v):
                arr = jnp.asarray(v, jnp.float32)
            else:
                arr = np.asarray(v, np.float32)
            if arr.ndim > 1:
                raise MergeInputError(f"hyperparameter {lab} at leaf '{p}' has shape {arr.shape}; give a scalar "
                                      "or one value per model (PerModel).")
            if arr.ndim == 1:
                if per_model is not None and not per_model(name):
                    raise MergeInputError(
                        f"hyperparameter {lab} at leaf '{p}' got {arr.shape[0]} per-model values, but it takes "
                        "one value per leaf; give a number (or Gradient/Rules for values that vary by leaf).")
                if num_models is not None and arr.shape[0] != num_models:
                    raise MergeInputError(
                        f"hyperparameter {lab} at leaf '{p}' has {arr.shape[0]} per-model values "
                        f"but {num_models} models are merged; give exactly one value per model.")
            per_leaf[i][name] = arr
        usage.check(lab, paths)
    return per_leaf
