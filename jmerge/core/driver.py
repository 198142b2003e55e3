"""The merge driver: per-leaf programs, whole-tree merges, tensor-at-a-time merges.

A merge works leaf by leaf. For each floating-point leaf it builds a :class:`MergeState` holding the
stacked task vectors ``tau`` (shape ``(T, *leaf.shape)``, float32), the base leaf in float32, a PRNG
key derived from the seed and the leaf path, the leaf's matrix view and its hyperparameters, and
runs the method's steps; the merged leaf is ``base + merged`` cast to the base dtype. Integer,
boolean and PRNG-key leaves are taken from the base.

Compute dtype. By default the merge computes in float32 (bf16/fp16 inputs are exact in float32).
``compute_dtype="bfloat16"`` or ``"float16"`` gives the numbers of a merge computed in that dtype, as
mergekit computes with its config's ``dtype``: the inputs are rounded to it, and so are the task
vectors, each intermediate of the steps (:meth:`MergeState.rounded`) and ``base + merged``. This is an
emulation (float32 arithmetic rounded to the dtype after each operation, as torch's CPU kernels compute
half-precision operations; reductions accumulate in float32 and round once). float64 is refused.

:class:`LeafProgram` is the one per-leaf program: :func:`merge` runs it over a pytree, and the
out-of-core executor (``jmerge.pipeline``) runs it tensor by tensor, so both give the same numbers.
Outside ``jax.jit`` it is compiled once per leaf shape, dtype and view (hyperparameter values are
arguments), and leaves that are not sharded select their top-k by a whole sort up to
:data:`EAGER_SORT_LIMIT` entries per row (the same masks, a program that compiles faster); inside a
user's ``jax.jit`` the leaves of one shape share one traced body (``lax.map`` over the stacked group), so
compile time follows the number of distinct shapes.

Steps that need whole-model statistics (TIES with global top-k, as in the paper) declare
:class:`StatsPhase` objects: each phase collects a small per-leaf statistic, a host-side finalizer
turns the statistics of all leaves into one value per leaf, and the step reads it from
``state.stats``.

References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); Yadav et al.,
"TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .errors import MergeInputError, NonFloatLeavesWarning, OptimizerStateWarning
from .hparams import Gradient, PerModel, Rules, resolve_hparams
from .state import MergeState, compute_precision, diff_stack, round_to, stack_diffs
from .transform import StatsPhase, Transform, run_steps, _check_part
from .tree import (check_compatible, check_task_vectors, leaf_key, leaf_kind, leaves_with_paths,
                   optimizer_state_paths)
from .select import sharded_leaf, sort_limit_in_effect, whole_sort_limit
from .streams import iter_eqns, leaf_stream
from .views import MatrixView, infer_views
from .xla import fast_compile_options, materialized

__all__ = ["LeafProgram", "merge", "merge_leaf", "prepare_leaf_hparams", "check_ranges", "task_vectors",
           "apply_delta", "trace_count", "check_method", "count_eqns", "GROUP_MIN_EQNS"]

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times the jitted per-leaf merge has been traced (for tests of 'jit once, run many').

    References: none (infrastructure).
    """
    return _TRACES["count"]


def check_method(method: Any, where: str = "merge") -> Transform:
    """``method`` if it is a :class:`Transform`; else a :class:`MergeInputError` saying the fix
    (an uncalled factory such as ``jmerge.ties`` gets "call it: jmerge.ties(...)").

    References: none (infrastructure).
    """
    _check_part(method, f"{where}: method")
    return method


# --------------------------------------------------------------------------------------------
# Hyperparameters


def _paths_of(tree_or_paths) -> tuple[list[str], Any]:
    if isinstance(tree_or_paths, (list, tuple)) and all(isinstance(p, str) for p in tree_or_paths):
        return list(tree_or_paths), None
    paths, _, treedef = leaves_with_paths(tree_or_paths)
    return paths, treedef


def prepare_leaf_hparams(method: Transform, tree_or_paths: Any, num_models: int,
                         hparams: Mapping[str, Any] | None = None, num_layers: int | None = None,
                         ) -> list[dict[str, Any]]:
    """Resolve ``method``'s defaults, overridden by ``hparams``, into one dict per leaf.

    Args:
      method: the merge method.
      tree_or_paths: the params pytree (its paths and structure are used) or a list of leaf paths.
      num_models: number of fine-tuned models (per-model values must have this length).
      hparams: overrides by public name (``"density"``) or qualified name (``"trim.density"``).
      num_layers: layer count for per-layer gradients (default: inferred from the paths).

    Returns:
      One ``{qualified name: float32 value}`` dict per leaf.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for the hyperparameter specs.
    """
    method = check_method(method, "prepare_leaf_hparams")
    paths, treedef = _paths_of(tree_or_paths)
    specs = method.bind(hparams)
    return resolve_hparams(specs, paths, treedef=treedef, num_layers=num_layers, num_models=num_models,
                           per_model=method.accepts_per_model, labels=method.labels)


