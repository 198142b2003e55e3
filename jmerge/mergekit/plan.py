"""A merge config resolved into a :class:`MergePlan`, in stages.

:func:`parse_config` runs: load the YAML with node locations -> validate the schema -> resolve the
method -> resolve the inputs (base and models, or slices) -> resolve the parameters -> build the
plan. Every stage stops at the first error, which names ``file:line:column``, the field and what is
allowed, BEFORE any tensor is read. Passthrough (layer slices, no per-tensor merge) is resolved
entirely by the inputs stage, parameters included. ``slices`` with any other method become a
:class:`SliceMerge`: each output slice merges the same-offset layers of its sources, with per-slice
base models and per-level parameters evaluated per tensor as mergekit evaluates them (the layer
ranges are checked against the models' layer counts when the checkpoints are opened).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

from .methods import MERGEKIT_METHODS, PASSTHROUGH, _known_methods, _Method
from ..core import MergeInputError, PerModel
from .params import SliceParameters, _check_value, _resolve_parameters, _resolve_slice_parameters
from .schema import ConfigError, Loc, MergeConfig, ModelEntry, SliceDef, _Ctx, _load_yaml, _validate_config

__all__ = ["MergePlan", "SliceInput", "MergeSlice", "SliceMerge", "parse_config", "load_config"]

_ALL_LAYERS = 1 << 30  # the layer range of a single-model passthrough


def _located_text(ctx: _Ctx, loc: Loc) -> str:
    """``file:line:column: dotted.path`` of a location, the prefix of errors raised after parsing."""
    return f"{ctx.where(loc)}: {'.'.join(str(x) for x in loc)}"


@dataclasses.dataclass(frozen=True)
class SliceInput:
    """One source of a slice: a model and its half-open layer range ``[start, end)``.

    Attributes:
      model: the model as written in the config.
      path: its resolved path.
      start: first layer.
      end: one past the last layer (checked against the model's layer count by the planner).
      where: ``file:line:column: slices.i.sources.j.layer_range`` (for errors found later).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    model: str
    path: str
    start: int
    end: int
    where: str


@dataclasses.dataclass(frozen=True)
class MergeSlice:
    """One output slice of a ``slices`` merge: its sources (equal layer counts) and which one is the base.

    Attributes:
      inputs: the sources in config order.
      base: index of the base model among ``inputs`` (None: the method merges the sources directly).
      where: ``file:line:column: slices.i`` (for errors found later).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    inputs: tuple
    base: Optional[int]
    where: str

    @property
    def length(self) -> int:
        """Layers in this slice (the same for every source)."""
        return self.inputs[0].end - self.inputs[0].start

    @property
    def models(self) -> tuple:
        """Indices of the merged models (the base excluded), in config order."""
        return tuple(j for j in range(len(self.inputs)) if j != self.base)


@dataclasses.dataclass(frozen=True)
class SliceMerge:
    """A ``slices`` config with a per-tensor method, as mergekit plans it.

    Output layer ``k`` of slice ``i`` (``0 <= k < length``) merges layer ``start + k`` of each source
    of slice ``i``, with gradients evaluated at ``t = k / (length - 1)`` (``t = 1`` for a one-layer
    slice). Tensors outside the layers merge at ``t = 0``: embeddings with the first slice's sources
    and parameters, the final norm and the head with the last slice's (its first ``post_inputs``
    sources: mergekit pairs them with the first slice's source count).

    Attributes:
      slices: the output slices in order.
      params: the parameters per level (:class:`~jmerge.mergekit.params.SliceParameters`).
      post_inputs: how many of the last slice's sources merge the tensors after the layers.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    slices: tuple
    params: SliceParameters
    post_inputs: int

    def tensor_hparams(self, slice_index: int, out_name: str, inputs: Any, t: float) -> dict[str, Any]:
        """Hyperparameter specs of one output tensor: numbers, and :class:`~jmerge.PerModel` per-model values.

        Args:
          slice_index: the slice whose parameters apply.
          out_name: the output tensor name (filters of shared parameters see it).
          inputs: ``(source index, input tensor name)`` of each merged model, in order (filters of
            per-model parameters see the input name, as in mergekit).
          t: the gradient position.

        Raises:
          MergeInputError: a required parameter applies to no level at this tensor.

        References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
        (EMNLP 2024 industry track).
        """
        p, out = self.params, {}
        for name in p.names:
            if name in p.per_model:
                vals = [p.value(slice_index, name, tname, t, j) for j, tname in inputs]
            else:
                vals = [p.value(slice_index, name, out_name, t)]
            if any(v is None for v in vals):
                what = p.required.get(name, name)
                raise MergeInputError(
                    f"{self.slices[slice_index].where}: no setting of '{what}' applies to tensor '{out_name}' (its "
                    "filters miss it and it has no default); add an entry without filter (`- value: ...`).")
            out[name] = PerModel(vals) if name in p.per_model else vals[0]
        return out


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
      models: paths of the merged models (the base excluded; for ``slices`` merges every source model
        that is not the top-level base, in order of appearance).
      slices: the output layer layout: for passthrough ``[(model_path, start, end)]`` in output order;
        for a ``slices`` merge each slice's first source and its range (all sources are in
        ``slice_merge``). None for a ``models`` merge.
      yaml_text: the config text (for the model card).
      source: where the config came from (for messages).
      mergekit_name: the method name as written in the config.
      slice_params: for passthrough: each slice's own parameters (``scale``) as jmerge specs, one
        dict per slice; a setting a slice lacks falls back to ``hparams`` (the top level). A
        single-model passthrough has one dict: its top-level and model parameters merged.
      slice_where: for passthrough ``slices``: each slice's ``file:line:column: slices.i...layer_range``
        (None for the implicit all-layers slice of a single-model passthrough).
      slice_merge: for ``slices`` with a per-tensor method: the slices, bases and parameters.

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
    slice_where: Optional[list[Optional[str]]] = None
    slice_merge: Optional[SliceMerge] = None

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
    slices: Optional[list[tuple[str, int, int]]] = None  # the output layout, as MergePlan.slices
    slice_params: Optional[list[dict]] = None  # passthrough only, as the two below
    hparams: Optional[dict] = None
    slice_where: Optional[list[Optional[str]]] = None
    slice_merge: Optional[list[MergeSlice]] = None  # slices with a per-tensor method


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


