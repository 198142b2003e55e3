"""The YAML of ``mergekit-moe`` (a mixture of experts from dense models), validated with locations.

The fields are mergekit-moe's, unchanged: ``base_model``, ``experts`` (``source_model``,
``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``), ``gate_mode``,
``dtype``, ``experts_per_token``, ``shared_experts`` and ``architecture``. Every error names the
``file:line:column`` of the offending value and what is allowed; the checks mergekit-moe makes before it
starts (experts per token, prompts, identical prompts, identical experts) are made here, located.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (EMNLP 2024
industry track); mergekit-moe's configuration (``mergekit/moe/config.py``), read for behaviour.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Optional

from .schema import (ConfigError, _Ctx, _field, _float, _int, _list_of, _load_yaml, _optional, _record, _str,
                     _validate_record)

__all__ = ["GATE_MODES", "OUTPUT_ARCHITECTURES", "MoEExpert", "MoEConfig", "parse_moe_config", "load_moe_config"]

#: Gate modes: how router rows are made (``hidden*`` and ``cheap_embed`` need prompts and a tokenizer).
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
#: Output architectures, by the names ``architecture:`` matches as a prefix (case-insensitive).
OUTPUT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
_DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "float", "half")


def _prompts(ctx: _Ctx, loc: tuple, v: Any) -> list[str]:
    if isinstance(v, str):  # a single prompt written without a list
        v = [v]
    return _list_of(_str)(ctx, loc, v)


@dataclasses.dataclass
class MoEExpert:
    """One expert (or shared expert): a dense model whose MLPs become the expert's, and its prompts.

    Attributes:
      source_model: path (or Hub id) of the dense model.
      positive_prompts: texts that should route to this expert.
      negative_prompts: texts that should not (their hidden states are subtracted).
      noise_scale: Gaussian noise of this standard deviation added to the expert's MLP weights.
      residual_scale: factor on the expert's ``down_proj`` (its contribution to the residual stream).

    References: mergekit-moe's ``Expert`` (field names and meaning).
    """

    source_model: str = _field(_str)
    positive_prompts: Optional[list[str]] = _field(_optional(_prompts), default=None)
    negative_prompts: Optional[list[str]] = _field(_optional(_prompts), default=None)
    noise_scale: Optional[float] = _field(_optional(_float), default=None)
    residual_scale: Optional[float] = _field(_optional(_float), default=None)


@dataclasses.dataclass
class MoEConfig:
    """A mergekit-moe configuration.

    Attributes:
      base_model: the model whose attention, norms and embeddings the MoE keeps (and whose forward pass
        computes ``hidden`` gates).
      experts: the routed experts, in router-row order.
      gate_mode: one of :data:`GATE_MODES` (default ``hidden``).
      dtype: output dtype (default: the base's ``config.json`` dtype).
      experts_per_token: top-k of the router (default 2).
      shared_experts: experts every token uses (Qwen MoE: exactly one, gated; DeepSeek: at most one,
        ungated).
      architecture: the output architecture, a prefix of one of :data:`OUTPUT_ARCHITECTURES`
        (default: Mixtral when the inputs allow it).
      source: the file the config came from (for messages).

    References: mergekit-moe's ``MoEMergeConfig``.
    """

    base_model: str = _field(_str)
    experts: list[MoEExpert] = _field(_list_of(_record(MoEExpert)))
    gate_mode: str = _field(_str, default="hidden")
    dtype: Optional[str] = _field(_optional(_str), default=None)
    experts_per_token: int = _field(_int, default=2)
    shared_experts: Optional[list[MoEExpert]] = _field(_optional(_list_of(_record(MoEExpert))), default=None)
    architecture: Optional[str] = _field(_optional(_str), default=None)
    source: ClassVar[str] = "<config>"

    def where(self, *loc: Any) -> str:
        """``file:line:column: dotted.path`` of a location in the YAML (e.g. ``where("experts", 1, "source_model")``),
        the prefix of an error about that value."""
        path = ".".join(str(x) for x in loc) or "<top>"
        return f"{self._ctx.where(tuple(loc)) if getattr(self, '_ctx', None) else self.source}: {path}"


def _check(cfg: MoEConfig, ctx: _Ctx, allow_all_same: bool) -> None:
    if cfg.gate_mode not in GATE_MODES:
        raise ctx.error(("gate_mode",), f"unknown gate mode {cfg.gate_mode!r}; allowed: {', '.join(GATE_MODES)}.")
    if cfg.dtype is not None and cfg.dtype not in _DTYPES:
        raise ctx.error(("dtype",), f"unknown dtype {cfg.dtype!r}; allowed: float32, float16, bfloat16.")
    if not cfg.experts:
        raise ctx.error(("experts",), "at least one expert is needed.")
    if cfg.experts_per_token < 1:
        raise ctx.error(("experts_per_token",), f"must be at least 1 (got {cfg.experts_per_token}).")
    if cfg.experts_per_token > len(cfg.experts):
        raise ctx.error(("experts_per_token",), f"{cfg.experts_per_token} is more than the {len(cfg.experts)} "
                        "experts; lower it or add experts.")
    if cfg.architecture is not None and not any(
            a.lower().startswith(cfg.architecture.lower()) for a in OUTPUT_ARCHITECTURES):
        raise ctx.error(("architecture",), f"no output architecture {cfg.architecture!r}; allowed: "
                        f"{', '.join(OUTPUT_ARCHITECTURES)}.")
    if cfg.gate_mode in ("random", "uniform_random"):
        return  # prompts are not used
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise ctx.error(("experts", i), f"expert {i} has no positive_prompts; gate_mode {cfg.gate_mode!r} "
                            "makes each router row from its expert's prompts (or use gate_mode: random).")
    shared = cfg.shared_experts or []
    gated = [bool(e.positive_prompts) for e in shared]
    if any(gated) and not all(gated):
        raise ctx.error(("shared_experts",), "give positive_prompts to every shared expert or to none.")
    sig = [(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in cfg.experts]
    if len(sig) > 1 and all(s == sig[0] for s in sig[1:]):
        raise ctx.error(("experts",), "every expert has the same prompts, so the router cannot tell them apart; "
                        "give each expert prompts of what should route to it.")
    models = [e.source_model for e in cfg.experts]
    if len(models) > 1 and not allow_all_same and all(m == models[0] for m in models[1:]):
        raise ctx.error(("experts",), "every expert is the same model: the MoE would cost more and compute the "
                        "same; pass --i-understand-this-is-not-useful-without-training if you will train it.")


def parse_moe_config(text: str, source: str = "<config>", *, allow_all_same: bool = False) -> MoEConfig:
    """Validate mergekit-moe YAML text.

    Args:
      text: the YAML.
      source: its file name, for messages.
      allow_all_same: accept experts that are all the same model (mergekit-moe's
        ``--i-understand-this-is-not-useful-without-training``).

    Returns:
      The :class:`MoEConfig` (model paths relative to the file's directory are resolved later, by the
      builder).

    Raises:
      ConfigError: the first problem, as ``file:line:column: path: message``.

    References: mergekit-moe's ``MoEMergeConfig`` and ``is_bad_config``.
    """
    data, ctx = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise ctx.error((), "a mergekit-moe config is a mapping with at least `base_model` and `experts`.")
    cfg = _validate_record(MoEConfig, ctx, (), {k: v for k, v in data.items()})
    cfg.source = source
    object.__setattr__(cfg, "_ctx", ctx)
    _check(cfg, ctx, allow_all_same)
    return cfg


def load_moe_config(path: str | os.PathLike, *, allow_all_same: bool = False) -> MoEConfig:
    """Read and validate a mergekit-moe YAML file (see :func:`parse_moe_config`).

    Raises:
      ConfigError: an unreadable file or an invalid config.

    References: mergekit-moe's command line (``mergekit-moe CONFIG OUT``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    return parse_moe_config(text, os.fspath(path), allow_all_same=allow_all_same)
