"""Parameter values of a merge config, and their resolution into jmerge hyperparameters and options.

A value is a number or boolean, a list of numbers (a per-layer :class:`~jmerge.Gradient`: layer ``i``
of ``n`` at ``t = i/(n-1)``, other tensors at ``t = 0``), or a list of ``{filter, value}`` entries
(:class:`~jmerge.Rules`: the first entry whose filter is a substring of the tensor name wins; an
entry without filter, or with ``*``, matches everything in its place). Per-model settings fall back
to the top-level ones; per-tensor parameters become jmerge hyperparameters (:class:`~jmerge.PerModel`
when they differ by model), fixed options become factory arguments.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping

from ..core import Gradient, PerModel, Rules
from .methods import MergekitMethod, Translate, _Method
from .schema import Loc, MergeConfig, ModelEntry, _Ctx

_ALLOWED = "a number, a boolean, a list of numbers (per-layer gradient) or a list of {filter, value} entries"


# --------------------------------------------------------------------------------------------
# Values


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(ctx: _Ctx, loc: Loc, v: Any) -> Any:
    """Validate a parameter setting and convert it to a jmerge spec."""
    if isinstance(v, bool) or _is_num(v):
        return v
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise ctx.error(loc, f"cannot use {v!r} ({type(v).__name__}); give {_ALLOWED}.")
    if not v:
        raise ctx.error(loc, f"empty list; give {_ALLOWED}.")
    if all(_is_num(x) for x in v):
        return Gradient([float(x) for x in v])
    if all(isinstance(x, dict) for x in v):
        rules = [_check_rule(ctx, loc + (i,), r) for i, r in enumerate(v)]
        return Rules(rules, default=None, allow_unused=True)
    raise ctx.error(loc, f"mixed list {v!r}; give {_ALLOWED}.")


def _check_rule(ctx: _Ctx, loc: Loc, r: dict) -> tuple[str, Any]:
    """One ``{filter, value}`` entry -> a :class:`Rules` entry (``""`` matches every tensor)."""
    if set(r) - {"filter", "value"} or "value" not in r:
        raise ctx.error(loc, f"a filtered value is {{filter: <substring>, value: ...}}; got keys {sorted(r)}.")
    f = r.get("filter")
    if f is not None and not isinstance(f, str):
        raise ctx.error(loc + ("filter",), f"filter must be a string, got {f!r}.")
    inner = _check_value(ctx, loc + ("value",), r["value"])
    if isinstance(inner, Rules):
        raise ctx.error(loc + ("value",), "filtered values cannot nest filters.")
    return ("" if f in (None, "*") else f), inner


def _check_values(ctx: _Ctx, loc: Loc, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every setting of a ``parameters`` mapping at ``loc`` converted to a jmerge spec."""
    return {k: _check_value(ctx, loc + (k,), v) for k, v in (params or {}).items()}


def _constant(spec: Any) -> Any:
    """The constant value of a spec, or raise TypeError when it varies by layer or tensor."""
    if isinstance(spec, (bool, int, float)):
        return spec
    if isinstance(spec, Rules) and len(spec.rules) == 1 and spec.rules[0][0] == "":
        return _constant(spec.rules[0][1])
    raise TypeError


# --------------------------------------------------------------------------------------------
# Settings of one merge: top-level and per-model, with their locations


@dataclasses.dataclass
class _Settings:
    """Converted parameter settings with their YAML locations: ``{name: (spec, loc)}``."""

    top: dict[str, tuple[Any, Loc]]
    per: list[dict[str, tuple[Any, Loc]]]  # one per merged model

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.top, *[k for d in self.per for k in d]]))

    def first_loc(self, k: str) -> Loc:
        return self.top[k][1] if k in self.top else next(d[k][1] for d in self.per if k in d)

    def per_model(self, k: str) -> bool:
        return any(k in d for d in self.per)


def _located(ctx: _Ctx, loc: Loc, params: Mapping[str, Any] | None) -> dict[str, tuple[Any, Loc]]:
    return {k: (_check_value(ctx, loc + (k,), v), loc + (k,)) for k, v in (params or {}).items()}


