"""mergekit-compatible YAML merge configurations.

A config names a method (``merge_method``: a mergekit name such as ``ties`` or any jmerge method from
:func:`jmerge.available_methods`), the base and the fine-tuned models with their parameters, or
``slices`` for passthrough (frankenmerge) configs, and output options. :func:`load_config` validates
it completely BEFORE any tensor is read: every error names the YAML line and column and what is
allowed. :meth:`MergePlan.build` turns it into a jmerge ``Transform`` and hyperparameter specs
(numbers, per-layer :class:`~jmerge.Gradient` lists, path :class:`~jmerge.Rules`, :class:`~jmerge.PerModel`).

mergekit semantics kept: per-model parameters fall back to the top-level ``parameters``; a list of
numbers is a gradient over the layers (layer ``i`` of ``n`` at ``t = i/(n-1)``, other tensors at
``t = 0``); in a list of ``{filter, value}`` the first entry whose filter is a substring of the tensor
name wins (an entry without filter, or ``*``, matches everything); ``lambda`` is jmerge's ``scale``.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..core import Gradient, PerModel, Rules
from ..core import MergeInputError

__all__ = ["ConfigError", "MergeConfig", "MergePlan", "load_config", "parse_config", "MERGEKIT_METHODS"]


class ConfigError(MergeInputError):
    """An invalid merge config; the message starts with ``file:line:column``."""


# --------------------------------------------------------------------------------------------
# Schema (pydantic). Parameter values are checked separately (with locations) in `_check_value`.

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None


class SliceDef(_Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Optional[dict[str, Any]] = None


class MergeConfig(_Strict):
    """The YAML schema: mergekit's fields plus jmerge extras (``seed``, ``scope``)."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[SliceDef]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    # jmerge extras
    seed: int = 0
    scope: Optional[str] = None  # the method's `scope` option, e.g. "global" for whole-model TIES


# --------------------------------------------------------------------------------------------
# mergekit method table: jmerge method, base policy, parameter renames, mergekit defaults.

@dataclasses.dataclass(frozen=True)
class _MK:
    """How one mergekit method maps to jmerge.

    ``rename``: mergekit per-tensor parameter -> jmerge (traced) hyperparameter; ``options``: mergekit
    fixed options with their mergekit defaults; ``translate(options, has_base)`` -> factory kwargs;
    ``hp_defaults``: mergekit defaults of the traced hyperparameters (override jmerge's).
    """

    jm: str
    base: str  # "required" | "optional" | "none"
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    translate: Any = None
    hp_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ignored: frozenset = frozenset({"int8_mask"})
    max_models: Optional[int] = None


def _consensus_kw(o):
    return {"reduce": "mean", "normalize_by": "weight"} if o["normalize"] else {"reduce": "sum"}


def _rescale_kw(o):
    return {"rescale": "l1" if o["rescale"] else "none"}


def _no_rescale(name):
    def check(o):
        if o["rescale"]:
            raise ValueError(f"'rescale: true' with {name} (magnitude trimming) is not supported by jmerge; "
                             "drop it or use dare_*/della")
        return {}
    return check


_GTA = {"weight": "weight", "density": "density", "lambda": "scale"}
_GTA_HP = {"weight": 1.0, "density": 1.0, "scale": 1.0}


def _gta(jm, normalize, rescale, translate, extra_rename=None, extra_hp=None, ignored=("int8_mask",)):
    return _MK(jm, "required", {**_GTA, **(extra_rename or {})}, {"normalize": normalize, "rescale": rescale},
               translate, {**_GTA_HP, **(extra_hp or {})}, frozenset(ignored))