def _layer_range(ctx: _Ctx, loc: Loc, r: tuple[int, int]) -> tuple[int, int]:
    a, b = r
    if not (0 <= a < b):
        raise ctx.error(loc, f"layer_range must be [start, end) with 0 <= start < end, got {[a, b]}.")
    return a, b


def _slice(ctx: _Ctx, i: int, s: SliceDef, cfg_dir: str) -> tuple[tuple[str, int, int], dict[str, Any]]:
    """One passthrough slice -> ``((model_path, start, end), parameters)``."""
    loc = ("slices", i, "sources")
    if len(s.sources) != 1:
        raise ctx.error(loc, f"passthrough takes exactly one source per slice, got {len(s.sources)}.")
    src = s.sources[0]
    a, b = _layer_range(ctx, loc + (0, "layer_range"), src.layer_range)
    params = _passthrough_params(ctx, loc + (0, "parameters"), src.parameters)
    return (_resolve_path(src.model, cfg_dir), a, b), params


def _slice_inputs(ctx: _Ctx, cfg: MergeConfig, m: _Method, cfg_dir: str) -> _Inputs:
    if cfg.models:
        raise ctx.error(("models",), "give either `models` or `slices`, not both.", key=True)
    if not cfg.slices:
        raise ctx.error(("slices",), "`slices` is empty; give at least one slice.")
    if m.name != PASSTHROUGH:
        return _slice_merge_inputs(ctx, cfg, m, cfg_dir)
    done = [_slice(ctx, i, s, cfg_dir) for i, s in enumerate(cfg.slices)]
    slices = [sl for sl, _ in done]
    where = [_located_text(ctx, ("slices", i, "sources", 0, "layer_range")) for i in range(len(slices))]
    return _Inputs(None, [sl[0] for sl in slices], [], slices=slices, slice_params=[p for _, p in done],
                   hparams=dict(cfg.parameters or {}), slice_where=where)


def _merge_slice(ctx: _Ctx, cfg: MergeConfig, m: _Method, i: int, s: SliceDef, cfg_dir: str) -> MergeSlice:
    """One slice of a per-tensor merge: its sources, equal layer counts, the base among them."""
    loc = ("slices", i)
    if not s.sources:
        raise ctx.error(loc + ("sources",), "a slice needs at least one source.")
    inputs: list[SliceInput] = []
    for j, src in enumerate(s.sources):
        rloc = loc + ("sources", j, "layer_range")
        a, b = _layer_range(ctx, rloc, src.layer_range)
        path = _resolve_path(src.model, cfg_dir)
        if any(x.path == path for x in inputs):
            raise ctx.error(loc + ("sources", j, "model"), f"model '{src.model}' is a source of this slice twice; a "
                            "slice merges each model once (mergekit refuses duplicate inputs too).")
        inputs.append(SliceInput(src.model, path, a, b, _located_text(ctx, rloc)))
    lengths = [x.end - x.start for x in inputs]
    if len(set(lengths)) > 1:
        ranges = ", ".join(f"{x.model} {[x.start, x.end]}" for x in inputs)
        raise ctx.error(loc + ("sources",), f"every source of a slice must span the same number of layers; got "
                        f"{lengths} ({ranges}).")
    base, policy = (s.base_model if s.base_model is not None else cfg.base_model), m.base_policy
    base_i = None
    if policy == "required" and base is None:
        raise ctx.error(loc, f"method '{m.name}' needs a base model: set `base_model` (at the top level or in this "
                        "slice) and list it among the slice's sources.")
    if base is not None and policy != "none":
        bpath = _resolve_path(base, cfg_dir)
        base_i = next((j for j, x in enumerate(inputs) if x.path == bpath), None)
        if base_i is None:
            raise ctx.error(loc + ("base_model",) if s.base_model is not None else loc + ("sources",),
                            f"the base model '{base}' is not a source of this slice; add it to `sources` with a "
                            "layer_range (a slice merges its own sources only, as in mergekit).")
    n_models = len(inputs) - (base_i is not None)
    if n_models == 0:
        raise ctx.error(loc + ("sources",), "no models to merge besides the base model in this slice.")
    max_models = m.spec.max_models if m.spec else None
    if max_models is not None and n_models > max_models:
        raise ctx.error(loc + ("sources",), f"method '{m.name}' merges at most {max_models} model(s) besides the "
                        f"base; this slice has {n_models}.")
    return MergeSlice(tuple(inputs), base_i, _located_text(ctx, loc))