def check_ranges(method: Transform, paths: Sequence[str], hp_leaves: Sequence[Mapping[str, Any]]) -> None:
    """Check host (non-traced) hyperparameter values against the steps' ranges.

    Raises:
      MergeInputError: naming the hyperparameter, its step, the leaf and the allowed range.

    References: none (infrastructure).
    """
    ranges = {f"{n}.{k}": r for n, s in method.steps for k, r in s.ranges.items()}
    for q, (lo, hi) in ranges.items():
        for p, hp in zip(paths, hp_leaves):
            v = hp.get(q)
            if v is None or isinstance(v, jax.core.Tracer):
                continue
            a = np.asarray(v)
            if a.size and (np.any(a < lo) or np.any(a > hi) or not np.all(np.isfinite(a))):
                raise MergeInputError(f"hyperparameter {method.label(q)} = {a.tolist()} at leaf '{p}' is "
                                      f"outside [{lo}, {hi}]; give a value in that range.")


def _spec_tracers(spec, out: list) -> None:
    if isinstance(spec, jax.core.Tracer):
        out.append(spec)
    elif isinstance(spec, PerModel):
        _spec_tracers(spec.specs if isinstance(spec.specs, jax.Array) else list(spec.specs), out)
    elif isinstance(spec, Gradient):
        _spec_tracers(list(spec.values), out)
    elif isinstance(spec, Rules):
        _spec_tracers([v for _, v in spec.rules] + [spec.default], out)
    elif isinstance(spec, Mapping):
        _spec_tracers(list(spec.values()), out)
    elif isinstance(spec, (list, tuple)):
        for s in spec:
            _spec_tracers(s, out)


def _traced_range_check(method: Transform, specs: Mapping[str, Any]) -> None:
    """One host callback checking every traced hyperparameter value against its range: an
    out-of-range value raises (as a ``JaxRuntimeError`` naming it) when the merge runs."""
    ranges = {f"{n}.{k}": r for n, s in method.steps for k, r in s.ranges.items()}
    items = []
    for q, spec in specs.items():
        if q in ranges:
            found: list = []
            _spec_tracers(spec, found)
            items += [(q, ranges[q], t) for t in found]
    if not items:
        return

    def check(*vals):
        for (q, (lo, hi), _), v in zip(items, vals):
            a = np.asarray(v, np.float64)
            if a.size and (np.any(a < lo) or np.any(a > hi) or not np.all(np.isfinite(a))):
                raise MergeInputError(f"hyperparameter {method.label(q)} = {a.tolist()} is outside "
                                      f"[{lo}, {hi}] (a traced value, checked when the merge ran).")

    jax.debug.callback(check, *[t for _, _, t in items])


# --------------------------------------------------------------------------------------------
# The per-leaf program


def _initial_state(base_leaf, model_leaves, key, stacked: bool | str, materialize: bool, view,
                   precision: str | None = None, offset: Any = None, whole: int | None = None) -> MergeState:
    b = round_to(base_leaf, precision)
    if stacked == "models":  # the models in one (T, *shape) array: tau is elementwise in it (fused, not stacked)
        rows = tuple(model_leaves[t] for t in range(model_leaves.shape[0]))
        make = lambda: diff_stack(base_leaf, model_leaves, precision)
        tau = materialized(make, b) if materialize and b.size else make()
        return MergeState(tau=tau, base=b, merged=None, key=key, source=(tau, base_leaf, rows), view=view,
                          precision=precision, offset=offset, whole=whole)
    if stacked:
        tau = round_to(model_leaves, precision)
        return MergeState(tau=tau, base=b, merged=None, key=key, source=(tau, None, None), view=view,
                          precision=precision, offset=offset, whole=whole)
    if materialize and b.size:
        tau = materialized(lambda: stack_diffs(b, model_leaves, precision), b)
    else:
        tau = stack_diffs(b, model_leaves, precision)
    return MergeState(tau=tau, base=b, merged=None, key=key, source=(tau, base_leaf, tuple(model_leaves)), view=view,
                      precision=precision, offset=offset, whole=whole)


def _finish(method: Transform, state: MergeState, base_leaf, out_dtype):
    if state.merged is None:
        raise MergeInputError(f"method '{method.name}' produces no merged value: end the chain with an aggregation "
                              "step (weighted_sum, disjoint_merge, ...).")
    dt = jnp.dtype(out_dtype) if out_dtype is not None else jnp.asarray(base_leaf).dtype
    return state.rounded(state.base + state.merged).astype(dt)


def _leaf_impl(method, base_leaf, model_leaves, hp, key, stats, *, stacked, out_dtype, return_extras, view,
               precision=None, offset=None, whole=None):
    state = _initial_state(base_leaf, model_leaves, key, stacked, method.materialize_tau, view, precision, offset,
                           whole)
    if not return_extras:
        out = _fused_leaf(method, state, hp, stats, base_leaf=base_leaf, model_leaves=model_leaves, stacked=stacked,
                          out_dtype=out_dtype)
        if out is not None:
            return out
    state = run_steps(method.steps, state, hp, stats)
    out = _finish(method, state, base_leaf, out_dtype)
    return (out, state.extras) if return_extras else out


