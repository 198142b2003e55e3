"""A merge config resolved into a :class:`MergePlan`, in stages.

:func:`parse_config` runs: load the YAML with node locations -> validate the schema -> resolve the
method -> resolve the inputs (base and models, or passthrough slices) -> resolve the parameters ->
build the plan. Every stage stops at the first error, which names ``file:line:column``, the field
and what is allowed, BEFORE any tensor is read. Passthrough (layer slices, no per-tensor merge) is
resolved entirely by the inputs stage, parameters included.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

from .methods import MERGEKIT_METHODS, PASSTHROUGH, _known_methods, _Method
from .params import _check_value, _resolve_parameters
from .schema import ConfigError, Loc, MergeConfig, ModelEntry, SliceDef, _Ctx, _load_yaml, _validate_config

__all__ = ["MergePlan", "parse_config", "load_config"]

_ALL_LAYERS = 1 << 30  # the layer range of a single-model passthrough


@dataclasses.dataclass
class MergePlan:
    """A validated config resolved to jmerge terms (nothing is read yet).

    Attributes:
      config: the parsed :class:`MergeConfig`.
      method_name: jmerge method name (``passthrough`` for slice configs).
      factory_kwargs: static keyword arguments of the method factory.
      hparams: hyperparameter specs for :func:`jmerge.prepare_leaf_hparams` (passthrough: the
        top-level ``parameters``, and for a single-model passthrough its converted parameters).
      base: path of the base model, or None when the method merges models directly (then the base
        is zero and the output is the merge of the models themselves).
      models: paths of the merged models (the base excluded).
      slices: for passthrough: ``[(model_path, start, end)]`` in output order.
      yaml_text: the config text (for the model card).
      source: where the config came from (for messages).
      mergekit_name: the method name as written in the config.
      slice_params: for passthrough: each slice's own parameters (``scale``) as jmerge specs, one
        dict per slice; a setting a slice lacks falls back to ``hparams`` (the top level). A
        single-model passthrough has one dict: its top-level and model parameters merged.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
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
    slice_params: Optional[list[dict]] = None

    @property
    def seed(self) -> int:
        """The config's random seed (jmerge extra ``seed``, default 0)."""
        return self.config.seed

    def build(self) -> Any:
        """The jmerge ``Transform`` of this plan (None for passthrough)."""
        if self.method_name == PASSTHROUGH:
            return None
        from ..methods import METHODS  # noqa: PLC0415 - the registry, loaded when a plan is built
        return METHODS[self.method_name](**self.factory_kwargs)


@dataclasses.dataclass
class _Inputs:
    """What a config merges: paths resolved, and the merged models' config entries."""

    base: Optional[str]
    models: list[str]
    entries: list[tuple[int, ModelEntry]]  # (index in `models`, entry), the base excluded
    has_base: bool = False
    slices: Optional[list[tuple[str, int, int]]] = None  # passthrough only, as the two below
    slice_params: Optional[list[dict]] = None
    hparams: Optional[dict] = None


def _resolve_path(p: str, cfg_dir: str) -> str:
    if os.path.isabs(p) or os.path.exists(p) or not cfg_dir:
        return p
    cand = os.path.join(cfg_dir, p)
    return cand if os.path.exists(cand) else p


def _registry(methods: Mapping[str, Callable[..., Any]] | None) -> Mapping[str, Callable[..., Any]]:
    if methods is not None:
        return methods
    from ..methods import METHODS  # noqa: PLC0415
    return METHODS


# --------------------------------------------------------------------------------------------
# Stage 3: the method


def _resolve_method(ctx: _Ctx, cfg: MergeConfig, methods: Mapping[str, Callable[..., Any]]) -> _Method:
    name = cfg.merge_method
    if name == PASSTHROUGH:
        return _Method(name, PASSTHROUGH, None, None)
    spec = MERGEKIT_METHODS.get(name)
    jm = spec.jm if spec else name
    if jm not in methods:
        missing = f" (mergekit's '{name}' maps to jmerge '{jm}', not available in this build)" if spec else ""
        raise ctx.error(("merge_method",), f"unknown merge method '{name}'{missing}; "
                        f"available: {', '.join(_known_methods(methods))}.")
    return _Method(name, jm, spec, methods[jm])