MERGEKIT_METHODS: dict[str, _MK] = {
    "linear": _MK("linear", "none", {"weight": "weight"}, {"normalize": True},
                  lambda o, b: {"normalize": bool(o["normalize"])}, {"weight": 1.0}),
    "task_arithmetic": _gta("task_arithmetic", False, False,
                            lambda o, b: {"normalize": bool(o["normalize"]), **_no_rescale("task_arithmetic")(o)},
                            ignored=("int8_mask", "density")),
    "ties": _gta("ties", True, False, lambda o, b: {"scope": "tensor", "weighted": True, "rounding": "floor",
                                                     "sign_method": "sum", **_consensus_kw(o),
                                                     **_no_rescale("ties")(o)}),
    "dare_ties": _gta("dare_ties", False, True, lambda o, b: {**_consensus_kw(o), **_rescale_kw(o)}),
    "dare_linear": _gta("dare_linear", False, True, lambda o, b: {"normalize": bool(o["normalize"]),
                                                                  **_rescale_kw(o)}),
    "breadcrumbs": _gta("breadcrumbs", False, False,
                        lambda o, b: {"normalize": bool(o["normalize"]), "rounding": "floor",
                                      **_no_rescale("breadcrumbs")(o)},
                        {"gamma": "gamma"}, {"gamma": 0.01}),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", False, False,
                             lambda o, b: {"rounding": "floor", **_consensus_kw(o), **_no_rescale("breadcrumbs")(o)},
                             {"gamma": "gamma"}, {"gamma": 0.01}),
    "della": _gta("della", True, True, lambda o, b: {**_consensus_kw(o), **_rescale_kw(o)},
                  {"epsilon": "epsilon"}, {"epsilon": 0.15}),
    "della_linear": _gta("della_linear", False, True, lambda o, b: {"normalize": bool(o["normalize"]),
                                                                    **_rescale_kw(o)},
                         {"epsilon": "epsilon"}, {"epsilon": 0.15}),
    "slerp": _MK("slerp", "required", {"t": "t"}, max_models=1),
    "nearswap": _MK("nearswap", "required", {"t": "t"}, max_models=1),
    "nuslerp": _MK("nuslerp", "optional", {"weight": "weight"}, {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                   lambda o, b: {"flatten": bool(o["nuslerp_flatten"]), "row_wise": bool(o["nuslerp_row_wise"]),
                                 "base_relative": b}, {"weight": 1.0}, max_models=2),
    "multislerp": _MK("multislerp", "optional", {"weight": "weight", "eps": "eps"}, {"normalize_weights": True},
                      lambda o, b: {"normalize_weights": bool(o["normalize_weights"]), "base_relative": b},
                      {"weight": 1.0, "eps": 1e-8}),
    "karcher": _MK("karcher", "none", {"tol": "tol"}, {"max_iter": 10},
                   lambda o, b: {"max_iter": int(o["max_iter"])}, {"tol": 1e-5}),
    "model_stock": _MK("model_stock", "required", {}, {"filter_wise": False},
                       lambda o, b: {"filter_wise": bool(o["filter_wise"])}),
    "sce": _MK("sce", "required", {"select_topk": "density"}, {}, lambda o, b: {"rounding": "floor"},
               {"density": 1.0}),
}
"""mergekit method name -> how it maps to a jmerge method (``passthrough`` is handled separately)."""


# --------------------------------------------------------------------------------------------
# YAML locations


