"""The YAML schema of a merge config: loading with node locations, plain dataclasses and their validator.

:func:`_load_yaml` parses the text and keeps the node tree, so that every error can name the
``file:line:column`` of the offending value; :func:`_validate_config` walks the loaded data field by
field (in declaration order, then unknown keys), converts scalars the way mergekit's schema does
(``"3"`` and ``3.0`` are the integer 3, ``1`` is the number 1.0) and stops at the first error.
Parameter values are checked later, by :mod:`jmerge.mergekit.params`.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

import yaml

from ..core import MergeInputError
from .chat_templates import chat_template_problem

__all__ = ["ConfigError", "ModelEntry", "SliceSource", "SliceDef", "MergeConfig"]


class ConfigError(MergeInputError):
    """An invalid merge config; the message starts with ``file:line:column``.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """


# --------------------------------------------------------------------------------------------
# YAML locations

Loc = tuple  # a location path: mapping keys and list indices from the document root


def _node_at(node: yaml.Node | None, loc: Loc) -> yaml.Node | None:
    """The YAML node at a location path (keys and list indices); the deepest one found."""
    for k in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((vn for kn, vn in node.value if kn.value == k), None)
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            node = node.value[k]
        else:
            return node
    return node


def _key_node_at(node: yaml.Node | None, loc: Loc) -> yaml.Node | None:
    """For an unknown key: the key node itself (its line), else the value node."""
    parent = _node_at(node, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for kn, _ in parent.value:
            if kn.value == loc[-1]:
                return kn
    return _node_at(node, loc)


class _Ctx:
    """Locates errors: ``source:line:column: dotted.path: message``."""

    def __init__(self, source: str, root: yaml.Node | None):
        self.source, self.root = source, root

    def where(self, loc: Loc, key: bool = False) -> str:
        n = _key_node_at(self.root, loc) if key else _node_at(self.root, loc)
        if n is None:
            return f"{self.source}"
        m = n.start_mark
        return f"{self.source}:{m.line + 1}:{m.column + 1}"

    def error(self, loc: Loc, msg: str, key: bool = False) -> ConfigError:
        path = ".".join(str(x) for x in loc) or "<top>"
        return ConfigError(f"{self.where(loc, key)}: {path}: {msg}")


def _load_yaml(text: str, source: str) -> tuple[Any, _Ctx]:
    """Parse ``text``: the plain data and a locating context over its node tree."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return data, _Ctx(source, root)


# --------------------------------------------------------------------------------------------
# Scalar and container checks: (ctx, loc, value) -> converted value, or raise ConfigError

Check = Callable[[_Ctx, Loc, Any], Any]


def _type_error(ctx: _Ctx, loc: Loc, msg: str, v: Any) -> ConfigError:
    return ctx.error(loc, f"{msg} (got {v!r}).")


def _str(ctx: _Ctx, loc: Loc, v: Any) -> str:
    if not isinstance(v, str):
        raise _type_error(ctx, loc, "Input should be a valid string", v)
    return v


_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")


def _int(ctx: _Ctx, loc: Loc, v: Any) -> int:
    """An integer; also a boolean, a float without fraction or a string such as ``" 3 "`` or ``"3.0"``."""
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _type_error(ctx, loc, "Input should be a finite number", v)
        if not v.is_integer():
            raise _type_error(ctx, loc, "Input should be a valid integer, got a number with a fractional part", v)
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        if not _INT_TEXT.fullmatch(s):
            raise _type_error(ctx, loc, "Input should be a valid integer, unable to parse string as an integer", v)
        return int(s.split(".")[0])
    raise _type_error(ctx, loc, "Input should be a valid integer", v)


def _float(ctx: _Ctx, loc: Loc, v: Any) -> float:
    """A number; also a boolean or a numeric string."""
    if isinstance(v, str):
        try:
            if not v.isascii():
                raise ValueError
            return float(v)
        except ValueError:
            raise _type_error(ctx, loc, "Input should be a valid number, unable to parse string as a number",
                              v) from None
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            pass
    raise _type_error(ctx, loc, "Input should be a valid number", v)