# --------------------------------------------------------------------------------------------
# Stage 4: the inputs (the one place that handles passthrough)


def _resolve_inputs(ctx: _Ctx, cfg: MergeConfig, m: _Method, cfg_dir: str) -> _Inputs:
    if cfg.slices is not None:
        return _slice_inputs(ctx, cfg, m, cfg_dir)
    if not cfg.models:
        raise ctx.error(("merge_method",) if cfg.models is None else ("models",),
                        "missing `models` (a list of {model: <path>, parameters: {...}}) or `slices`.")
    if m.name == PASSTHROUGH:
        return _single_model_inputs(ctx, cfg, cfg_dir)
    return _merge_inputs(ctx, cfg, m, cfg_dir)


def _scale_name(ctx: _Ctx, loc: Loc, k: str) -> None:
    if k != "scale":
        raise ctx.error(loc + (k,), f"unknown parameter '{k}' for passthrough; allowed: scale.", key=True)


def _passthrough_params(ctx: _Ctx, loc: Loc, params: Optional[dict]) -> dict[str, Any]:
    """Passthrough's parameters (``scale`` only) as jmerge specs."""
    out = {}
    for k, v in (params or {}).items():
        _scale_name(ctx, loc, k)
        out[k] = _check_value(ctx, loc + (k,), v)
    return out


def _slice(ctx: _Ctx, i: int, s: SliceDef, cfg_dir: str) -> tuple[tuple[str, int, int], dict[str, Any]]:
    """One passthrough slice -> ``((model_path, start, end), parameters)``."""
    loc = ("slices", i, "sources")
    if len(s.sources) != 1:
        raise ctx.error(loc, f"passthrough takes exactly one source per slice, got {len(s.sources)}.")
    src = s.sources[0]
    a, b = src.layer_range
    if not (0 <= a < b):
        raise ctx.error(loc + (0, "layer_range"),
                        f"layer_range must be [start, end) with 0 <= start < end, got {[a, b]}.")
    params = _passthrough_params(ctx, loc + (0, "parameters"), src.parameters)
    return (_resolve_path(src.model, cfg_dir), a, b), params


def _slice_inputs(ctx: _Ctx, cfg: MergeConfig, m: _Method, cfg_dir: str) -> _Inputs:
    if cfg.models:
        raise ctx.error(("models",), "give either `models` or `slices`, not both.", key=True)
    if m.name != PASSTHROUGH:
        raise ctx.error(("slices",), f"`slices` configs are supported with merge_method passthrough only "
                        f"(got '{m.name}'); use `models` for per-tensor merges.", key=True)
    done = [_slice(ctx, i, s, cfg_dir) for i, s in enumerate(cfg.slices)]
    slices = [sl for sl, _ in done]
    return _Inputs(None, [sl[0] for sl in slices], [], slices=slices, slice_params=[p for _, p in done],
                   hparams=dict(cfg.parameters or {}))


def _single_model_inputs(ctx: _Ctx, cfg: MergeConfig, cfg_dir: str) -> _Inputs:
    """A passthrough of one model: all its layers, with top-level and model parameters merged."""
    if len(cfg.models) != 1:
        raise ctx.error(("models",), f"passthrough takes exactly one model, got {len(cfg.models)}.")
    entry = cfg.models[0]
    sources = [(("parameters",), cfg.parameters), (("models", 0, "parameters"), entry.parameters)]
    for loc, params in sources:
        for k in params or {}:
            _scale_name(ctx, loc, k)
    merged = {k: v for loc, params in sources for k, v in _passthrough_params(ctx, loc, params).items()}
    path = _resolve_path(entry.model, cfg_dir)
    return _Inputs(None, [path], [], slices=[(path, 0, _ALL_LAYERS)], slice_params=[dict(merged)], hparams=merged)