def _fused_leaf(method, state, hp, stats, **inputs):
    """A step whose update offers ``fuse_chain(method, state, hp, stats, **inputs)`` may compute the whole
    leaf (the TIES family's single fused pass on GPU/TPU, ``jmerge.methods.ties_fused``); it returns None to
    decline, and the steps run. The core imports no method: the offer is an attribute of the update."""
    for _, s in method.steps:
        fuse = getattr(s.update, "fuse_chain", None)
        if fuse is not None:
            return fuse(method, state, hp, stats, **inputs)
    return None


# Paths are not part of the compile key: leaves of equal shape, dtype and view share one executable.
_LEAF_STATIC = ("method", "stacked", "out_dtype", "return_extras", "view", "precision", "sort_limit", "whole", "sharded")
_COLLECT_STATIC = ("method", "index", "stacked", "view", "precision", "sort_limit", "whole", "sharded")


@contextlib.contextmanager
def _limit(sort_limit, sharded: bool = False):
    with contextlib.ExitStack() as stack:
        if sort_limit is not None:
            stack.enter_context(whole_sort_limit(sort_limit))
        if sharded:
            stack.enter_context(sharded_leaf())
        yield


def _leaf_program(method, base_leaf, model_leaves, hp, key, stats, *, stacked, out_dtype, return_extras, view,
                  precision=None, sort_limit=None, offset=None, whole=None, sharded=False):
    _TRACES["count"] += 1
    with _limit(sort_limit, sharded):
        return _leaf_impl(method, base_leaf, model_leaves, hp, key, stats, stacked=stacked, out_dtype=out_dtype,
                          return_extras=return_extras, view=view, precision=precision, offset=offset, whole=whole)


_leaf_jit = jax.jit(_leaf_program, static_argnames=_LEAF_STATIC)


def _collect_impl(method, index, base_leaf, model_leaves, hp, key, stats, *, stacked, view, precision=None,
                  sort_limit=None, offset=None, whole=None, sharded=False):
    si, sname, phase = method.stats[index]
    with _limit(sort_limit, sharded):
        state = _initial_state(base_leaf, model_leaves, key, stacked, method.materialize_tau, view, precision, offset,
                               whole)
        state = run_steps(method.steps[:si], state, hp, stats)
        return phase.collect(state.replace(stats=dict(stats.get(sname, {}))),
                             method.steps[si][1].own_hparams(sname, hp))


_collect_jit = jax.jit(_collect_impl, static_argnames=_COLLECT_STATIC)


@functools.cache
def _fast_jits() -> tuple:
    """``(leaf, collect)`` jitted with :func:`~jmerge.core.xla.fast_compile_options` (XLA workaround 9: less
    compile time, the same outputs, slower kernels), or ``(_leaf_jit, _collect_jit)`` where there are none."""
    opts = fast_compile_options()
    if not opts:
        return _leaf_jit, _collect_jit
    return (jax.jit(_leaf_program, static_argnames=_LEAF_STATIC, compiler_options=opts),
            jax.jit(_collect_impl, static_argnames=_COLLECT_STATIC, compiler_options=opts))


_PROGRAM = object()  # "the program's own compute dtype" (a call's default)


def _dispatch(which: int, args: tuple, kwargs: dict, inputs: tuple, traced: bool, fast_compile: bool,
              sort_limit: int | str | None) -> Any:
    """Run the leaf program (``which`` 0) or a phase's collection (1) on ``args``: inline inside a trace, else
    jitted (with the fast-compile options when asked), with the leaf's sort limit, on the execution stream
    :func:`~jmerge.core.streams.leaf_stream` picks for it. ``inputs``: the leaf's ``(base_leaf, model_leaves)``."""
    if traced:
        return (_leaf_impl, _collect_impl)[which](*args, **kwargs)
    f = _fast_jits()[which] if fast_compile else (_leaf_jit, _collect_jit)[which]
    sharded = _sharded(*inputs)
    kwargs = dict(kwargs, sort_limit=_resolve_sort_limit(sort_limit, *inputs, sharded=sharded), sharded=sharded)
    with leaf_stream(f, args, kwargs, inputs):
        return f(*args, **kwargs)


def _offset_kwargs(offset: tuple[int, int] | None, traced: bool) -> dict:
    """The program's ``offset`` (traced uint32) and ``whole`` (static) keywords for a block at ``(start, entries)``."""
    if offset is None:
        return {}
    start, whole = offset
    return {"offset": jnp.asarray(start, jnp.uint32) if traced else np.uint32(start), "whole": int(whole)}