def _collect(ctx: _Ctx, cfg: MergeConfig, entries: list[tuple[int, ModelEntry]]) -> _Settings:
    """Check every value: the top-level ones first, then each merged model's."""
    top = _located(ctx, ("parameters",), cfg.parameters)
    per = [_located(ctx, ("models", i, "parameters"), e.parameters) for i, e in entries]
    return _Settings(top, per)


# --------------------------------------------------------------------------------------------
# What a method accepts


@dataclasses.dataclass
class _Table:
    """The parameters one method accepts, for mergekit and jmerge-native methods alike."""

    rename: Mapping[str, str]  # per-tensor parameter -> jmerge hyperparameter
    options: dict[str, Any]  # fixed options, pre-filled with their defaults
    option_names: frozenset
    ignored: frozenset
    hp_defaults: Mapping[str, Any]
    translate: Translate
    allowed: list[str]


def _factory_params(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _probe_hparams(factory: Callable[..., Any]) -> dict[str, Any]:
    """The traced hyperparameters (with jmerge's defaults) of the factory's default method."""
    try:
        probe = factory()
    except Exception:  # noqa: BLE001 - every factory must work without arguments; be lenient here
        return {}
    return dict(getattr(probe, "hparams", {}) or {})


def _table(spec: MergekitMethod | None, traced: set[str], fparams: set[str]) -> _Table:
    if spec is not None:
        allowed = sorted(set(spec.rename) | set(spec.options) | set(spec.ignored))
        return _Table(spec.rename, dict(spec.options), frozenset(spec.options), spec.ignored, spec.hp_defaults,
                      spec.translate or (lambda o, b: {}), allowed)
    fixed = fparams - {"self"}
    return _Table({k: k for k in traced}, {}, frozenset(fixed - traced), frozenset(), {},
                  lambda o, b: dict(o), sorted(traced | fixed))


# --------------------------------------------------------------------------------------------
# Resolution


def _fixed_option(ctx: _Ctx, s: _Settings, k: str, mname: str) -> Any:
    """The one constant value of a fixed option over the top level and every model."""
    vals = set()
    for d in [s.top, *s.per]:
        if k in d:
            try:
                vals.add(_constant(d[k][0]))
            except TypeError:
                raise ctx.error(d[k][1], f"'{k}' is a fixed option of '{mname}': give one value, not a "
                                "gradient or filter list.") from None
    if len(vals) > 1:
        raise ctx.error(s.first_loc(k), f"'{k}' is a fixed option of '{mname}': every model must use the same "
                        f"value, got {sorted(vals, key=str)}.")
    return vals.pop()


def _traced_name(ctx: _Ctx, s: _Settings, t: _Table, m: _Method, traced: Mapping[str, Any], k: str) -> str:
    """The jmerge hyperparameter a per-tensor parameter sets."""
    if k not in t.rename:
        raise ctx.error(s.first_loc(k), f"unknown parameter '{k}' for method '{m.name}'; allowed: "
                        f"{', '.join(t.allowed) or '(none)'}.", key=True)
    jk = t.rename[k]
    if jk not in traced:
        raise ctx.error(s.first_loc(k), f"parameter '{k}' of '{m.name}' maps to '{jk}', which jmerge's "
                        f"'{m.jm}' does not take (it takes {sorted(traced)}).", key=True)
    return jk


def _hparam_spec(s: _Settings, k: str, default: Any) -> Any:
    """A top-level-only setting as is; else a :class:`PerModel` falling back to the top level or default."""
    if k in s.top and not s.per_model(k):
        return s.top[k][0]
    dflt = s.top[k][0] if k in s.top else default
    return PerModel([d[k][0] if k in d else dflt for d in s.per])


def _rename_settings(ctx: _Ctx, s: _Settings, t: _Table, m: _Method, traced: Mapping[str, Any]) -> dict[str, str]:
    """Fixed options into ``t.options``; every other setting -> the jmerge hyperparameter it sets."""
    rename: dict[str, str] = {}
    for k in s.names():
        if k in t.ignored:
            continue
        if k in t.option_names:
            t.options[k] = _fixed_option(ctx, s, k, m.name)
            continue
        rename[k] = _traced_name(ctx, s, t, m, traced, k)
    return rename


def _sort_settings(ctx: _Ctx, s: _Settings, t: _Table, m: _Method, traced: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed options into ``t.options``; the returned hyperparameter specs (mergekit defaults filled in)."""
    hparams: dict[str, Any] = {jk: _hparam_spec(s, k, t.hp_defaults.get(jk, traced.get(jk)))
                               for k, jk in _rename_settings(ctx, s, t, m, traced).items()}
    for jk, v in t.hp_defaults.items():
        if jk in traced:
            hparams.setdefault(jk, v)
    return hparams


def _factory_kwargs(ctx: _Ctx, cfg: MergeConfig, t: _Table, m: _Method, fparams: set[str],
                    has_base: bool) -> dict[str, Any]:
    """The fixed options translated to factory arguments, plus jmerge's ``scope`` extra."""
    try:
        kwargs = dict(t.translate(t.options, has_base))
    except ValueError as e:
        raise ctx.error(("parameters",), str(e)) from None
    if cfg.scope is not None:
        if "scope" not in fparams:
            raise ctx.error(("scope",), f"method '{m.name}' has no `scope` option (jmerge's '{m.jm}' takes "
                            f"{sorted(fparams)}).")
        kwargs["scope"] = cfg.scope
    return kwargs


def _check_required(ctx: _Ctx, cfg: MergeConfig, m: _Method, hparams: Mapping[str, Any]) -> None:
    for k, meaning in (m.spec.required if m.spec is not None else {}).items():
        if m.spec.rename.get(k, k) not in hparams:
            raise ctx.error(("parameters",) if cfg.parameters is not None else ("merge_method",),
                            f"{m.name} needs parameter '{k}' ({meaning}).")


def _resolve_parameters(ctx: _Ctx, cfg: MergeConfig, m: _Method, entries: list[tuple[int, ModelEntry]],
                        has_base: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 5: the parameters of a per-tensor merge -> ``(factory_kwargs, hparams)``."""
    traced = _probe_hparams(m.factory)
    fparams = _factory_params(m.factory)
    settings = _collect(ctx, cfg, entries)
    table = _table(m.spec, set(traced), fparams)
    hparams = _sort_settings(ctx, settings, table, m, traced)
    kwargs = _factory_kwargs(ctx, cfg, table, m, fparams, has_base)
    _check_required(ctx, cfg, m, hparams)
    return kwargs, hparams


# --------------------------------------------------------------------------------------------
# `slices` merges: settings per level, evaluated per tensor as mergekit evaluates them


def _setting_value(spec: Any, name: str, t: float) -> float | None:
    """A converted setting at tensor ``name`` and gradient position ``t``; None when no filter matches.

    mergekit's rules: a gradient of ``n`` values at ``t`` interpolates between values ``floor(t(n-1))``
    and the next; in a filter list the first entry whose filter is a substring of the name (or that has
    no filter) wins, and when none does the setting does not apply (the next level is asked).
    """
    if isinstance(spec, bool) or _is_num(spec):
        return float(spec)
    if isinstance(spec, Gradient):
        vals = [float(v) for v in spec.values]
        s = t * (len(vals) - 1)
        i0 = int(s)
        i1 = min(len(vals) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]
    if isinstance(spec, Rules):
        for f, v in spec.rules:
            hit = re.search(f[3:], name) is not None if f.startswith("re:") else f in name
            if f == "" or hit:
                return _setting_value(v, name, t)
        return None
    raise TypeError(f"unexpected parameter spec {spec!r}")


@dataclasses.dataclass(frozen=True)
class SliceParameters:
    """The parameters of a ``slices`` merge per level, as jmerge specs keyed by jmerge hyperparameter name.

    mergekit's precedence, per tensor: a per-model parameter (one value per merged model, e.g. ``weight``,
    ``density``) comes from that source's ``parameters``, else its slice's, else the top level; a shared
    parameter (one value per tensor, e.g. ``t``, ``lambda``) from the slice's, else the top level
    (per-source settings of shared parameters are ignored, as in mergekit). A level whose filters all
    miss the tensor falls through to the next; when no level applies, mergekit's default (or jmerge's,
    for jmerge-native methods) is used.

    Attributes:
      top: the top-level ``parameters``.
      slices: each slice's ``parameters``.
      sources: per slice, each source's ``parameters``.
      per_model: the hyperparameters that take one value per merged model.
      defaults: value when no level applies (mergekit's defaults, else jmerge's).
      required: hyperparameters that must apply to every tensor -> the mergekit name (for messages).
      names: every hyperparameter to resolve, in order.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    top: Mapping[str, Any]
    slices: tuple
    sources: tuple
    per_model: frozenset
    defaults: Mapping[str, Any]
    required: Mapping[str, str]
    names: tuple

    def value(self, slice_index: int, name: str, tensor: str, t: float, source: int | None = None) -> float | None:
        """The value of hyperparameter ``name`` at ``tensor`` and ``t`` in slice ``slice_index`` (None: none applies).

        ``source`` (an index into the slice's sources) asks for a per-model value: that source's
        settings come first.
        """
        levels = ([self.sources[slice_index][source]] if source is not None else []) + [self.slices[slice_index],
                                                                                         self.top]
        for level in levels:
            if name in level:
                v = _setting_value(level[name], tensor, t)
                if v is not None:
                    return v
        if name in self.defaults:
            return _setting_value(self.defaults[name], tensor, t)
        return None


def _public_per_model(method: Any, name: str) -> bool:
    """Whether every step a (public or qualified) hyperparameter name sets takes one value per model."""
    targets = method.aliases.get(name) or (name,)
    return all(method.accepts_per_model(q) for q in targets)


def _resolve_slice_parameters(ctx: _Ctx, cfg: MergeConfig, m: _Method,
                              has_base: list[bool]) -> tuple[dict[str, Any], SliceParameters]:
    """Stage 5 for ``slices``: every level's parameters checked -> ``(factory_kwargs, SliceParameters)``.

    Fixed options (``normalize`` ...) must have one value over the whole config; every slice must
    use (or not use) a base alike when the method's options depend on it.
    """
    traced = _probe_hparams(m.factory)
    fparams = _factory_params(m.factory)
    top = _located(ctx, ("parameters",), cfg.parameters)
    per_slice = [_located(ctx, ("slices", i, "parameters"), s.parameters) for i, s in enumerate(cfg.slices)]
    per_src = [[_located(ctx, ("slices", i, "sources", j, "parameters"), src.parameters)
                for j, src in enumerate(s.sources)] for i, s in enumerate(cfg.slices)]
    settings = _Settings(top, per_slice + [d for ds in per_src for d in ds])
    table = _table(m.spec, set(traced), fparams)
    rename = _rename_settings(ctx, settings, table, m, traced)
    kwargs_by_base = {b: _factory_kwargs(ctx, cfg, table, m, fparams, b) for b in dict.fromkeys(has_base)}
    if len({repr(sorted(v.items())) for v in kwargs_by_base.values()}) > 1:
        i = has_base.index(not has_base[0])
        raise ctx.error(("slices", i), f"method '{m.name}' is built differently with and without a base model, so "
                        "every slice must have one, or none (set `base_model` for every slice, or for none).")
    kwargs = kwargs_by_base[has_base[0]]

    def level(d: Mapping[str, tuple[Any, Loc]]) -> dict[str, Any]:
        return {rename[k]: spec for k, (spec, _) in d.items() if k in rename}

    try:
        method = m.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ctx.error(("parameters",), f"invalid options for '{m.jm}': {e}") from None
    names = tuple(dict.fromkeys([*rename.values(), *(jk for jk in table.hp_defaults if jk in traced)]))
    required = {table.rename.get(k, k): k for k in (m.spec.required if m.spec is not None else {})}
    defaults = {jk: table.hp_defaults.get(jk, traced.get(jk)) for jk in names if jk not in required}
    defaults = {jk: v for jk, v in defaults.items() if isinstance(v, (bool, int, float, Gradient, Rules))}
    top_specs, slice_specs = level(top), [level(d) for d in per_slice]
    for jk, k in required.items():
        missing = [i for i, d in enumerate(slice_specs) if jk not in d]
        if jk not in top_specs and missing:
            loc = ("slices", missing[0]) if len(missing) < len(slice_specs) else (
                ("parameters",) if cfg.parameters is not None else ("merge_method",))
            raise ctx.error(loc, f"{m.name} needs parameter '{k}' ({m.spec.required[k]}) at the top level or in "
                            "every slice's `parameters`.")
    params = SliceParameters(top_specs, tuple(slice_specs),
                             tuple(tuple(level(d) for d in ds) for ds in per_src),
                             frozenset(jk for jk in names if _public_per_model(method, jk)), defaults, required, names)
    return kwargs, params
