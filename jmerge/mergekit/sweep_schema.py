"""The ``sweep:`` block of a sweep config (a mergekit merge config plus ``sweep:``), validated with locations.

    sweep:
      method: grid            # grid | random | halving (successive halving on growing evaluation budgets)
      parameters:             # mergekit parameter names, applied to every model of the config
        density: [0.2, 0.5]                     # grid: the values to try (each a mergekit value: a number,
        weight: [0.5, {per_model: [1.0, 0.5]}]  # a gradient list, filters, or {per_model: [...]} per model)
        # random / halving: {uniform: [lo, hi]}, {log_uniform: [lo, hi]}, {choice: [...]} or a list (grid)
      n: 16                   # random / halving with distributions: settings drawn
      seed: 0                 # random draws
      eta: 2                  # halving: reduction factor
      min_batches: 1          # halving: evaluation batches of the first rung
      metric: loss            # loss | perplexity (LM evaluation)
      mode: min               # min | max
      batch: 8                # settings per compiled program call (default: all)
      eval: {text: docs.txt, batch_size: 8, max_length: 256}

:func:`load_sweep_config` returns the block and the merge config's text with the block blanked out (same line
numbers, so the merge config's own errors keep their locations).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (EMNLP 2024
industry track) for the merge config; Bergstra and Bengio (JMLR 2012); Jamieson and Talwalkar (AISTATS 2016).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import yaml

from .schema import ConfigError, _Ctx, _dict, _float, _int, _load_yaml, _str

__all__ = ["SweepBlock", "SweepParameter", "SweepConfig", "load_sweep_config", "parse_sweep_config"]

_METHODS = ("grid", "random", "halving")
_DISTS = ("uniform", "log_uniform", "choice")
_FIELDS = ("method", "parameters", "n", "seed", "eta", "min_batches", "metric", "mode", "batch", "eval")
_EVAL_FIELDS = ("text", "batch_size", "max_length")


@dataclasses.dataclass(frozen=True)
class SweepParameter:
    """One swept parameter.

    Attributes:
      name: the mergekit parameter name.
      kind: ``"grid"`` (``values``), ``"uniform"`` / ``"log_uniform"`` (``values`` = ``[low, high]``) or
        ``"choice"`` (``values``).
      values: as above; a per-model value is ``{"per_model": [...]}``.
      where: ``file:line:column`` of the value (for errors found later).

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """

    name: str
    kind: str
    values: tuple
    where: str


@dataclasses.dataclass(frozen=True)
class SweepBlock:
    """The validated ``sweep:`` block (see the module docstring for the fields).

    References: Jamieson and Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter
    Optimization" (AISTATS 2016) for ``halving``.
    """

    method: str
    parameters: tuple
    n: Optional[int]
    seed: int
    eta: int
    min_batches: int
    metric: str
    mode: str
    batch: Optional[int]
    eval_text: str
    eval_batch_size: int
    eval_max_length: int
    where: str


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep config: the block, the merge config (text with the block blanked, and data) and where it is.

    Attributes:
      sweep: the :class:`SweepBlock`.
      merge_text: the merge config's YAML (the ``sweep:`` lines blanked: same line numbers).
      merge_data: the merge config as plain data (for writing one setting's config).
      source: the file name for messages.
      cfg_dir: the config's directory (relative paths may be relative to it).
      text: the whole file (its identity for a sweep directory).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """

    sweep: SweepBlock
    merge_text: str
    merge_data: dict
    source: str
    cfg_dir: str
    text: str


def _per_model(ctx: _Ctx, loc: tuple, v: Any) -> Any:
    if isinstance(v, dict) and "per_model" in v:
        if set(v) != {"per_model"} or not isinstance(v["per_model"], list) or not v["per_model"]:
            raise ctx.error(loc, "a per-model value is {per_model: [one value per model, in the config's order]}.")
    return v