class LeafProgram:
    """A merge method ready to run one leaf at a time: the code :func:`merge` runs per leaf and the
    out-of-core executor runs per tensor.

    Args:
      method: the merge method.
      stacked: inputs are stacked task vectors ``(T, *shape)`` instead of model leaves.
      out_dtype: dtype of the merged leaves (default: each base leaf's).
      return_extras: also return each leaf's extras (masks, rescalers ...).
      compute_dtype: None or ``"float32"`` (default: exact float32 arithmetic), or ``"bfloat16"`` /
        ``"float16"``: the numbers of a merge computed in that dtype (see the module docstring);
        float64 raises :class:`MergeInputError`.

    Each call takes one leaf's ``base_leaf``, ``model_leaves`` (a tuple, or the stacked task vectors),
    ``hp`` (its resolved hyperparameters by qualified name, from :func:`prepare_leaf_hparams`),
    ``key`` (:func:`jmerge.leaf_key`), ``stats`` (``{step name: {phase name: value}}``) and ``view``
    (:class:`MatrixView` or None). ``traced=True`` runs inline (inside the caller's trace).
    ``models_stacked=True`` on a call (not with ``stacked``): ``model_leaves`` is the models stacked
    in one ``(T, *shape)`` array (same numbers; the task vectors are then an elementwise expression of
    one input, which XLA fuses into their consumers: the out-of-core executor reads the models of a
    tensor into one buffer).
    ``compute_dtype=`` on a call overrides the program's (the pipeline picks it per tensor).
    ``fast_compile=True`` on a call: compile with XLA:CPU options that cut compile time (TIES ~40%) for
    bit-identical outputs and kernels up to ~25% slower (:func:`jmerge.core.xla.fast_compile_options`;
    nothing changes on other backends or where XLA lacks them, e.g. JAX 0.12); the pipeline sets it for
    programs of little total work.
    ``sort_limit=n`` on a call (not traced): rows of at most ``n`` entries select their top-k by a whole
    sort (:func:`jmerge.core.select.whole_sort_limit`; the same masks); for leaves that are not sharded.
    ``sort_limit="auto"``: :data:`EAGER_SORT_LIMIT` when the call's arrays are not sharded and no enclosing
    ``whole_sort_limit`` is set (what :func:`merge` and the out-of-core executor pass), else the default.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """

    def __init__(self, method: Transform, *, stacked: bool = False, out_dtype: Any = None,
                 return_extras: bool = False, compute_dtype: Any = None):
        self.method = check_method(method, "LeafProgram")
        self.stacked = bool(stacked)
        self.out_dtype = None if out_dtype is None else jnp.dtype(out_dtype).name
        self.return_extras = bool(return_extras)
        self.precision = compute_precision(compute_dtype)

    def _precision(self, compute_dtype: Any) -> str | None:
        return self.precision if compute_dtype is _PROGRAM else compute_precision(compute_dtype)

    @property
    def phases(self) -> tuple[tuple[int, str, StatsPhase], ...]:
        """``(step index, step name, StatsPhase)`` of the method's whole-model statistics, in order."""
        return self.method.stats

    def collect(self, index: int, base_leaf: Shaped[ArrayLike, "*shape"],
                model_leaves: Sequence[Shaped[ArrayLike, "*shape"]] | Float[Array, "T *shape"],
                hp: Mapping[str, Any], key: PRNGKeyArray, stats: Mapping[str, Any], view: MatrixView | None = None,
                *, traced: bool = False, compute_dtype: Any = _PROGRAM, models_stacked: bool = False,
                fast_compile: bool = False, sort_limit: int | str | None = None,
                offset: tuple[int, int] | None = None) -> Any:
        """Phase ``index``'s statistic of one leaf (steps before the phase's step run first); ``offset`` as for a
        call."""
        view = view if self.method.uses_view else None
        args = (self.method, index, base_leaf, model_leaves, hp, key, stats)
        kwargs = dict(stacked=self._stacked(models_stacked), view=view, precision=self._precision(compute_dtype),
                      **_offset_kwargs(offset, traced))
        return _dispatch(1, args, kwargs, (base_leaf, model_leaves), traced, fast_compile, sort_limit)

    def _stacked(self, models_stacked: bool) -> bool | str:
        if models_stacked and self.stacked:
            raise MergeInputError("models_stacked=True needs a program of model leaves (stacked=False).")
        return "models" if models_stacked else self.stacked

    def finalize(self, index: int, collected: list, hps: Sequence[Mapping[str, Any]], *, traced: bool = False) -> list:
        """Phase ``index``'s per-leaf values from every leaf's statistic (on the host, or traced)."""
        _, _, phase = self.method.stats[index]
        return (phase.finalize_traced if traced else phase.finalize)(collected, self._own_hparams(index, hps))

    def skip(self, index: int, stats: Sequence[Mapping[str, Any]], hps: Sequence[Mapping[str, Any]]) -> list | None:
        """Phase ``index``'s per-leaf values without a pass over the inputs, or None when it must run.

        ``stats`` per leaf the statistics finalized so far (``{step name: {phase name: value}}``).
        """
        _, sname, phase = self.method.stats[index]
        if phase.skip is None:
            return None
        return phase.skip([st.get(sname, {}) for st in stats], self._own_hparams(index, hps))

    def _own_hparams(self, index: int, hps: Sequence[Mapping[str, Any]]) -> list:
        """Per leaf the hyperparameters of phase ``index``'s step, by their short names."""
        si, sname, _ = self.method.stats[index]
        return [self.method.steps[si][1].own_hparams(sname, hp) for hp in hps]

    def __call__(self, base_leaf: Shaped[ArrayLike, "*shape"],
                 model_leaves: Sequence[Shaped[ArrayLike, "*shape"]] | Float[Array, "T *shape"],
                 hp: Mapping[str, Any], key: PRNGKeyArray, stats: Mapping[str, Any] | None = None,
                 view: MatrixView | None = None, *, traced: bool = False, out_dtype: Any = None,
                 compute_dtype: Any = _PROGRAM, models_stacked: bool = False, fast_compile: bool = False,
                 sort_limit: int | str | None = None, offset: tuple[int, int] | None = None) -> Any:
        """The merged leaf (and its extras with ``return_extras``); ``out_dtype`` and ``compute_dtype``
        override the program's. ``offset``: ``(start, entries)``, the leaf is a block of a tensor of ``entries``
        entries starting at flat index ``start`` (traced; see :class:`~jmerge.core.state.MergeState`), for methods
        that :func:`~jmerge.core.chunks.entrywise` allows to run on blocks."""
        view = view if self.method.uses_view else None
        dt = self.out_dtype if out_dtype is None else jnp.dtype(out_dtype).name
        args = (self.method, base_leaf, model_leaves, hp, key, stats or {})
        kwargs = dict(stacked=self._stacked(models_stacked), out_dtype=dt, return_extras=self.return_extras, view=view,
                      precision=self._precision(compute_dtype))
        kwargs.update(_offset_kwargs(offset, traced))
        return _dispatch(0, args, kwargs, (base_leaf, model_leaves), traced, fast_compile, sort_limit)