def _dict(ctx: _Ctx, loc: Loc, v: Any) -> dict[str, Any]:
    """A mapping with string keys (values are checked by their users)."""
    if not isinstance(v, dict):
        raise _type_error(ctx, loc, "Input should be a valid dictionary", v)
    for k in v:
        _str(ctx, loc + (k, "[key]"), k)
    return dict(v)


def _list_of(item: Check) -> Check:
    def check(ctx: _Ctx, loc: Loc, v: Any) -> list:
        if not isinstance(v, list):
            raise _type_error(ctx, loc, "Input should be a valid list", v)
        return [item(ctx, loc + (i,), x) for i, x in enumerate(v)]
    return check


def _int_pair(ctx: _Ctx, loc: Loc, v: Any) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)):
        raise _type_error(ctx, loc, "Input should be a valid tuple", v)
    if len(v) > 2:
        raise _type_error(ctx, loc, f"Tuple should have at most 2 items after validation, not {len(v)}", v)
    out = []
    for i in range(2):
        if i >= len(v):
            raise ctx.error(loc, f"missing required field '{i}'.")
        out.append(_int(ctx, loc + (i,), v[i]))
    return out[0], out[1]


def _optional(check: Check) -> Check:
    return lambda ctx, loc, v: None if v is None else check(ctx, loc, v)


def _record(cls: type) -> Check:
    return lambda ctx, loc, v: _validate_record(cls, ctx, loc, v)


def _tokenizer_block(ctx: _Ctx, loc: Loc, v: Any) -> Any:
    """The ``tokenizer:`` block (:mod:`jmerge.mergekit.tokenizer_schema`, which builds on this module)."""
    from .tokenizer_schema import check_tokenizer  # noqa: PLC0415
    return check_tokenizer(ctx, loc, v)


def _chat_template(ctx: _Ctx, loc: Loc, v: Any) -> str:
    """A template name, ``auto`` or a Jinja template (mergekit's rule tells them apart)."""
    problem = chat_template_problem(_str(ctx, loc, v))
    if problem:
        raise ctx.error(loc, problem)
    return v


def _field(check: Check, **kw: Any) -> Any:
    """A dataclass field validated by ``check``; optional fields default to None."""
    return dataclasses.field(metadata={"check": check}, **kw)


# --------------------------------------------------------------------------------------------
# The schema

@dataclasses.dataclass
class ModelEntry:
    """One entry of ``models``: a model path and its per-model parameters.

    Attributes:
      model: path (or name) of the model.
      parameters: per-model parameter settings (they override the top-level ``parameters``).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    model: str = _field(_str)
    parameters: Optional[dict[str, Any]] = _field(_optional(_dict), default=None)


@dataclasses.dataclass
class SliceSource:
    """One source of a slice: a model and its half-open layer range ``[start, end)``.

    Attributes:
      model: path (or name) of the model.
      layer_range: ``(start, end)`` layer indices; ``end`` at most the model's layer count (checked
        when the model is opened).
      parameters: per-source parameter settings (passthrough: ``scale``; other methods: the per-model
        ones, e.g. ``weight``, ``density``, which take precedence over the slice's and the top level's).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    model: str = _field(_str)
    layer_range: tuple[int, int] = _field(_int_pair)
    parameters: Optional[dict[str, Any]] = _field(_optional(_dict), default=None)


