"""The ``tokenizer:`` block of a merge config, validated with YAML locations (mergekit 0.1.5's schema).

::

    tokenizer:
      source: union            # "union" (default), "base" or a model
      pad_to_multiple_of: 64   # optional: the output vocabulary is padded to a multiple of this
      tokens:                  # optional: per-token embedding sources (each token is added if new)
        <|im_start|>:
          source: path/to/model-b          # that model's row for the token
        <|im_end|>:
          source: {kind: model_token, model: path/to/model-b, token: "</s>"}   # or token_id: 2
          force: true                      # also for models that have the token
        <pad>:
          source: {kind: zero}

``tokenizer_source`` (the short form: ``union``, ``base`` or a model) and ``tokenizer`` exclude each
other. Models named here must be models of the config, written as they are written there.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track); mergekit 0.1.5 ``tokenizer/config.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .schema import (ConfigError, Loc, MergeConfig, _Ctx, _dict, _field, _int, _load_yaml, _optional, _str,
                     _type_error, _validate_record)

__all__ = ["TokenSource", "TokenSettings", "TokenizerSettings", "check_tokenizer", "check_tokenizer_models",
           "config_models", "located_error"]

_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def _bool(ctx: _Ctx, loc: Loc, v: Any) -> bool:
    """A boolean; also 0/1 and the strings true/false, yes/no, on/off (as pydantic reads them)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise _type_error(ctx, loc, "Input should be a valid boolean", v)


@dataclasses.dataclass
class TokenSource:
    """Where a token's embedding row comes from.

    Attributes:
      kind: ``"model"`` (the model's own row for the token), ``"zero"`` (a zero row) or
        ``"model_token"`` (the row of another token -- ``token`` or ``token_id`` -- of ``model``).
      model: the model, as written in the config (``model`` and ``model_token``).
      token_id: ``model_token``: the row index in the model's embedding.
      token: ``model_token``: a token of the model's own tokenizer.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``TokenEmbeddingConfig``.
    """

    kind: str
    model: Optional[str] = None
    token_id: Optional[int] = None
    token: Optional[str] = None


@dataclasses.dataclass
class _ModelToken:
    kind: str = _field(_str)
    model: str = _field(_str)
    token_id: Optional[int] = _field(_optional(_int), default=None)
    token: Optional[str] = _field(_optional(_str), default=None)


@dataclasses.dataclass
class _Zero:
    kind: str = _field(_str)


_FORMS = ("a model of the config, {kind: zero}, or {kind: model_token, model: <model>, token: <text>} "
          "(or token_id: <row>)")


def _token_source(ctx: _Ctx, loc: Loc, v: Any) -> TokenSource:
    if isinstance(v, str):
        return TokenSource("model", model=v)
    if not isinstance(v, dict):
        raise ctx.error(loc, f"a token source is {_FORMS} (got {v!r}).")
    kind = v.get("kind")
    if kind == "zero":
        _validate_record(_Zero, ctx, loc, v)
        return TokenSource("zero")
    if kind == "model_token":
        r = _validate_record(_ModelToken, ctx, loc, v)
        if (r.token_id is None) == (r.token is None):
            raise ctx.error(loc, "a model_token source names exactly one of `token` (text) and `token_id` (row).")
        if r.token_id is not None and r.token_id < 0:
            raise ctx.error(loc + ("token_id",), f"token_id must be >= 0 (got {r.token_id}).")
        return TokenSource("model_token", model=r.model, token_id=r.token_id, token=r.token)
    where = loc + ("kind",) if "kind" in v else loc
    raise ctx.error(where, f"unknown token source kind {kind!r}; a token source is {_FORMS}.")


@dataclasses.dataclass
class TokenSettings:
    """One entry of ``tokenizer.tokens``: the token's embedding source and whether it is forced.

    Attributes:
      source: where the row comes from (None: the default rules).
      force: use ``source`` for every model, even those that have the token.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``TokenEmbeddingConfig``.
    """

    source: Optional[TokenSource] = _field(_optional(_token_source), default=None)
    force: bool = _field(_bool, default=False)