# --------------------------------------------------------------------------------------------
# Whole-tree merges


EAGER_SORT_LIMIT = 8192
"""Outside ``jax.jit``, :func:`merge` selects the top-k of rows of at most this many entries by a whole sort
when the leaf is not sharded (:func:`jmerge.core.select.whole_sort_limit`, unless the caller set a limit):
the same masks as the counting search, whose ``while_loop`` compiles ~5x slower (a TIES leaf program: ~1.5 s
against ~0.33 s; the demo's 68k-parameter model merges cold in 3.5-3.9 s instead of 9.9 s). Once compiled the
sort is slower (TIES, 3 models: 0.65 / 0.37 ms at 4096 entries, 5.3 / 0.8 ms at 32768), hence the cut-off;
inside ``jax.jit`` (compiled once, run many times) the default 2048 holds. Sharded leaves keep the counting
search (a sort would gather them)."""


def _eager_sort_limit(base_leaf, model_leaves, sharded: bool | None = None) -> int | None:
    """:data:`EAGER_SORT_LIMIT` for a leaf whose arrays are all on one device or replicated (host arrays
    included) when no caller set a limit; else None (the default limit)."""
    if sort_limit_in_effect() is not None:
        return None
    if sharded is None:
        sharded = _sharded(base_leaf, model_leaves)
    return None if sharded else EAGER_SORT_LIMIT


def _sharded(base_leaf, model_leaves) -> bool:
    """Whether a leaf's arrays are sharded over several devices (not all on one device or replicated)."""
    return any(getattr(x, "sharding", None) is not None and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves((base_leaf, model_leaves)))


def _resolve_sort_limit(sort_limit, base_leaf, model_leaves, sharded: bool | None = None) -> int | None:
    if sort_limit == "auto":
        return _eager_sort_limit(base_leaf, model_leaves, sharded)
    if sort_limit is not None and (isinstance(sort_limit, str) or int(sort_limit) < 0):
        raise MergeInputError(f"sort_limit={sort_limit!r}: give a non-negative number of entries, 'auto' or None.")
    return sort_limit


def _is_traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def _as_model_list(models: Any, base: Any) -> list:
    if isinstance(models, Mapping) or not isinstance(models, Sequence) or isinstance(models, (str, bytes)):
        kind = type(models).__name__
        raise MergeInputError(f"models must be a list of parameter trees, one per fine-tuned model; got a {kind}. "
                              f"To merge one fine-tuned model, wrap it in a list: merge(method, base, [ft]).")
    models = list(models)
    if models and jax.tree.structure(base) == jax.tree.structure(models) and \
            jax.tree.structure(base) != jax.tree.structure(models[0]):
        raise MergeInputError("models is a single parameter tree shaped like the base, not a list of trees; "
                              "wrap it in a list: merge(method, base, [ft]).")
    return models