def _node_at(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The YAML node at a pydantic/location path (keys and list indices); the deepest found."""
    for k in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for kn, vn in node.value:
                if kn.value == k:
                    nxt = vn
                    break
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            node = node.value[k]
        else:
            return node
    return node


def _key_node_at(node, loc):
    """For an unknown key: the key node itself (its line), else the value node."""
    parent = _node_at(node, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for kn, _ in parent.value:
            if kn.value == loc[-1]:
                return kn
    return _node_at(node, loc)


class _Ctx:
    def __init__(self, source: str, root: yaml.Node | None):
        self.source, self.root = source, root

    def where(self, loc: tuple, key: bool = False) -> str:
        n = _key_node_at(self.root, loc) if key else _node_at(self.root, loc)
        if n is None:
            return f"{self.source}"
        m = n.start_mark
        return f"{self.source}:{m.line + 1}:{m.column + 1}"

    def error(self, loc: tuple, msg: str, key: bool = False) -> ConfigError:
        path = ".".join(str(x) for x in loc) or "<top>"
        return ConfigError(f"{self.where(loc, key)}: {path}: {msg}")


# --------------------------------------------------------------------------------------------
# Parameter values


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(ctx: _Ctx, loc: tuple, v: Any) -> Any:
    """Validate a parameter setting and convert it to a jmerge spec."""
    allowed = ("a number, a boolean, a list of numbers (per-layer gradient) or a list of "
               "{filter, value} entries")
    if isinstance(v, bool) or _is_num(v):
        return v
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if not v:
            raise ctx.error(loc, f"empty list; give {allowed}.")
        if all(_is_num(x) for x in v):
            return Gradient([float(x) for x in v])
        if all(isinstance(x, dict) for x in v):
            rules = []
            for i, r in enumerate(v):
                extra = set(r) - {"filter", "value"}
                if extra or "value" not in r:
                    raise ctx.error(loc + (i,), f"a filtered value is {{filter: <substring>, value: ...}}; "
                                    f"got keys {sorted(r)}.")
                f = r.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ctx.error(loc + (i, "filter"), f"filter must be a string, got {f!r}.")
                inner = _check_value(ctx, loc + (i, "value"), r["value"])
                if isinstance(inner, Rules):
                    raise ctx.error(loc + (i, "value"), "filtered values cannot nest filters.")
                rules.append(("" if f in (None, "*") else f, inner))
            return Rules(rules, default=None, allow_unused=True)
        raise ctx.error(loc, f"mixed list {v!r}; give {allowed}.")
    raise ctx.error(loc, f"cannot use {v!r} ({type(v).__name__}); give {allowed}.")


def _constant(spec):
    """The constant value of a spec, or raise TypeError when it varies by layer or tensor."""
    if isinstance(spec, (bool, int, float)):
        return spec
    if isinstance(spec, Rules) and len(spec.rules) == 1 and spec.rules[0][0] == "":
        return _constant(spec.rules[0][1])
    raise TypeError


# --------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class MergePlan:
    """A validated config resolved to jmerge terms (nothing is read yet).

    Attributes:
      config: the parsed :class:`MergeConfig`.
      method_name: jmerge method name (``passthrough`` for slice configs).
      factory_kwargs: static keyword arguments of the method factory.
      hparams: hyperparameter specs for :func:`jmerge.prepare_leaf_hparams`.
      base: path of the base model, or None when the method merges models directly (then the base
        is zero and the output is the merge of the models themselves).
      models: paths of the merged models (the base excluded).
      slices: for passthrough: ``[(model_path, start, end)]`` in output order.
      yaml_text: the config text (for the model card).
      source: where the config came from (for messages).
    """

    config: MergeConfig
    method_name: str
    factory_kwargs: dict
    hparams: dict
    base: Optional[str]
    models: list[str]
    slices: Optional[list[tuple[str, int, int]]]
    yaml_text: str
    source: str
    mergekit_name: Optional[str] = None

    @property
    def seed(self) -> int:
        return self.config.seed

    def build(self):
        """The jmerge ``Transform`` of this plan (None for passthrough)."""
        if self.method_name == "passthrough":
            return None
        import jmerge
        return jmerge.available_methods()[self.method_name](**self.factory_kwargs)


def _resolve_path(p: str, cfg_dir: str) -> str:
    if os.path.isabs(p) or os.path.exists(p) or not cfg_dir:
        return p
    cand = os.path.join(cfg_dir, p)
    return cand if os.path.exists(cand) else p


def _factory_params(factory) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def parse_config(text: str, source: str = "<config>", cfg_dir: str = "",
                 methods: Mapping[str, Any] | None = None) -> MergePlan:
    """Validate a YAML config and resolve it into a :class:`MergePlan`.

    Args:
      text: the YAML text.
      source: file name used in error messages.
      cfg_dir: directory that relative model paths may be relative to (tried after the cwd).
      methods: method registry (default :func:`jmerge.available_methods`).

    Raises:
      ConfigError: with ``source:line:column``, the offending field and what is allowed.
    """
    if methods is None:
        import jmerge
        methods = jmerge.available_methods()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    ctx = _Ctx(source, root)
    if not isinstance(data, dict):
        raise ctx.error((), "a merge config is a mapping with at least `merge_method` and `models` or `slices`.")
    fields = set(MergeConfig.model_fields)
    for k in data:
        if k not in fields:
            raise ctx.error((k,), f"unknown field '{k}'; allowed fields: {sorted(fields)}.", key=True)
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            parent = _node_at(root, loc[:-1])
            allowed = ""
            if isinstance(parent, yaml.MappingNode):
                allowed = {"models": "model, parameters", "slices": "sources, base_model, parameters, residual_weight",
                           "sources": "model, layer_range, parameters"}.get(
                    next((str(x) for x in reversed(loc[:-1]) if isinstance(x, str)), ""), "")
            raise ctx.error(loc, f"unknown field '{loc[-1]}'" + (f"; allowed: {allowed}." if allowed else "."),
                            key=True) from None
        if err["type"] == "missing":
            raise ctx.error(loc[:-1], f"missing required field '{loc[-1]}'.") from None
        raise ctx.error(loc, f"{err['msg']} (got {err.get('input')!r}).") from None

    mname = cfg.merge_method
    mk = MERGEKIT_METHODS.get(mname)
    jm_name = mk.jm if mk else mname
    if mname != "passthrough" and jm_name not in methods:
        known = sorted(set(methods) | {k for k, v in MERGEKIT_METHODS.items() if v.jm in methods} | {"passthrough"})
        missing = f" (mergekit's '{mname}' maps to jmerge '{jm_name}', not available in this build)" if mk else ""
        raise ctx.error(("merge_method",), f"unknown merge method '{mname}'{missing}; available: {', '.join(known)}.")

    # ---------------- slices (passthrough / frankenmerge)
    if cfg.slices is not None:
        if cfg.models:
            raise ctx.error(("models",), "give either `models` or `slices`, not both.", key=True)
        if mname != "passthrough":
            raise ctx.error(("slices",), f"`slices` configs are supported with merge_method passthrough only "
                            f"(got '{mname}'); use `models` for per-tensor merges.", key=True)
        slices = []
        for i, s in enumerate(cfg.slices):
            if len(s.sources) != 1:
                raise ctx.error(("slices", i, "sources"), f"passthrough takes exactly one source per slice, "
                                f"got {len(s.sources)}.")
            src = s.sources[0]
            a, b = src.layer_range
            if not (0 <= a < b):
                raise ctx.error(("slices", i, "sources", 0, "layer_range"),
                                f"layer_range must be [start, end) with 0 <= start < end, got {[a, b]}.")
            for k, v in (src.parameters or {}).items():
                if k != "scale":
                    raise ctx.error(("slices", i, "sources", 0, "parameters", k),
                                    f"unknown parameter '{k}' for passthrough; allowed: scale.", key=True)
                _check_value(ctx, ("slices", i, "sources", 0, "parameters", k), v)
            slices.append((_resolve_path(src.model, cfg_dir), a, b))
        return MergePlan(cfg, "passthrough", {}, dict(cfg.parameters or {}), None, [s[0] for s in slices],
                         slices, text, source, mname)

    if not cfg.models:
        raise ctx.error(("merge_method",) if cfg.models is None else ("models",),
                        "missing `models` (a list of {model: <path>, parameters: {...}}) or `slices`.")

    # ---------------- models and base
    entries = list(enumerate(cfg.models))
    base_policy = mk.base if mk else "required"
    if mname == "passthrough":
        if len(entries) != 1:
            raise ctx.error(("models",), f"passthrough takes exactly one model, got {len(entries)}.")
        for k, v in {**(cfg.parameters or {}), **(entries[0][1].parameters or {})}.items():
            if k != "scale":
                raise ctx.error(("parameters", k), f"unknown parameter '{k}' for passthrough; allowed: scale.",
                                key=True)
        params = {k: _check_value(ctx, ("parameters", k), v) for k, v in (cfg.parameters or {}).items()}
        params.update({k: _check_value(ctx, ("models", 0, "parameters", k), v)
                       for k, v in (entries[0][1].parameters or {}).items()})
        path = _resolve_path(entries[0][1].model, cfg_dir)
        return MergePlan(cfg, "passthrough", {}, params, None, [path], [(path, 0, 1 << 30)], text, source, mname)
    base = cfg.base_model
    if base_policy == "required" and base is None:
        raise ctx.error(("merge_method",), f"method '{mname}' needs `base_model` (the model the task vectors "
                        "are taken from).")
    if base is not None and base_policy != "none":
        entries = [(i, e) for i, e in entries if e.model != base]
    if not entries:
        raise ctx.error(("models",), "no models to merge besides the base model.")
    max_models = mk.max_models if mk else None
    if max_models is not None and len(entries) > max_models:
        raise ctx.error(("models",), f"method '{mname}' merges at most {max_models} model(s) besides the base; "
                        f"got {len(entries)}.")

    # ---------------- parameters
    factory = methods[jm_name]
    try:
        probe = factory()
    except Exception:  # noqa: BLE001 - every factory must work without arguments; be lenient here
        probe = None
    traced_names = set(getattr(probe, "hparams", {}) or {})
    fparams = _factory_params(factory)
    has_base = base is not None and base_policy != "none"
    top = {k: (_check_value(ctx, ("parameters", k), v), ("parameters", k)) for k, v in (cfg.parameters or {}).items()}
    per = [{k: (_check_value(ctx, ("models", i, "parameters", k), v), ("models", i, "parameters", k))
            for k, v in (e.parameters or {}).items()} for i, e in entries]
    names = list(dict.fromkeys([*top, *[k for d in per for k in d]]))
    if mk is not None:
        allowed = sorted(set(mk.rename) | set(mk.options) | set(mk.ignored))
    else:
        allowed = sorted(traced_names | (fparams - {"self"}))

    def first_loc(k):
        return top[k][1] if k in top else next(d[k][1] for d in per if k in d)

    def constant_of(k):
        vals = set()
        for d in [top, *per]:
            if k in d:
                try:
                    vals.add(_constant(d[k][0]))
                except TypeError:
                    raise ctx.error(d[k][1], f"'{k}' is a fixed option of '{mname}': give one value, not a "
                                    "gradient or filter list.") from None
        if len(vals) > 1:
            raise ctx.error(first_loc(k), f"'{k}' is a fixed option of '{mname}': every model must use the same "
                            f"value, got {sorted(vals, key=str)}.")
        return vals.pop()

    factory_kwargs: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    options: dict[str, Any] = dict(mk.options) if mk is not None else {}
    hp_defaults = dict(mk.hp_defaults) if mk is not None else {}
    for k in names:
        if mk is not None and k in mk.ignored:
            continue
        if mk is not None:
            if k in mk.options:
                options[k] = constant_of(k)
                continue
            if k not in mk.rename:
                raise ctx.error(first_loc(k), f"unknown parameter '{k}' for method '{mname}'; allowed: "
                                f"{', '.join(allowed) or '(none)'}.", key=True)
            jk = mk.rename[k]
        else:
            if k in traced_names:
                jk = k
            elif k in fparams:
                factory_kwargs[k] = constant_of(k)
                continue
            else:
                raise ctx.error(first_loc(k), f"unknown parameter '{k}' for method '{mname}'; allowed: "
                                f"{', '.join(allowed) or '(none)'}.", key=True)
        if jk not in traced_names:
            raise ctx.error(first_loc(k), f"parameter '{k}' of '{mname}' maps to '{jk}', which jmerge's "
                            f"'{jm_name}' does not take (it takes {sorted(traced_names)}).", key=True)
        if k in top and not any(k in d for d in per):
            hparams[jk] = top[k][0]
        else:
            dflt = top[k][0] if k in top else hp_defaults.get(jk, (probe.hparams.get(jk) if probe else None))
            hparams[jk] = PerModel([d[k][0] if k in d else dflt for d in per])
    for jk, v in hp_defaults.items():
        if jk in traced_names:
            hparams.setdefault(jk, v)
    if mk is not None and mk.translate is not None:
        try:
            factory_kwargs.update(mk.translate(options, has_base))
        except ValueError as e:
            raise ctx.error(("parameters",), str(e)) from None
    if cfg.scope is not None:
        if "scope" not in fparams:
            raise ctx.error(("scope",), f"method '{mname}' has no `scope` option (jmerge's '{jm_name}' takes "
                            f"{sorted(fparams)}).")
        factory_kwargs["scope"] = cfg.scope
    if mname == "slerp" and "t" not in hparams:
        raise ctx.error(("parameters",) if cfg.parameters is not None else ("merge_method",),
                        "slerp needs parameter 't' (interpolation factor: 0 = base, 1 = the other model).")
    try:
        method = factory(**factory_kwargs)
    except (TypeError, ValueError) as e:
        raise ctx.error(("parameters",), f"invalid options for '{jm_name}': {e}") from None
    n_models = len(entries)
    if n_models < method.min_models:
        raise ctx.error(("models",), f"method '{mname}' needs at least {method.min_models} model(s) besides the "
                        f"base; got {n_models}.")
    if method.max_models is not None and n_models > method.max_models:
        raise ctx.error(("models",), f"method '{mname}' merges at most {method.max_models} model(s) besides "
                        f"the base; got {n_models}.")
    use_base = base if base_policy != "none" else None
    return MergePlan(cfg, jm_name if mname != "passthrough" else "passthrough", factory_kwargs, hparams,
                     _resolve_path(use_base, cfg_dir) if use_base else None,
                     [_resolve_path(e.model, cfg_dir) for _, e in entries], None, text, source, mname)


def _safe_const(spec):
    try:
        return _constant(spec)
    except TypeError:
        return object()


def load_config(path: str, methods: Mapping[str, Any] | None = None) -> MergePlan:
    """Read and validate a YAML merge config file (see :func:`parse_config`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    return parse_config(text, source=path, cfg_dir=os.path.dirname(os.path.abspath(path)), methods=methods)