def _value_ok(ctx: _Ctx, loc: tuple, v: Any) -> Any:
    if v is None or isinstance(v, str):
        raise ctx.error(loc, f"a swept value is a number, a gradient list, filters or {{per_model: [...]}} (got {v!r}).")
    return _per_model(ctx, loc, v)


def _parameter(ctx: _Ctx, loc: tuple, name: str, v: Any, method: str) -> SweepParameter:
    where = ctx.where(loc)
    if isinstance(v, list):
        if not v:
            raise ctx.error(loc, "give at least one value to try.")
        return SweepParameter(name, "grid", tuple(_value_ok(ctx, loc + (i,), x) for i, x in enumerate(v)), where)
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in _DISTS:
        if method == "grid":
            raise ctx.error(loc, "method grid takes a list of values; distributions need method random or halving.")
        kind, arg = next(iter(v.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ctx.error(loc + (kind,), "choice needs a non-empty list of values.")
            return SweepParameter(name, kind, tuple(_value_ok(ctx, loc + (kind, i), x) for i, x in enumerate(arg)),
                                  where)
        if not isinstance(arg, list) or len(arg) != 2:
            raise ctx.error(loc + (kind,), f"{kind} needs [low, high].")
        lo, hi = (_float(ctx, loc + (kind, i), arg[i]) for i in range(2))
        if not lo <= hi or (kind == "log_uniform" and lo <= 0):
            raise ctx.error(loc + (kind,), f"{kind} needs {'0 < ' if kind == 'log_uniform' else ''}low <= high "
                            f"(got [{lo}, {hi}]).")
        return SweepParameter(name, kind, (lo, hi), where)
    raise ctx.error(loc, "give a list of values (grid), or one of {uniform: [lo, hi]}, {log_uniform: [lo, hi]}, "
                    "{choice: [...]}.")


def _block(ctx: _Ctx, v: Any, cfg_dir: str) -> SweepBlock:
    loc = ("sweep",)
    d = _dict(ctx, loc, v)
    for k in d:
        if k not in _FIELDS:
            raise ctx.error(loc + (k,), f"unknown field; the sweep block's fields are {', '.join(_FIELDS)}.", key=True)
    method = _str(ctx, loc + ("method",), d.get("method", "grid"))
    if method not in _METHODS:
        raise ctx.error(loc + ("method",), f"unknown sweep method '{method}'; use one of {', '.join(_METHODS)}.")
    if "parameters" not in d:
        raise ctx.error(loc, "missing required field 'parameters' (the hyperparameters to sweep and their values).")
    ploc = loc + ("parameters",)
    params = _dict(ctx, ploc, d["parameters"])
    if not params:
        raise ctx.error(ploc, "give at least one parameter to sweep.")
    ps = tuple(_parameter(ctx, ploc + (k,), k, x, method) for k, x in params.items())
    has_dist = any(p.kind != "grid" for p in ps)
    n = None
    if "n" in d:
        n = _int(ctx, loc + ("n",), d["n"])
        if n < 1:
            raise ctx.error(loc + ("n",), f"n must be at least 1 (got {n}).")
        if not has_dist:
            raise ctx.error(loc + ("n",), "n is the number of random draws; it needs a distribution among the "
                            "parameters (uniform, log_uniform, choice).")
    elif has_dist:
        raise ctx.error(loc, "missing field 'n' (how many settings to draw from the distributions).")
    seed = _int(ctx, loc + ("seed",), d.get("seed", 0))
    eta = _int(ctx, loc + ("eta",), d.get("eta", 2))
    min_b = _int(ctx, loc + ("min_batches",), d.get("min_batches", 1))
    for k, val, lo in (("eta", eta, 2), ("min_batches", min_b, 1)):
        if val < lo:
            raise ctx.error(loc + (k,), f"{k} must be at least {lo} (got {val}).")
        if k in d and method != "halving":
            raise ctx.error(loc + (k,), f"{k} is an option of method halving (this sweep's method is {method}).")
    metric = _str(ctx, loc + ("metric",), d.get("metric", "loss"))
    if metric not in ("loss", "perplexity"):
        raise ctx.error(loc + ("metric",), f"unknown metric '{metric}'; the LM evaluation gives loss, perplexity.")
    mode = _str(ctx, loc + ("mode",), d.get("mode", "min"))
    if mode not in ("min", "max"):
        raise ctx.error(loc + ("mode",), f"mode is min or max (got '{mode}').")
    batch = None
    if d.get("batch") is not None:
        batch = _int(ctx, loc + ("batch",), d["batch"])
        if batch < 1:
            raise ctx.error(loc + ("batch",), f"batch must be at least 1 (got {batch}).")
    if "eval" not in d:
        raise ctx.error(loc, "missing required field 'eval' (e.g. eval: {text: docs.txt}).")
    eloc = loc + ("eval",)
    e = _dict(ctx, eloc, d["eval"])
    for k in e:
        if k not in _EVAL_FIELDS:
            raise ctx.error(eloc + (k,), f"unknown field; eval's fields are {', '.join(_EVAL_FIELDS)}.", key=True)
    if "text" not in e:
        raise ctx.error(eloc, "missing required field 'text' (a text file, one document per line).")
    text = _str(ctx, eloc + ("text",), e["text"])
    path = text if os.path.isabs(text) or os.path.exists(text) else os.path.join(cfg_dir, text)
    if not os.path.isfile(path):
        raise ctx.error(eloc + ("text",), f"no such file '{text}' (relative paths: from the working directory or "
                        "the config's directory).")
    bs = _int(ctx, eloc + ("batch_size",), e.get("batch_size", 8))
    ml = _int(ctx, eloc + ("max_length",), e.get("max_length", 256))
    if bs < 1 or ml < 2:
        raise ctx.error(eloc, f"batch_size must be at least 1 and max_length at least 2 (got {bs}, {ml}).")
    return SweepBlock(method, ps, n, seed, eta, min_b, metric, mode, batch, os.path.abspath(path), bs, ml,
                      ctx.where(loc))


def _blank_block(text: str, root: yaml.Node) -> str:
    """The text with the top-level ``sweep`` key and its value replaced by empty lines."""
    lines = text.splitlines(keepends=True)
    for kn, vn in root.value:
        if kn.value == "sweep":
            first = kn.start_mark.line
            last = vn.end_mark.line if vn.end_mark.column > 0 else vn.end_mark.line - 1
            for i in range(first, min(last, len(lines) - 1) + 1):
                lines[i] = "\n"
    return "".join(lines)


def parse_sweep_config(text: str, source: str = "<config>", cfg_dir: str = "") -> SweepConfig:
    """Validate a sweep config's ``sweep:`` block and split off the merge config.

    Args:
      text: the YAML text.
      source: file name for messages.
      cfg_dir: the config's directory.

    Returns:
      The :class:`SweepConfig` (the merge config itself is validated by :func:`jmerge.mergekit.parse_config`).

    Raises:
      ConfigError: ``file:line:column: sweep...: what is wrong and what is allowed``.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    data, ctx = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise ctx.error((), "a sweep config is a mapping: a merge config plus a 'sweep:' block.")
    if "sweep" not in data:
        raise ctx.error((), "no 'sweep:' block; add one, e.g. sweep: {parameters: {density: [0.2, 0.5]}, "
                        "eval: {text: docs.txt}}.")
    block = _block(ctx, data["sweep"], cfg_dir)
    merge_data = {k: v for k, v in data.items() if k != "sweep"}
    return SweepConfig(block, _blank_block(text, ctx.root), merge_data, source, cfg_dir, text)


def load_sweep_config(path: str) -> SweepConfig:
    """Read and validate a sweep config file (see :func:`parse_sweep_config`).

    Raises:
      ConfigError: unreadable file, or an invalid ``sweep:`` block (located).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    return parse_sweep_config(text, source=path, cfg_dir=os.path.dirname(os.path.abspath(path)))