def _leaf_policy(paths, base_leaves, per_leaf_models, non_float: str, stacked: bool) -> list[int]:
    """Indices of the leaves to merge; non-float leaves are refused or listed in one warning."""
    if non_float not in ("base", "error"):
        raise MergeInputError(f"non_float={non_float!r}: use 'base' (take such leaves from the base) or 'error'.")
    merge_idx, kept = [], []
    for i, (p, b) in enumerate(zip(paths, base_leaves)):
        k = leaf_kind(b)
        if k == "complex":
            raise MergeInputError(f"leaf '{p}' is complex ({jnp.asarray(b).dtype}); jmerge merges real floating-point "
                                  "leaves only: split it into real and imaginary parts first.")
        if k == "float":
            if not stacked:
                for t, m in enumerate(per_leaf_models[i]):
                    if leaf_kind(m) != "float":
                        raise MergeInputError(f"leaf '{p}': the base is floating-point but model {t} has dtype "
                                              f"{getattr(m, 'dtype', type(m).__name__)}; give every model the base's "
                                              "parameter dtypes (kinds).")
            merge_idx.append(i)
        else:
            kept.append((p, getattr(b, "dtype", type(b).__name__)))
    if kept:
        listed = ", ".join(f"'{p}' ({d})" for p, d in kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        if non_float == "error":
            raise MergeInputError(f"{len(kept)} leaves are not floating-point: {listed}. Drop them from the trees, or "
                                  "pass non_float='base' to take them from the base unchanged.")
        warnings.warn(f"jmerge.merge: {len(kept)} non-float leaves taken from the base unchanged (not merged): "
                      f"{listed}. Pass non_float='error' to refuse such leaves.", NonFloatLeavesWarning, stacklevel=3)
    return merge_idx


def _warn_optimizer_state(base) -> None:
    found = optimizer_state_paths(base)
    if found:
        where = ", ".join(f"{t} at '{p}'" for p, t in found[:3])
        warnings.warn(f"jmerge.merge: the parameter tree contains optimizer state ({where}); merging optimizer "
                      "moments is rarely meaningful (a merged second moment can go negative). Pass the model "
                      "parameters only.", OptimizerStateWarning, stacklevel=3)


def _group_signature(b, m, hp, view, stats, stacked):
    desc = lambda x: (tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)))
    ms = desc(m) if stacked else tuple(desc(x) for x in m)
    st = jax.tree_util.tree_structure(stats), tuple(desc(x) for x in jax.tree.leaves(stats))
    return (desc(b), ms, view, tuple(sorted((k, desc(v)) for k, v in hp.items())), st)


GROUP_MIN_EQNS = 400
"""Inside a trace, leaves of one shape share a body when one leaf's program has at least this many
equations (top-k searches, sorts: compile-bound); cheaper bodies are traced inline per leaf (they
compile fast and run without the loop's copies)."""


def count_eqns(jaxpr: Any) -> int:
    """Equations of a jaxpr and of all its sub-jaxprs (loop bodies, branches, nested jits).

    References: none (infrastructure).
    """
    return sum(1 for _ in iter_eqns(jaxpr))


def _run_grouped(program: LeafProgram, items: list, mode) -> dict:
    """Inside a trace: the leaves of one signature run in one ``fori_loop`` whose body merges leaf
    ``j``, chosen by ``lax.switch`` (no stacked copy of the inputs; outputs written in place), so the
    merge body is traced and compiled once per shape. ``mode="auto"`` does this only for bodies of at
    least :data:`GROUP_MIN_EQNS` equations."""
    groups: dict = {}
    for it in items:
        i, b, m, hp, key, view, st = it
        v = view if program.method.uses_view else None
        groups.setdefault(_group_signature(b, m, hp, v, st, program.stacked), []).append(it)
    out = {}
    for its in groups.values():
        view = its[0][5]
        if len(its) == 1:
            i, b, m, hp, key, _, st = its[0]
            out[i] = program(b, m, hp, key, st, view, traced=True)
            continue
        args = [(it[1], it[2], {k: jnp.asarray(v, jnp.float32) for k, v in it[3].items()}, it[4], it[6]) for it in its]
        branches = [lambda a=a: a for a in args]

        def one(j, branches=branches, view=view):
            b, m, hp, key, st = lax.switch(j, branches)
            return program(b, m, hp, key, st, view, traced=True)

        # The body is traced once: its jaxpr gives the output shapes, the size test of mode="auto" and the
        # loop body (re-binding a jaxpr's equations costs far less than tracing the merge's Python again).
        closed, shapes = jax.make_jaxpr(one, return_shape=True)(np.int32(0))
        if mode == "auto" and count_eqns(closed.jaxpr) < GROUP_MIN_EQNS:
            for i, b, m, hp, key, view, st in its:
                out[i] = program(b, m, hp, key, st, view, traced=True)
            continue
        init = jax.tree.map(lambda s: jnp.zeros((len(its),) + s.shape, s.dtype), shapes)
        treedef = jax.tree.structure(shapes)

        def body(j, acc, closed=closed, treedef=treedef):
            res = jax.tree.unflatten(treedef, jax.core.eval_jaxpr(closed.jaxpr, closed.consts, j))
            return jax.tree.map(lambda a, x: lax.dynamic_update_index_in_dim(a, x, j, 0), acc, res)

        res = lax.fori_loop(0, len(its), body, init)
        for j, it in enumerate(its):
            out[it[0]] = jax.tree.map(lambda x, j=j: x[j], res)
    return out


