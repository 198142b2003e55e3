"""Merge steps and their composition: every step owns its hyperparameters.

A :class:`Step` is one pure per-leaf function ``update(state, hp, **static) -> state`` with its own
hyperparameters (defaults, ranges, which accept one value per model). A :class:`Transform` is a
sequence of *named* steps, like ``optax.named_chain``: a hyperparameter is addressed as
``"<step>.<name>"`` (``"dare.density"``), or by a public name that the transform binds to one or
more steps (``ties`` binds ``density`` to ``trim.density`` and ``weight`` to both
``elect_sign.weight`` and ``disjoint_merge.weight``). Named methods declare their bindings; a
user's :func:`chain` binds each hyperparameter name that exactly one of its parts exposes, and a
name that several parts expose is ambiguous: using it is an error that lists the qualified names.

Hyperparameter *values* are never part of a transform's identity, so new values (or a rebuilt
``ties(density=0.3)``) reuse the compiled merge; the values reach the jitted code as arguments.

References: optax's ``named_chain`` and ``inject_hyperparams`` (DeepMind, 2020-2024) for the design.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

from .errors import MergeInputError
from .state import MergeState

__all__ = ["StatsPhase", "Step", "Transform", "transform", "chain", "named_chain", "is_transform"]

HParams = Mapping[str, Any]


class StatsPhase(NamedTuple):
    """A whole-model statistic for steps that are not leaf-local (e.g. global top-k).

    ``collect(state, hp) -> pytree`` runs per leaf under jit with the step's own hyperparameters;
    ``finalize(list_of_collected, list_of_step_hparams) -> list_per_leaf`` runs on the host once over
    all leaves; the step's update then finds its leaf's value in ``state.stats[name]``. A phase whose
    finalization can also run on traced values (inside the user's ``jax.jit``) gives it as
    ``finalize_traced`` (same signature, JAX operations only); without it the method cannot be merged
    inside a trace. ``skip(so_far, hps)``, optional, runs on the host before the phase: ``so_far`` holds per
    leaf the step's phase values finalized so far (``{phase name: value}``); it returns the phase's per-leaf
    values when the phase has nothing to read (a search already finished: no pass over the inputs, which
    matters out of core), or None to run it.

    References: optax's ``chain``/``named_chain`` (DeepMind) for the step design; Yadav et al., "TIES-Merging:
    Resolving Interference When Merging Models" (NeurIPS 2023) for the global top-k it serves.
    """

    name: str
    collect: Callable[[MergeState, HParams], Any]
    finalize: Callable[[list, list], list]
    finalize_traced: Callable[[list, list], list] | None = None
    skip: Callable[[list, list], list | None] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One merge step over a single leaf, with its own hyperparameters.

    Attributes:
      name: the step's default name in a chain (``"trim"``).
      update: ``update(state, hp, **static) -> state``; pure and jittable; ``hp`` holds this step's
        hyperparameters only, by their short names.
      hparams: default hyperparameter specs (traced values), by short name.
      static: static configuration passed to ``update`` as keyword arguments (hashable values).
      ranges: allowed closed ranges ``(lo, hi)`` of hyperparameters.
      per_model: the hyperparameters that accept one value per merged model.
      min_models / max_models: how many fine-tuned models the step accepts.
      stats: whole-model statistics this step needs.
      materialize_tau: the step reads the task vectors many times and cannot rebuild them
        (:meth:`MergeState.tau_rebuild`): build ``tau`` once into its own buffer.
      uses_view: the step reads ``state.view`` (the leaf's matrix view); only then is the view part of
        the compiled program's key, so other methods compile once per shape.

    References: optax's ``chain``/``named_chain`` (DeepMind).
    """

    name: str
    update: Callable[..., MergeState]
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    static: tuple = ()
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    per_model: frozenset = frozenset()
    min_models: int = 1
    max_models: int | None = None
    stats: tuple[StatsPhase, ...] = ()
    materialize_tau: bool = False
    uses_view: bool = False

    def identity(self) -> tuple:
        return (self.update, self.static, tuple(p.name for p in self.stats), self.materialize_tau, self.uses_view)

    def own_hparams(self, name: str, hp: HParams) -> dict:
        """This step's values out of a method's qualified hyperparameters, by short name (the step is
        called ``name`` in its chain): what its ``update`` and statistics receive."""
        return {k: hp[f"{name}.{k}"] for k in self.hparams}


Part = Union["Transform", tuple]


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
    """A merge method: named steps run left to right on each leaf.

    Two transforms are equal when they run the same steps with the same static configuration under
    the same names; default hyperparameter values are not part of identity.

    Attributes:
      name: short name for messages (``"ties"``).
      steps: ``((step_name, Step), ...)`` in order.
      aliases: public hyperparameter name -> the qualified names ``"<step>.<name>"`` it sets.
      ambiguous: public names that several parts expose, -> their qualified names (for errors).

    References: optax's ``chain``/``named_chain`` (DeepMind).
    """

    name: str
    steps: tuple[tuple[str, Step], ...]
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    ambiguous: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    # ---- identity
    def _identity(self):
        # every field is immutable, so the identity is made once (a jitted per-leaf call hashes the method as a static
        # argument: ~20 us each time it was rebuilt, for every leaf and phase)
        ident = self.__dict__.get("_ident")
        if ident is None:
            ident = ("transform", tuple((n, s.identity()) for n, s in self.steps))
            object.__setattr__(self, "_ident", ident)
        return ident

    def __eq__(self, other):
        return isinstance(other, Transform) and self._identity() == other._identity()

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self._identity())
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self):  # the caches stay behind (a function's hash is its id: another process's differs)
        return {k: v for k, v in self.__dict__.items() if k not in ("_ident", "_hash")}

    def __repr__(self):
        return f"Transform({self.name!r}, steps={[n for n, _ in self.steps]}, hparams={self.hparams})"

    # ---- hyperparameters
    @property
    def defaults(self) -> dict[str, Any]:
        """Every hyperparameter by qualified name ``"<step>.<name>"``, with its default."""
        return {f"{n}.{k}": v for n, s in self.steps for k, v in s.hparams.items()}

    @property
    def hparams(self) -> dict[str, Any]:
        """The public hyperparameters with their defaults: bound names first, then the qualified
        names of hyperparameters no public name covers."""
        d = self.defaults
        out = {a: d[t[0]] for a, t in self.aliases.items()}
        covered = {q for t in self.aliases.values() for q in t}
        out.update({q: v for q, v in d.items() if q not in covered})
        return out

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """Allowed ranges by public name (see :attr:`hparams`) and by qualified name."""
        r = {f"{n}.{k}": v for n, s in self.steps for k, v in s.ranges.items()}
        for a, t in self.aliases.items():
            rs = [r[q] for q in t if q in r]
            if rs:
                r.setdefault(a, (max(x[0] for x in rs), min(x[1] for x in rs)))
        return r

    def label(self, qualified: str) -> str:
        """How messages name a hyperparameter: ``'density' (step 'trim' of 'ties')``."""
        step, k = qualified.rsplit(".", 1)
        public = next((a for a, t in self.aliases.items() if qualified in t), k)
        return f"'{public}' (step '{step}' of '{self.name}')"

    @property
    def labels(self) -> dict[str, str]:
        return {q: self.label(q) for q in self.defaults}

    def accepts_per_model(self, qualified: str) -> bool:
        step, k = qualified.rsplit(".", 1)
        return k in self.step(step).per_model

    def step(self, name: str) -> Step:
        for n, s in self.steps:
            if n == name:
                return s
        raise MergeInputError(f"'{self.name}' has no step '{name}'; its steps are {[n for n, _ in self.steps]}.")

    @property
    def min_models(self) -> int:
        return max([1] + [s.min_models for _, s in self.steps])

    @property
    def max_models(self) -> int | None:
        ms = [s.max_models for _, s in self.steps if s.max_models is not None]
        return min(ms) if ms else None

    @property
    def stats(self) -> tuple[tuple[int, str, StatsPhase], ...]:
        """``(step index, step name, phase)`` of every whole-model statistic, in order."""
        return tuple((i, n, p) for i, (n, s) in enumerate(self.steps) for p in s.stats)

    @property
    def materialize_tau(self) -> bool:
        return any(s.materialize_tau for _, s in self.steps)

    @property
    def uses_view(self) -> bool:
        return any(s.uses_view for _, s in self.steps)

    def bind(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``overrides``, keyed by qualified name.

        Raises:
          MergeInputError: for an unknown or ambiguous name (listing the valid ones), or when one
            hyperparameter is given twice (by a public and a qualified name).
        """
        out = self.defaults
        given: dict[str, str] = {}
        for key, v in (overrides or {}).items():
            targets = self._targets(key)
            for q in targets:
                if q in given:
                    raise MergeInputError(f"'{self.name}': hyperparameter '{q}' is given twice (as '{given[q]}' and "
                                          f"'{key}'); give it once.")
                given[q] = key
                out[q] = v
        return out

    def _targets(self, key: str) -> tuple[str, ...]:
        if key in self.aliases:
            return self.aliases[key]
        d = self.defaults
        if key in d:
            return (key,)
        if key in self.ambiguous:
            opts = ", ".join(f"'{q}'" for q in self.ambiguous[key])
            raise MergeInputError(f"'{self.name}': hyperparameter '{key}' is ambiguous: several steps have it "
                                  f"({opts}). Give the qualified name, or bind it with chain(..., "
                                  f"aliases={{'{key}': (...)}}).")
        valid = sorted(set(self.hparams) | set(d))
        raise MergeInputError(f"'{self.name}' has no hyperparameter '{key}'; valid names: {', '.join(valid) or '(none)'}.")

    def with_hparams(self, **hparams: Any) -> "Transform":
        """A copy with other default hyperparameter values (same identity: no recompile)."""
        vals = self.bind(hparams)
        steps = tuple((n, dataclasses.replace(s, hparams={k: vals[f"{n}.{k}"] for k in s.hparams}))
                      for n, s in self.steps)
        return dataclasses.replace(self, steps=steps)

    # ---- running
    def __call__(self, state: MergeState, hp: HParams, stats: Mapping[str, dict] | None = None) -> MergeState:
        """Run the steps on one leaf; ``hp`` is keyed by qualified name, ``stats`` by step name."""
        return run_steps(self.steps, state, hp, stats or {})


def run_steps(steps, state: MergeState, hp: HParams, stats: Mapping[str, dict]) -> MergeState:
    """Run ``(name, Step)`` pairs: each step sees its own hyperparameters and statistics."""
    for n, s in steps:
        state = state.replace(stats=dict(stats.get(n, {})))
        state = s.update(state, s.own_hparams(n, hp), **dict(s.static))
    return state.replace(stats={})


def is_transform(x: Any) -> bool:
    """Whether ``x`` is a :class:`Transform` (a merge method).

    References: optax's ``chain``/``named_chain`` (DeepMind).
    """
    return isinstance(x, Transform)


def transform(name: str, update: Callable[..., MergeState], *, hparams: Mapping[str, Any] | None = None,
              static: Mapping[str, Any] | None = None, ranges: Mapping[str, tuple[float, float]] | None = None,
              per_model: Sequence[str] = (), min_models: int = 1, max_models: int | None = None,
              stats: Sequence[StatsPhase] = (), materialize_tau: bool = False, uses_view: bool = False) -> Transform:
    """A one-step :class:`Transform` from a module-level ``update(state, hp, **static)`` function.

    Its hyperparameters are addressed by their short names or as ``"<name>.<hparam>"``.

    Args:
      name: the step's name (``"trim"``).
      update: ``update(state, hp, **static) -> state``; ``hp`` holds this step's hyperparameters.
      hparams: default values by short name.
      static: static keyword arguments of ``update``.
      ranges: allowed closed ranges of hyperparameters.
      per_model: hyperparameters that accept one value per merged model (``PerModel``).
      min_models, max_models: how many fine-tuned models the step accepts.
      stats: whole-model statistics (:class:`StatsPhase`).
      materialize_tau, uses_view: see :class:`Step`.

    References: optax's ``GradientTransformation`` (DeepMind) for the style.
    """
    if "." in name or not name:
        raise MergeInputError(f"step name {name!r} must be non-empty and contain no '.'.")
    hp = dict(hparams or {})
    unknown = set(per_model) - set(hp)
    if unknown:
        raise MergeInputError(f"step '{name}': per_model names {sorted(unknown)} are not hyperparameters of it.")
    step = Step(name=name, update=update, hparams=hp, static=tuple(sorted((static or {}).items())),
                ranges=dict(ranges or {}), per_model=frozenset(per_model), min_models=min_models,
                max_models=max_models, stats=tuple(stats), materialize_tau=materialize_tau, uses_view=uses_view)
    return Transform(name=name, steps=((name, step),), aliases={k: (f"{name}.{k}",) for k in hp})


def _check_part(x, where: str):
    if isinstance(x, Transform):
        return
    if callable(x):
        nm = getattr(x, "__name__", repr(x))
        raise MergeInputError(f"{where}: got the factory '{nm}' itself; call it to build the step, e.g. "
                              f"jmerge.{nm}() or jmerge.{nm}(density=0.3).")
    raise MergeInputError(f"{where}: expected a jmerge Transform (e.g. jmerge.trim(0.2)), got {type(x).__name__}.")


def chain(*parts: Part, name: str | None = None, aliases: Mapping[str, Any] | None = None) -> Transform:
    """Compose transforms left to right, like ``optax.chain``; each step keeps its own hyperparameters.

    Parts may be given as ``(label, transform)`` pairs (as ``optax.named_chain``): a one-step part is
    then named ``label``; a multi-step part's step and public names get the prefix ``label.``.
    Unlabelled steps keep their names; repeated names get ``_2``, ``_3`` ... suffixes.

    Args:
      *parts: transforms, or ``(label, transform)`` pairs.
      name: the chain's name (default: the parts' names joined by ``+``).
      aliases: public names of the result, each bound to one or more qualified names (or to public
        names of the parts). When given, these are the chain's only public names (named methods
        declare theirs this way). By default each public name of a part that no other part also
        exposes is kept; names that several parts expose are ambiguous.

    Returns:
      The composed :class:`Transform`.

    Raises:
      MergeInputError: for a part that is not a transform (e.g. an uncalled factory), or bad aliases.

    References: optax's ``chain`` and ``named_chain`` (DeepMind, 2020-2024).
    """
    steps: list[tuple[str, Step]] = []
    used: set[str] = set()
    public: dict[str, list[tuple[str, ...]]] = {}
    names = []
    for i, part in enumerate(parts):
        label = None
        if isinstance(part, tuple):
            if len(part) != 2 or not isinstance(part[0], str):
                raise MergeInputError(f"chain: part {i} must be a transform or a (label, transform) pair.")
            label, part = part
        _check_part(part, f"chain: part {i}")
        names.append(label or part.name)
        rename = {}
        for sn, st in part.steps:
            if label is not None:
                new = label if len(part.steps) == 1 else f"{label}.{sn}"
            else:
                new = sn
            base, k = new, 2
            while new in used:
                new = f"{base}_{k}"
                k += 1
            used.add(new)
            rename[sn] = new
            steps.append((new, st))

        def requal(q, rename=rename):
            s, k = q.rsplit(".", 1)
            return f"{rename[s]}.{k}"

        prefix = f"{label}." if label is not None and len(part.steps) > 1 else ""
        for a, qs in part.aliases.items():
            public.setdefault(prefix + a, []).append(tuple(requal(q) for q in qs))
        for a, qs in part.ambiguous.items():  # stays ambiguous: an empty entry marks it
            public.setdefault(prefix + a, []).extend([tuple(requal(q) for q in qs), ()])
    qualified = {f"{n}.{k}" for n, s in steps for k in s.hparams}
    amb: dict[str, tuple[str, ...]] = {}
    auto: dict[str, tuple[str, ...]] = {}
    for a, ts in public.items():
        if len(ts) == 1 and ts[0]:
            auto[a] = ts[0]
        else:
            amb[a] = tuple(sorted({q for t in ts for q in t}))
    if aliases is not None:
        bound: dict[str, tuple[str, ...]] = {}
        for a, targets in aliases.items():
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            qs: list[str] = []
            for t in targets:
                if t in qualified:
                    qs.append(t)
                elif t in auto:
                    qs.extend(auto[t])
                else:
                    raise MergeInputError(f"chain: alias '{a}' targets '{t}', which is neither a qualified "
                                          f"hyperparameter ({sorted(qualified)}) nor a public name of a part.")
            bound[a] = tuple(dict.fromkeys(qs))
        amb = {a: q for a, q in amb.items() if a not in bound}
        auto = bound
    return Transform(name=name or "+".join(names), steps=tuple(steps), aliases=auto, ambiguous=amb)


def named_chain(*parts: tuple[str, Transform], name: str | None = None,
                aliases: Mapping[str, Any] | None = None) -> Transform:
    """:func:`chain` of ``(label, transform)`` pairs, as ``optax.named_chain``.

    References: optax's ``named_chain`` (DeepMind).
    """
    for i, p in enumerate(parts):
        if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)):
            raise MergeInputError(f"named_chain: part {i} must be a (label, transform) pair.")
    return chain(*parts, name=name, aliases=aliases)