@dataclasses.dataclass
class SliceDef:
    """One entry of ``slices``: its sources and slice options.

    Passthrough takes exactly one source per slice; other methods merge the sources' layers offset by
    offset, so every source spans the same number of layers.

    Attributes:
      sources: the slice's sources.
      base_model: the slice's base model (default: the top-level ``base_model``); it must be one of
        ``sources``.
      residual_weight: mergekit's residual weight (accepted and unused, as in mergekit).
      parameters: per-slice parameter settings: they override the top level's, and per-source settings
        override them (passthrough: unused).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    sources: list[SliceSource] = _field(_list_of(_record(SliceSource)))
    base_model: Optional[str] = _field(_optional(_str), default=None)
    residual_weight: Optional[float] = _field(_optional(_float), default=None)
    parameters: Optional[dict[str, Any]] = _field(_optional(_dict), default=None)


@dataclasses.dataclass
class MergeConfig:
    """The YAML schema: mergekit's fields plus jmerge extras (``seed``, ``scope``).

    Attributes:
      merge_method: a mergekit method name, ``passthrough`` or any jmerge method name.
      base_model: the model the task vectors are taken from.
      models: the merged models (not with ``slices``).
      slices: layer slices: passthrough (frankenmerge) or, with any other method, slices merged layer by
        layer (mergekit's ``slices`` form).
      parameters: top-level parameter settings, the fallback of every model's.
      dtype: compute dtype.
      out_dtype: output dtype (default: ``dtype``).
      tokenizer_source: the output tokenizer: ``union``, ``base`` or a model (embeddings re-indexed to it).
      tokenizer: the long form, a :class:`~jmerge.mergekit.tokenizer_schema.TokenizerSettings` block
        (source, per-token embedding sources, ``pad_to_multiple_of``).
      chat_template: a template name (:data:`~jmerge.mergekit.chat_templates.CHAT_TEMPLATES`), ``auto``
        or a Jinja template, written next to the output.
      name: the merge's name.
      seed: jmerge extra: random seed of stochastic methods (DARE, DELLA, ...).
      scope: jmerge extra: the method's ``scope`` option, e.g. ``"global"`` for whole-model TIES.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    merge_method: str = _field(_str)
    base_model: Optional[str] = _field(_optional(_str), default=None)
    models: Optional[list[ModelEntry]] = _field(_optional(_list_of(_record(ModelEntry))), default=None)
    slices: Optional[list[SliceDef]] = _field(_optional(_list_of(_record(SliceDef))), default=None)
    parameters: Optional[dict[str, Any]] = _field(_optional(_dict), default=None)
    dtype: Optional[str] = _field(_optional(_str), default=None)
    out_dtype: Optional[str] = _field(_optional(_str), default=None)
    tokenizer_source: Optional[str] = _field(_optional(_str), default=None)
    tokenizer: Optional[Any] = _field(_optional(_tokenizer_block), default=None)
    chat_template: Optional[str] = _field(_optional(_chat_template), default=None)
    name: Optional[str] = _field(_optional(_str), default=None)
    seed: int = _field(_int, default=0)
    scope: Optional[str] = _field(_optional(_str), default=None)


# --------------------------------------------------------------------------------------------
# The validator


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _allowed_text(cls: type) -> str:
    """The fields of ``cls`` for messages: the required ones, then the optional ones alphabetically."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    return ", ".join(required + sorted(f.name for f in fields if f.default is not dataclasses.MISSING))


def _validate_record(cls: type, ctx: _Ctx, loc: Loc, data: Any) -> Any:
    """Build ``cls`` from a mapping: known fields in declaration order, then unknown keys."""
    if not isinstance(data, dict):
        raise _type_error(ctx, loc, f"Input should be a valid dictionary or instance of {cls.__name__}", data)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = f.metadata["check"](ctx, loc + (f.name,), data[f.name])
        elif f.default is dataclasses.MISSING:
            raise ctx.error(loc, f"missing required field '{f.name}'.")
    names = _field_names(cls)
    for k in data:
        if k not in names:
            raise ctx.error(loc + (k,), f"unknown field '{k}'; allowed: {_allowed_text(cls)}.", key=True)
    return cls(**kwargs)


def _validate_config(ctx: _Ctx, data: Any) -> MergeConfig:
    """Stage 2: the loaded YAML data -> a :class:`MergeConfig`, or the first error with its location."""
    if not isinstance(data, dict):
        raise ctx.error((), "a merge config is a mapping with at least `merge_method` and `models` or `slices`.")
    fields = sorted(_field_names(MergeConfig))
    for k in data:
        if k not in fields:
            raise ctx.error((k,), f"unknown field '{k}'; allowed fields: {fields}.", key=True)
    cfg = _validate_record(MergeConfig, ctx, (), data)
    from .tokenizer_schema import check_tokenizer_models  # noqa: PLC0415 - it builds on this module
    check_tokenizer_models(ctx, cfg)
    return cfg