def merge(method: Transform, base: Any, models: Sequence[Any] | None = None, *, task_vectors: Any = None,
          hparams: Mapping[str, Any] | None = None, seed: int | jax.Array = 0, out_dtype: Any = None,
          return_extras: bool = False, check_finite: bool = False, num_layers: int | None = None,
          views: Any = None, non_float: Literal["base", "error"] = "base", group_leaves: bool | str = "auto",
          traced_range_checks: bool = True, compute_dtype: Any = None) -> Any:
    """Merge fine-tuned models into the base with ``method``.

    Works on any pytree (nested dicts, Flax linen params, Flax NNX ``State``). Floating-point leaves
    are merged; integer, boolean and PRNG-key leaves (step counters, NNX ``Rngs`` state) are taken from
    the base, listed in one :class:`~jmerge.NonFloatLeavesWarning`; complex leaves are refused. A tree
    holding optimizer state gets an :class:`~jmerge.OptimizerStateWarning`.

    Outside ``jax.jit`` every leaf runs through one compiled per-leaf function (compiled once per leaf
    shape, dtype and matrix view) with hyperparameters as arguments: new values do not recompile.
    Inside a user's ``jax.jit`` (or ``vmap``) the same code is traced inline; with ``group_leaves``
    the leaves of one shape run in one loop over a single traced body, so compile time grows with the
    distinct shapes, not the leaves (``"auto"``: for compile-heavy bodies such as TIES' top-k; simple
    elementwise methods stay inline, where they run faster).

    Args:
      method: a :class:`Transform`, e.g. ``jmerge.ties(density=0.2)``.
      base: base (pretrained) params.
      models: a list of fine-tuned params, each with the base's structure. Give this or ``task_vectors``.
      task_vectors: stacked task vectors (leaves ``(T, *shape)``), e.g. from :func:`task_vectors`.
      hparams: overrides of the method's hyperparameters, by public name (``"density"``) or qualified
        name (``"trim.density"``): numbers, ``Gradient``, ``PerModel``, ``Rules``, pytrees, callables
        or (traced) JAX scalars (see :mod:`jmerge.core.hparams`).
      seed: seed of random methods; each leaf's key is derived from it and the leaf path.
      out_dtype: dtype of the merged leaves (default: the base's).
      return_extras: also return a pytree of per-leaf extras (masks, rescalers ...).
      check_finite: reject NaN/Inf in the inputs (costs a device sync per leaf).
      num_layers: layer count for per-layer gradients (default: inferred from paths).
      views: overrides of the inferred matrix views (see :func:`jmerge.infer_views`).
      non_float: ``"base"`` takes non-float leaves from the base; ``"error"`` refuses them.
      group_leaves: inside a trace, run same-shaped leaves through one loop body: ``"auto"`` (default)
        for bodies of at least :data:`GROUP_MIN_EQNS` equations, ``True`` always, ``False`` never.
      traced_range_checks: check traced hyperparameter values against their ranges with one host
        callback (an out-of-range value then fails the computation with a message naming it).
      compute_dtype: the arithmetic's dtype. None or ``"float32"`` (default): float32, exact for
        bf16/fp16 inputs. ``"bfloat16"`` / ``"float16"``: the numbers of the same merge computed in
        that dtype, as mergekit computes with ``dtype: bfloat16``: inputs, task vectors, the steps'
        intermediates and ``base + merged`` are rounded to it (an emulation: float32 arithmetic rounded
        after each operation; reductions round once). ``"float64"`` raises :class:`MergeInputError`.
        Top-k ties (frequent among rounded task vectors) are broken deterministically, by the lowest
        flat index (mergekit's unstable ``argsort`` keeps an arbitrary subset of the tied entries).

    Returns:
      The merged params pytree (and the extras pytree when ``return_extras``).

    Raises:
      MergeInputError: for mismatched trees, shapes, bad hyperparameters or model counts.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); each method's own paper
    (see its factory).
    """
    method = check_method(method)
    if (models is None) == (task_vectors is None):
        raise MergeInputError("give exactly one of `models` (a list of fine-tuned params) or `task_vectors`.")
    stacked = task_vectors is not None
    bpaths, base_leaves, treedef = leaves_with_paths(base)
    if stacked:
        _, per_leaf_models, T = check_task_vectors(base, task_vectors)
    else:
        models = _as_model_list(models, base)
        check_compatible(base, models, check_finite=check_finite)
        T = len(models)
        model_leaves = [leaves_with_paths(m)[1] for m in models]
        per_leaf_models = [tuple(ml[i] for ml in model_leaves) for i in range(len(base_leaves))]
    if T < method.min_models:
        raise MergeInputError(f"method '{method.name}' needs at least {method.min_models} fine-tuned model(s) "
                              f"besides the base; got {T}.")
    if method.max_models is not None and T > method.max_models:
        raise MergeInputError(f"method '{method.name}' merges at most {method.max_models} fine-tuned model(s) "
                              f"with the base; got {T}.")
    _warn_optimizer_state(base)
    idx = _leaf_policy(bpaths, base_leaves, per_leaf_models, non_float, stacked)
    specs = method.bind(hparams)
    hp_all = resolve_hparams(specs, bpaths, treedef=treedef, num_layers=num_layers, num_models=T,
                             per_model=method.accepts_per_model, labels=method.labels)
    paths = [bpaths[i] for i in idx]
    hps = [hp_all[i] for i in idx]
    check_ranges(method, paths, hps)
    if traced_range_checks:
        _traced_range_check(method, specs)
    vws = infer_views(paths, [np.shape(base_leaves[i]) for i in idx], overrides=views)
    traced = _is_traced(base, per_leaf_models, hps) or isinstance(seed, jax.core.Tracer)
    keys = [leaf_key(seed, p) for p in paths]
    program = LeafProgram(method, stacked=stacked, out_dtype=out_dtype, return_extras=return_extras,
                          compute_dtype=compute_dtype)
    bl = [base_leaves[i] for i in idx]
    ml = [per_leaf_models[i] for i in idx]

    # Whole-model statistics (only for non-leaf-local steps such as global top-k).
    stats = [dict() for _ in idx]
    host_only = [p.name for _, _, p in program.phases if p.finalize_traced is None]
    if traced and host_only:
        raise MergeInputError(f"method '{method.name}' needs whole-model statistics computed on the host "
                              f"({', '.join(host_only)}, e.g. scope='global'): run this merge outside jax.jit/vmap, "
                              "or use a per-tensor scope.")
    # each leaf's sort limit, resolved once for all its calls (its arrays' shardings do not change)
    sls = [None] * len(bl) if traced else [_resolve_sort_limit("auto", b, m) for b, m in zip(bl, ml)]
    for pi, (_, sname, phase) in enumerate(program.phases):
        vals = None if traced else program.skip(pi, stats, hps)
        if vals is None:
            collected = [program.collect(pi, b, m, hp, k, st, v, traced=traced, sort_limit=sl)
                         for b, m, hp, k, st, v, sl in zip(bl, ml, hps, keys, stats, vws, sls)]
            vals = program.finalize(pi, collected, hps, traced=traced)
        for st, val in zip(stats, vals):
            st.setdefault(sname, {})[phase.name] = val

    if group_leaves not in (True, False, "auto"):
        raise MergeInputError(f"group_leaves={group_leaves!r}: use 'auto', True or False.")
    if traced and group_leaves:
        res = _run_grouped(program, list(zip(range(len(idx)), bl, ml, hps, keys, vws, stats)), group_leaves)
        results = [res[j] for j in range(len(idx))]
    else:
        results = [program(b, m, hp, k, st, v, traced=traced, sort_limit=sl)
                   for b, m, hp, k, st, v, sl in zip(bl, ml, hps, keys, stats, vws, sls)]
    outs = list(base_leaves)
    extras: list = [{} for _ in base_leaves]
    for j, i in enumerate(idx):
        if return_extras:
            outs[i], extras[i] = results[j]
        else:
            outs[i] = results[j]
    merged = jax.tree.unflatten(treedef, outs)
    if return_extras:
        return merged, jax.tree.unflatten(treedef, extras)
    return merged