def _tokens(ctx: _Ctx, loc: Loc, v: Any) -> dict[str, TokenSettings]:
    d = _dict(ctx, loc, v)
    out = {}
    for tok, entry in d.items():
        if tok == "":
            raise ctx.error(loc + (tok,), "a token is a non-empty string.", key=True)
        out[tok] = _validate_record(TokenSettings, ctx, loc + (tok,), {} if entry is None else entry)
    return out


def _multiple(ctx: _Ctx, loc: Loc, v: Any) -> int:
    n = _int(ctx, loc, v)
    if n < 1:
        raise ctx.error(loc, f"pad_to_multiple_of must be a positive integer (got {n}).")
    return n


@dataclasses.dataclass
class TokenizerSettings:
    """The ``tokenizer:`` block: the output vocabulary's source, per-token embedding sources, padding.

    Attributes:
      source: ``"union"`` (default: every input's tokens), ``"base"`` (the base model's tokenizer) or a
        model (its tokenizer).
      tokens: per-token settings; every token named is added to the vocabulary when it is new.
      pad_to_multiple_of: pad the vocabulary (embedding rows) to a multiple of this.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``TokenizerConfig``.
    """

    source: str = _field(_str, default="union")
    tokens: Optional[dict[str, TokenSettings]] = _field(_optional(_tokens), default=None)
    pad_to_multiple_of: Optional[int] = _field(_optional(_multiple), default=None)


def check_tokenizer(ctx: _Ctx, loc: Loc, v: Any) -> TokenizerSettings:
    """Validate a ``tokenizer:`` block (a located :class:`~jmerge.mergekit.ConfigError` on the first problem).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``TokenizerConfig``.
    """
    return _validate_record(TokenizerSettings, ctx, loc, v)


def config_models(cfg: MergeConfig) -> list[str]:
    """Every model a config names, as written, each once: the base first, then in config order.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``referenced_models``.
    """
    out = [cfg.base_model] if cfg.base_model else []
    out += [m.model for m in cfg.models or []]
    for s in cfg.slices or []:
        out += [src.model for src in s.sources]
    return list(dict.fromkeys(out))


def check_tokenizer_models(ctx: _Ctx, cfg: MergeConfig) -> None:
    """Cross-field checks: not both ``tokenizer_source`` and ``tokenizer``; token sources name config models.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        raise ctx.error(("tokenizer",), "give either `tokenizer_source` or a `tokenizer` block, not both "
                        "(`tokenizer: {source: ...}` is the long form).", key=True)
    if cfg.tokenizer is None:
        return
    models = config_models(cfg)
    for tok, ts in (cfg.tokenizer.tokens or {}).items():
        src = ts.source
        if src is not None and src.model is not None and src.model not in models:
            loc = ("tokenizer", "tokens", tok, "source") + (("model",) if src.kind == "model_token" else ())
            raise ctx.error(loc, f"model {src.model!r} is not a model of this config; name one of "
                            f"{', '.join(repr(m) for m in models)} as written there.")
        if src is None and ts.force:
            raise ctx.error(("tokenizer", "tokens", tok, "force"), "`force: true` needs a `source` for the token.")


def located_error(yaml_text: str, source: str, loc: Loc, msg: str) -> ConfigError:
    """A :class:`~jmerge.mergekit.ConfigError` at a location of a config, for problems found after parsing.

    Args:
      yaml_text: the config text (``MergePlan.yaml_text``).
      source: its file name (``MergePlan.source``).
      loc: the location path (keys and list indices), e.g. ``("tokenizer", "tokens", "<s>", "source")``.
      msg: what is wrong and the fix.

    References: none (infrastructure).
    """
    try:
        _, ctx = _load_yaml(yaml_text, source)
    except ConfigError:
        ctx = _Ctx(source, None)
    return ctx.error(tuple(loc), msg)