def _slice_merge_inputs(ctx: _Ctx, cfg: MergeConfig, m: _Method, cfg_dir: str) -> _Inputs:
    """``slices`` with a per-tensor method: each slice checked; the layout, the top base and all models."""
    slices = [_merge_slice(ctx, cfg, m, i, s, cfg_dir) for i, s in enumerate(cfg.slices)]
    first, last = slices[0], slices[-1]
    n_post = min(len(first.inputs), len(last.inputs))
    kept = [j for j in last.models if j < n_post]
    if n_post < len(last.inputs) and (last.base is not None and last.base >= n_post or not kept):
        raise ctx.error(("slices", len(slices) - 1, "sources"),
                        f"the final norm and head merge the first {n_post} source(s) of the last slice (as many as "
                        "the first slice has, as in mergekit), which leaves out its base or every model; give the "
                        "first and last slices the same sources.")
    top = _resolve_path(cfg.base_model, cfg_dir) if cfg.base_model is not None and m.base_policy != "none" else None
    models = list(dict.fromkeys(x.path for sl in slices for x in sl.inputs if x.path != top))
    layout = [(sl.inputs[0].path, sl.inputs[0].start, sl.inputs[0].end) for sl in slices]
    return _Inputs(top, models, [], has_base=top is not None, slices=layout, slice_merge=slices)


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


def _check_method(ctx: _Ctx, m: _Method, kwargs: dict[str, Any], n_models: int, loc: Loc = ("models",)) -> None:
    """Build the method once: its options must be valid and the model count (of ``loc``) within its limits."""
    try:
        method = m.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ctx.error(("parameters",), f"invalid options for '{m.jm}': {e}") from None
    if n_models < method.min_models:
        raise ctx.error(loc, f"method '{m.name}' needs at least {method.min_models} model(s) besides the "
                        f"base; got {n_models}.")
    if method.max_models is not None and n_models > method.max_models:
        raise ctx.error(loc, f"method '{m.name}' merges at most {method.max_models} model(s) besides "
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
    kwargs, hparams, slice_merge = {}, inputs.hparams, None
    if inputs.slice_merge is not None:  # slices with a per-tensor method
        sls = inputs.slice_merge
        kwargs, sp = _resolve_slice_parameters(ctx, cfg, m, [sl.base is not None for sl in sls])
        for i, sl in enumerate(sls):
            _check_method(ctx, m, kwargs, len(sl.models), ("slices", i, "sources"))
        n_post = min(len(sls[0].inputs), len(sls[-1].inputs))
        counts = [len(sl.models) for sl in sls] + [len([j for j in sls[-1].models if j < n_post])]
        _check_method(ctx, m, kwargs, counts[-1], ("slices", len(sls) - 1, "sources"))
        if len(set(counts)) > 1 and m.factory(**kwargs).stats:
            raise ctx.error(("scope",) if cfg.scope is not None else ("merge_method",),
                            f"'{m.jm}' with these options collects whole-model statistics, which needs the same "
                            f"number of merged models in every slice; the slices merge {counts[:-1]}.")
        hparams, slice_merge = dict(sp.top), SliceMerge(tuple(sls), sp, n_post)
    elif inputs.slices is None:  # a per-tensor merge
        kwargs, hparams = _resolve_parameters(ctx, cfg, m, inputs.entries, inputs.has_base)
        _check_method(ctx, m, kwargs, len(inputs.entries))
    return MergePlan(cfg, m.jm, kwargs, hparams, inputs.base, inputs.models, inputs.slices, text, source, m.name,
                     inputs.slice_params, inputs.slice_where, slice_merge)


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