def merge_leaf(method: Transform, base_leaf: Shaped[ArrayLike, "*shape"],
               model_leaves: Sequence[Shaped[ArrayLike, "*shape"]] | Float[Array, "T *shape"], *,
               hp: Mapping[str, Any], path: str, seed: int | jax.Array = 0, stats: Mapping[str, Any] | None = None,
               stacked: bool = False, out_dtype: Any = None, return_extras: bool = False,
               view: MatrixView | None | str = "infer", compute_dtype: Any = None) -> Any:
    """Merge one tensor (out-of-core use): the per-leaf program that :func:`merge` runs.

    ``hp`` is this leaf's resolved hyperparameters (see :func:`prepare_leaf_hparams`); ``path``
    gives the leaf's PRNG key (and, with ``view="infer"``, its matrix view), so the result equals
    the whole-tree merge's for that leaf. Non-float leaves are returned unchanged. ``compute_dtype``
    as for :func:`merge`.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    method = check_method(method, "merge_leaf")
    kind = leaf_kind(base_leaf)
    if kind == "complex":
        raise MergeInputError(f"leaf '{path}' is complex; jmerge merges real floating-point leaves only.")
    if kind != "float":
        return (base_leaf, {}) if return_extras else base_leaf
    missing = sorted(set(method.defaults) - set(hp))
    if missing:
        raise MergeInputError(f"merge_leaf: hp lacks {missing} (keys are qualified names '<step>.<name>'); build it "
                              f"with jmerge.prepare_leaf_hparams(method, ['{path}'], num_models)[0].")
    if isinstance(view, str):
        view = infer_views([path], [np.shape(base_leaf)])[0]
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    program = LeafProgram(method, stacked=stacked, out_dtype=out_dtype, return_extras=return_extras,
                          compute_dtype=compute_dtype)
    ms = model_leaves if stacked else tuple(model_leaves)
    return program(base_leaf, ms, hp, leaf_key(seed, path), dict(stats or {}), view, sort_limit="auto")


# --------------------------------------------------------------------------------------------
# Task vectors


def task_vectors(base: Any, models: Sequence[Any]) -> Any:
    """Stacked task vectors ``tau_t = theta_t - theta_0``: each leaf has shape ``(T, *leaf.shape)``.

    Computed in float32 whatever the input dtypes (bf16/fp16 differences are exact in float32).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    models = _as_model_list(models, base)
    check_compatible(base, models)
    return jax.tree.map(lambda b, *ms: stack_diffs(b, ms), base, *models)


def apply_delta(base: Any, delta: Any, scale: float | jax.Array = 1.0) -> Any:
    """``base + scale * delta`` computed in float32, returned in each base leaf's dtype.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    return jax.tree.map(lambda b, d: (jnp.asarray(b, jnp.float32) + scale * jnp.asarray(d, jnp.float32))
                        .astype(jnp.asarray(b).dtype), base, delta)