def _merge_inputs(ctx: _Ctx, cfg: MergeConfig, m: _Method, cfg_dir: str) -> _Inputs:
    """A per-tensor merge: the base (per the method's policy) and the models besides it."""
    base, policy = cfg.base_model, m.base_policy
    if policy == "required" and base is None:
        raise ctx.error(("merge_method",), f"method '{m.name}' needs `base_model` (the model the task vectors "
                        "are taken from).")
    has_base = base is not None and policy != "none"
    entries = [(i, e) for i, e in enumerate(cfg.models) if not (has_base and e.model == base)]
    if not entries:
        raise ctx.error(("models",), "no models to merge besides the base model.")
    max_models = m.spec.max_models if m.spec else None
    if max_models is not None and len(entries) > max_models:
        raise ctx.error(("models",), f"method '{m.name}' merges at most {max_models} model(s) besides the base; "
                        f"got {len(entries)}.")
    use_base = base if policy != "none" else None
    return _Inputs(_resolve_path(use_base, cfg_dir) if use_base else None,
                   [_resolve_path(e.model, cfg_dir) for _, e in entries], entries, has_base)


# --------------------------------------------------------------------------------------------
# Stage 6: the method instance (checked), and the plan


def _check_method(ctx: _Ctx, m: _Method, kwargs: dict[str, Any], n_models: int) -> None:
    """Build the method once: its options must be valid and the model count within its limits."""
    try:
        method = m.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ctx.error(("parameters",), f"invalid options for '{m.jm}': {e}") from None
    if n_models < method.min_models:
        raise ctx.error(("models",), f"method '{m.name}' needs at least {method.min_models} model(s) besides the "
                        f"base; got {n_models}.")
    if method.max_models is not None and n_models > method.max_models:
        raise ctx.error(("models",), f"method '{m.name}' merges at most {method.max_models} model(s) besides "
                        f"the base; got {n_models}.")


def parse_config(text: str, source: str = "<config>", cfg_dir: str = "",
                 methods: Mapping[str, Callable[..., Any]] | None = None) -> MergePlan:
    """Validate a YAML config and resolve it into a :class:`MergePlan`.

    Args:
      text: the YAML text.
      source: file name used in error messages.
      cfg_dir: directory that relative model paths may be relative to (tried after the cwd).
      methods: method registry (default :func:`jmerge.available_methods`).

    Returns:
      The plan: method, factory arguments, hyperparameter specs, base, models or slices.

    Raises:
      ConfigError: with ``source:line:column``, the offending field and what is allowed.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    data, ctx = _load_yaml(text, source)
    cfg = _validate_config(ctx, data)
    m = _resolve_method(ctx, cfg, _registry(methods))
    inputs = _resolve_inputs(ctx, cfg, m, cfg_dir)
    kwargs, hparams = {}, inputs.hparams
    if inputs.slices is None:  # a per-tensor merge
        kwargs, hparams = _resolve_parameters(ctx, cfg, m, inputs.entries, inputs.has_base)
        _check_method(ctx, m, kwargs, len(inputs.entries))
    return MergePlan(cfg, m.jm, kwargs, hparams, inputs.base, inputs.models, inputs.slices, text, source, m.name,
                     inputs.slice_params)


def load_config(path: str, methods: Mapping[str, Callable[..., Any]] | None = None) -> MergePlan:
    """Read and validate a YAML merge config file.

    Args:
      path: the config file; relative model paths may be relative to its directory.
      methods: method registry (default :func:`jmerge.available_methods`).

    Returns:
      The :class:`MergePlan` (see :func:`parse_config`).

    Raises:
      ConfigError: the file cannot be read, or the config is invalid (with ``path:line:column``).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    return parse_config(text, source=path, cfg_dir=os.path.dirname(os.path.abspath(path)), methods=methods)
