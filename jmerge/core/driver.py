"""The merge algebra: per-leaf merge state, composable transforms, and the merge driver.

A merge works leaf by leaf. For each leaf it builds a :class:`MergeState` holding the stacked task
vectors ``tau`` (shape ``(T, *leaf.shape)``, float32), the base leaf in float32, a PRNG key derived
from the seed and the leaf path, and the per-leaf hyperparameters. A :class:`Transform` maps a state
to a state (sparsify ``tau``, elect signs, aggregate into ``merged``, scale ...); :func:`chain`
composes transforms like ``optax.chain``. The merged leaf is ``base + merged`` cast to the base dtype.

Transforms that need whole-model statistics (TIES with global top-k, as in the paper) declare
:class:`StatsPhase` objects: each phase collects a small per-leaf statistic, a host-side finalizer
turns the statistics of all leaves into one value per leaf, and the update reads it from
``state.stats``. Whole-tree and tensor-at-a-time merges run the same per-leaf code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from .hparams import resolve_hparams
from .tree import MergeInputError, check_compatible, leaf_key, leaves_with_paths

__all__ = [
    "MergeState",
    "Transform",
    "StatsPhase",
    "transform",
    "chain",
    "merge",
    "merge_leaf",
    "prepare_leaf_hparams",
    "task_vectors",
    "apply_delta",
    "trace_count",
    "model_sum",
    "model_mean",
    "model_max",
]

HParams = Mapping[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MergeState:
    """Per-leaf state threaded through a chain of transforms.

    Attributes:
      tau: ``(T, *shape)`` float32 task vectors (after any sparsification so far).
      base: ``(*shape)`` float32 base parameters.
      merged: ``(*shape)`` float32 merged task vector, or None before aggregation.
      key: PRNG key of this leaf (from the seed and the leaf path).
      stats: whole-model statistics from stats phases, by phase name.
      extras: named per-leaf outputs (masks, rescalers ...) returned with ``return_extras=True``.
      source: ``(tau, base_leaf, model_leaves)`` as given to the merge while ``tau`` is still the
        stack of ``model - base`` it was built as (else None); see :meth:`tau_rebuild`.
    """

    tau: jax.Array
    base: jax.Array
    merged: jax.Array | None
    key: jax.Array
    stats: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)
    source: tuple | None = None

    @property
    def num_models(self) -> int:
        return self.tau.shape[0]

    def tau_rebuild(self):
        """When ``tau`` is still ``models - base`` as built: ``guard -> [tau[0], ..., tau[T-1]]``,
        the rows recomputed from the original leaves, each leaf wrapped in ``guard``; else None.
        A step that reads ``tau`` in a loop recomputes it this way instead of materializing it
        (see :func:`jmerge._select.topk_keep_rows`)."""
        if self.source is None or self.source[0] is not self.tau:
            return None
        _, base_leaf, model_leaves = self.source
        return lambda guard: _diff_rows(base_leaf, model_leaves, guard)

    def models(self) -> jax.Array:
        """The fine-tuned leaves ``base + tau`` as a ``(T, *shape)`` float32 array."""
        return self.base[None] + self.tau

    def replace(self, **kw) -> "MergeState":
        return dataclasses.replace(self, **kw)


class StatsPhase(NamedTuple):
    """A whole-model statistic for transforms that are not leaf-local (e.g. global top-k).

    ``collect(state, hp) -> pytree`` runs per leaf under jit; ``finalize(list_of_collected,
    list_of_host_hparams) -> list_per_leaf`` runs on the host once over all leaves; the update then
    finds its leaf's value in ``state.stats[name]``.
    """

    name: str
    collect: Callable[[MergeState, HParams], Any]
    finalize: Callable[[list, list], list]


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
    """One merge step (or a chain of steps) over a single leaf.

    Two transforms are equal when they run the same code with the same static configuration;
    the default hyperparameter values are not part of identity, so rebuilding ``ties(density=0.3)``
    with another density reuses the compiled merge.

    Attributes:
      name: short name for messages.
      update: ``update(state, hp, **static) -> state``; pure and jittable.
      hparams: default hyperparameter specs (traced values), by name.
      static: static configuration passed to ``update`` as keyword arguments (hashable values).
      ranges: allowed closed ranges ``(lo, hi)`` of hyperparameters, checked before merging.
      min_models / max_models: how many fine-tuned models the step accepts.
      stats: whole-model statistics this step needs.
      steps: for a chain, its flattened steps (then ``update`` is unused).
      materialize_tau: performance hint of steps that read the task vectors many times and cannot
        rebuild them with :meth:`MergeState.tau_rebuild` (breadcrumbs' two selections): build
        ``tau`` once into its own buffer, instead of letting XLA fuse its computation from the
        models into each reader.
    """

    name: str
    update: Callable[..., MergeState] | None = None
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    static: tuple = ()
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    stats: tuple[StatsPhase, ...] = ()
    steps: tuple["Transform", ...] = ()
    materialize_tau: bool = False

    def _identity(self):
        if self.steps:
            return ("chain", tuple(s._identity() for s in self.steps))
        return (self.update, self.static, tuple(p.name for p in self.stats))

    def __eq__(self, other):
        return isinstance(other, Transform) and self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    @property
    def flat_steps(self) -> tuple["Transform", ...]:
        return self.steps if self.steps else (self,)

    def __call__(self, state: MergeState, hp: HParams) -> MergeState:
        return _run_steps(self.flat_steps, state, hp)

    def with_hparams(self, **hparams) -> "Transform":
        """A copy with other default hyperparameter values (same identity: no recompile)."""
        return dataclasses.replace(self, hparams={**self.hparams, **hparams})


def transform(name: str, update: Callable[..., MergeState], *, hparams: Mapping[str, Any] | None = None,
              static: Mapping[str, Any] | None = None, ranges: Mapping[str, tuple[float, float]] | None = None,
              min_models: int = 1, max_models: int | None = None,
              stats: Sequence[StatsPhase] = (), materialize_tau: bool = False) -> Transform:
    """Build a :class:`Transform` from a module-level ``update(state, hp, **static)`` function."""
    return Transform(name=name, update=update, hparams=dict(hparams or {}),
                     static=tuple(sorted((static or {}).items())), ranges=dict(ranges or {}),
                     min_models=min_models, max_models=max_models, stats=tuple(stats),
                     materialize_tau=materialize_tau)


def chain(*transforms: Transform, name: str | None = None) -> Transform:
    """Compose transforms left to right, like ``optax.chain``.

    Hyperparameters share one namespace: steps that read ``density`` read the same value.
    """
    steps: list[Transform] = []
    hparams: dict[str, Any] = {}
    ranges: dict[str, tuple[float, float]] = {}
    min_models, max_models = 1, None
    for t in transforms:
        steps.extend(t.flat_steps)
        hparams.update(t.hparams)
        ranges.update(t.ranges)
        min_models = max(min_models, t.min_models)
        if t.max_models is not None:
            max_models = t.max_models if max_models is None else min(max_models, t.max_models)
    return Transform(name=name or "+".join(t.name for t in transforms), hparams=hparams, ranges=ranges,
                     min_models=min_models, max_models=max_models, steps=tuple(steps))


# --------------------------------------------------------------------------------------------
# Reductions over the model axis

def _unrolled(op, x, keepdims: bool):
    x = jnp.asarray(x)
    out = x[0]
    for i in range(1, x.shape[0]):
        out = op(out, x[i])
    return out[None] if keepdims else out


def model_sum(x, keepdims: bool = False):
    """Sum over the leading (model) axis, unrolled over its static size.

    Use this, not ``jnp.sum(x, axis=0)``, for per-entry reductions over tasks: on XLA:CPU an
    add-reduction over the leading axis of a large leaf is pathologically slow (measured with
    jax 0.10.2: 40-85 s for a (3, 5632, 2048) float32 array, against 0.05 s unrolled).
    """
    return _unrolled(jnp.add, x, keepdims)


def model_mean(x, keepdims: bool = False):
    """Mean over the leading (model) axis (see :func:`model_sum`)."""
    return model_sum(x, keepdims) / jnp.asarray(x).shape[0]


def model_max(x, keepdims: bool = False):
    """Maximum over the leading (model) axis, unrolled (see :func:`model_sum`)."""
    return _unrolled(jnp.maximum, x, keepdims)


# --------------------------------------------------------------------------------------------
# Task vectors

def task_vectors(base: Any, models: Sequence[Any]) -> Any:
    """Stacked task vectors ``tau_t = theta_t - theta_0``: each leaf has shape ``(T, *leaf.shape)``.

    Computed in float32 whatever the input dtypes (bf16/fp16 differences are exact in float32).
    """
    check_compatible(base, models)
    return jax.tree.map(lambda b, *ms: _stack_diffs(jnp.asarray(b, jnp.float32), ms), base, *models)


def _materialized(fn, probe: jax.Array) -> jax.Array:
    """``fn()`` computed into a buffer of its own: the result of a conditional, which XLA cannot fuse
    into its consumers (``optimization_barrier`` does not survive XLA:CPU's pipeline). The
    predicate is always true but traced (``p == p`` or ``p`` is NaN, ``p`` the first entry of
    ``probe``); the other branch never runs."""
    p = jnp.reshape(probe, (-1,))[:1]
    p = jnp.all(p == p) | jnp.all(p != p)
    out = jax.eval_shape(fn)
    return lax.cond(p, fn, lambda: jnp.zeros(out.shape, out.dtype))


def _diff_rows(base_leaf, model_leaves, guard=lambda a: a) -> list:
    """The rows of ``tau``: ``float32(model_t) - float32(base)``, each input passed through ``guard``."""
    b = jnp.asarray(guard(base_leaf), jnp.float32)
    return [jnp.asarray(guard(m), jnp.float32) - b for m in model_leaves]


def _stack_diffs(b: jax.Array, ms) -> jax.Array:
    # Differences first, then the stack: XLA builds tau in one fusion instead of materializing the
    # stacked models (a second full-size buffer) and subtracting later.
    return jnp.stack(_diff_rows(b, ms))


def apply_delta(base: Any, delta: Any, scale: float | jax.Array = 1.0) -> Any:
    """``base + scale * delta`` computed in float32, returned in each base leaf's dtype."""
    return jax.tree.map(lambda b, d: (jnp.asarray(b, jnp.float32) + scale * jnp.asarray(d, jnp.float32))
                        .astype(jnp.asarray(b).dtype), base, delta)


# --------------------------------------------------------------------------------------------
# The driver

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times the jitted merge has been traced (for tests of 'jit once, run many')."""
    return _TRACES["count"]


def _initial_state(base_leaf, model_leaves, key, stacked: bool, steps=()) -> MergeState:
    b = jnp.asarray(base_leaf, jnp.float32)
    source = None
    if stacked:
        tau = jnp.asarray(model_leaves, jnp.float32)
    elif any(s.materialize_tau for s in steps) and b.size:
        tau = _materialized(lambda: _stack_diffs(b, model_leaves), b)
    else:
        tau = _stack_diffs(b, model_leaves)
        source = (tau, base_leaf, tuple(model_leaves))
    return MergeState(tau=tau, base=b, merged=None, key=key, source=source)


def _run_steps(steps, state, hp):
    for s in steps:
        state = s.update(state, hp, **dict(s.static))
    return state


def _finish(method_name: str, state: MergeState, base_leaf, out_dtype):
    if state.merged is None:
        raise MergeInputError(
            f"method '{method_name}' produces no merged value: end the chain with an "
            "aggregation step (weighted_sum, disjoint_merge, ...)."
        )
    dt = jnp.dtype(out_dtype) if out_dtype is not None else jnp.asarray(base_leaf).dtype
    return (state.base + state.merged).astype(dt)


def _stats_positions(method: Transform):
    return [(i, p) for i, s in enumerate(method.flat_steps) for p in s.stats]


def _collect_fn(method: Transform, step_index: int, phase: StatsPhase, stacked: bool):
    steps = method.flat_steps[:step_index]

    def f(base_leaf, model_leaves, hp, key, stats):
        state = _initial_state(base_leaf, model_leaves, key, stacked, steps).replace(stats=stats)
        state = _run_steps(steps, state, hp)
        return phase.collect(state, hp)

    return f


# Paths are not part of the compile key: leaves of equal shape and dtype share one executable.
@functools.partial(jax.jit, static_argnames=("method", "stacked", "out_dtype", "return_extras"))
def _leaf_jit(method, base_leaf, model_leaves, hp, key, stats, *, stacked, out_dtype, return_extras):
    _TRACES["count"] += 1
    return _leaf_impl(method, base_leaf, model_leaves, hp, key, stats, stacked=stacked, out_dtype=out_dtype,
                      return_extras=return_extras)


def _leaf_impl(method, base_leaf, model_leaves, hp, key, stats, *, stacked, out_dtype, return_extras):
    state = _initial_state(base_leaf, model_leaves, key, stacked, method.flat_steps).replace(stats=stats)
    state = _run_steps(method.flat_steps, state, hp)
    out = _finish(method.name, state, base_leaf, out_dtype)
    return (out, state.extras) if return_extras else out


_collect_jit_cache: dict = {}


def _collect(method, step_index, phase, base_leaf, model_leaves, hp, key, stats, stacked, traced):
    f = _collect_fn(method, step_index, phase, stacked)
    if traced:
        return f(base_leaf, model_leaves, hp, key, stats)
    ck = (method, step_index, phase.name, stacked)
    if ck not in _collect_jit_cache:
        _collect_jit_cache[ck] = jax.jit(f)
    return _collect_jit_cache[ck](base_leaf, model_leaves, hp, key, stats)


def _is_traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def _check_ranges(method: Transform, paths, hp_leaves):
    for name, (lo, hi) in method.ranges.items():
        for p, hp in zip(paths, hp_leaves):
            if name not in hp:
                continue
            v = hp[name]
            if isinstance(v, jax.core.Tracer):
                continue
            a = np.asarray(v)
            if a.size and (np.any(a < lo) or np.any(a > hi) or not np.all(np.isfinite(a))):
                raise MergeInputError(
                    f"hyperparameter '{name}' = {a.tolist()} at leaf '{p}' is outside [{lo}, {hi}] "
                    f"allowed by '{method.name}'."
                )


def prepare_leaf_hparams(method: Transform, base: Any, num_models: int, hparams: Mapping[str, Any] | None = None,
                         num_layers: int | None = None) -> list[dict[str, Any]]:
    """Resolve ``method``'s defaults overridden by ``hparams`` into one dict per leaf of ``base``."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(method.hparams))
    if unknown:
        raise MergeInputError(
            f"method '{method.name}' has no hyperparameter(s) {unknown}; it takes {sorted(method.hparams)}."
        )
    specs = {**method.hparams, **hparams}
    traced = {k: v for k, v in specs.items() if isinstance(v, jax.Array) and v.ndim <= 1}
    host = {k: v for k, v in specs.items() if k not in traced}
    per_leaf = resolve_hparams(host, base, num_layers=num_layers, num_models=num_models)
    for d in per_leaf:
        for k, v in traced.items():
            d[k] = jnp.asarray(v, jnp.float32)
    return per_leaf


def merge(method: Transform, base: Any, models: Sequence[Any] | None = None, *, task_vectors: Any = None,
          hparams: Mapping[str, Any] | None = None, seed: int = 0, out_dtype: Any = None,
          return_extras: bool = False, check_finite: bool = False, num_layers: int | None = None):
    """Merge fine-tuned models into the base with ``method``.

    Works on any pytree (nested dicts, Flax linen params, Flax NNX ``State``). Outside ``jax.jit``
    every leaf runs through one compiled per-leaf function (compiled once per leaf shape and dtype),
    with hyperparameters passed as arguments: new values do not recompile. Inside a user's
    ``jax.jit`` the same code is traced inline.

    Args:
      method: a :class:`Transform`, e.g. ``jmerge.ties(density=0.2)``.
      base: base (pretrained) params.
      models: fine-tuned params, each with the base's structure. Give this or ``task_vectors``.
      task_vectors: stacked task vectors (leaves ``(T, *shape)``), e.g. from :func:`task_vectors`.
      hparams: overrides of the method's hyperparameters: numbers, per-layer lists, ``Rules``,
        ``PerModel``, pytrees or jax arrays (see :mod:`jmerge._hparams`).
      seed: seed of random methods; each leaf's key is derived from it and the leaf path.
      out_dtype: dtype of the merged leaves (default: the base's).
      return_extras: also return a pytree of per-leaf extras (masks, rescalers ...) when the
        method produces them.
      check_finite: reject NaN/Inf in the inputs (costs a device sync per leaf).
      num_layers: layer count for per-layer gradients (default: inferred from paths).

    Returns:
      The merged params pytree (and the extras pytree when ``return_extras``).

    Raises:
      MergeInputError: for mismatched trees, shapes, bad hyperparameters or too few models.
    """
    if (models is None) == (task_vectors is None):
        raise MergeInputError("give exactly one of `models` (fine-tuned params) or `task_vectors`.")
    stacked = task_vectors is not None
    if stacked:
        paths, tv_leaves, _ = leaves_with_paths(task_vectors)
        bpaths, base_leaves, treedef = leaves_with_paths(base)
        if len(tv_leaves) != len(base_leaves) or treedef != jax.tree.structure(task_vectors):
            raise MergeInputError("task_vectors must have the base's tree structure (leaves shaped (T, *shape)).")
        for p, b, t in zip(bpaths, base_leaves, tv_leaves):
            if tuple(np.shape(t))[1:] != tuple(np.shape(b)):
                raise MergeInputError(f"leaf '{p}': task vectors have shape {tuple(np.shape(t))}, expected "
                                      f"(T, *{tuple(np.shape(b))}).")
        T = int(np.shape(tv_leaves[0])[0]) if tv_leaves else 0
        per_leaf_models = tv_leaves
    else:
        models = list(models)
        check_compatible(base, models, check_finite=check_finite)
        bpaths, base_leaves, treedef = leaves_with_paths(base)
        T = len(models)
        model_leaves = [leaves_with_paths(m)[1] for m in models]
        per_leaf_models = [tuple(ml[i] for ml in model_leaves) for i in range(len(base_leaves))]
    if T < method.min_models:
        raise MergeInputError(f"method '{method.name}' needs at least {method.min_models} fine-tuned model(s) "
                              f"besides the base; got {T}.")
    if method.max_models is not None and T > method.max_models:
        raise MergeInputError(f"method '{method.name}' merges at most {method.max_models} fine-tuned model(s) "
                              f"with the base; got {T}.")
    hp_leaves = prepare_leaf_hparams(method, base, T, hparams, num_layers)
    _check_ranges(method, bpaths, hp_leaves)
    traced = _is_traced(base, per_leaf_models, hp_leaves) or isinstance(seed, jax.core.Tracer)
    keys = [leaf_key(seed, p) for p in bpaths]

    # Whole-model statistics (only for non-leaf-local steps such as global top-k).
    stats_leaves: list[dict] = [dict() for _ in bpaths]
    for step_index, phase in _stats_positions(method):
        collected = [_collect(method, step_index, phase, b, m, hp, k, st, stacked, traced)
                     for b, m, hp, k, st in zip(base_leaves, per_leaf_models, hp_leaves, keys, stats_leaves)]
        finals = phase.finalize(collected, hp_leaves)
        for st, v in zip(stats_leaves, finals):
            st[phase.name] = v

    outs, extras = [], []
    kw = dict(stacked=stacked, out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
              return_extras=return_extras)
    for b, m, hp, k, st in zip(base_leaves, per_leaf_models, hp_leaves, keys, stats_leaves):
        if traced:
            r = _leaf_impl(method, b, m, hp, k, st, **kw)
        else:
            r = _leaf_jit(method, b, m, hp, k, st, **kw)
        if return_extras:
            outs.append(r[0])
            extras.append(r[1])
        else:
            outs.append(r)
    merged = jax.tree.unflatten(treedef, outs)
    if return_extras:
        return merged, jax.tree.unflatten(treedef, extras)
    return merged


def merge_leaf(method: Transform, base_leaf, model_leaves, *, hp: Mapping[str, Any], path: str, seed: int = 0,
               stats: Mapping[str, Any] | None = None, stacked: bool = False, out_dtype=None,
               return_extras: bool = False):
    """Merge one tensor (out-of-core use): the same compiled code that :func:`merge` runs per leaf.

    ``hp`` is this leaf's resolved hyperparameters (see :func:`prepare_leaf_hparams`); ``path``
    gives the leaf's PRNG key, so the result equals the whole-tree merge's for that leaf.
    """
    key = leaf_key(seed, path)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    return _leaf_jit(method, base_leaf, tuple(model_leaves) if not stacked else model_leaves, hp, key,
                     dict(stats or {}), stacked=stacked,
                     out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
                     return_extras=return_extras)
