"""Sweeps of mergekit configs (``jmerge sweep CONFIG``): a merge config plus a ``sweep:`` block.

Each setting is the merge config with the swept parameters set for every model (a model's own value of a swept
parameter is replaced; ``{per_model: [...]}`` sets one value per model, in the config's order, base excluded).
Every setting's config goes through :func:`jmerge.mergekit.parse_config`, so the sweep merges exactly what
``jmerge merge`` merges for it; the settings' hyperparameter specs are stacked (numbers that vary become traced
arrays) and merged by tensor name with :func:`jmerge.merge` in the config's compute dtype. ``best.yml`` is the
best setting's config, ready for ``jmerge merge`` (model paths made absolute).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (EMNLP 2024
industry track); Bergstra and Bengio (JMLR 2012); Jamieson and Talwalkar (AISTATS 2016).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import numpy as np
import yaml

from ..core import MergeInputError
from ..io import open_model
from ..mergekit import ConfigError, parse_config
from ..mergekit.sweep_schema import SweepConfig, load_sweep_config
from ..pipeline import np_dtype
from .execute import check_settings
from .lm import lm_eval, lm_finalize, read_tensors, text_batches
from .report import atomic_write
from .runner import SweepResult, run_sweep
from .space import SuccessiveHalving, choice, grid, log_uniform, random_search, uniform

__all__ = ["config_settings", "setting_config", "run_config_sweep"]


def config_settings(sc: SweepConfig) -> list[dict[str, Any]]:
    """The settings of a sweep block (grid, random draws, or the candidates of halving).

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """
    b = sc.sweep
    if b.n is None:
        return grid({p.name: list(p.values) for p in b.parameters})
    space: dict[str, Any] = {}
    for p in b.parameters:
        space[p.name] = {"uniform": lambda v: uniform(*v), "log_uniform": lambda v: log_uniform(*v),
                         "choice": lambda v: choice(v), "grid": lambda v: choice(v)}[p.kind](p.values)
    return random_search(space, b.n, b.seed)


def _base_name(data: dict) -> str | None:
    return data.get("base_model")


def setting_config(sc: SweepConfig, setting: dict[str, Any], *, absolute: bool = False) -> dict:
    """The merge config (plain data) of one setting.

    Args:
      sc: the sweep config.
      setting: parameter name -> value (``{"per_model": [...]}`` for one value per non-base model).
      absolute: rewrite local model paths as absolute paths (for a config written elsewhere, ``best.yml``).

    Raises:
      MergeInputError: a per-model value whose length is not the number of models.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) (per-model parameters take
    precedence over the top-level ones).
    """
    data = copy.deepcopy(sc.merge_data)
    base = _base_name(data)
    entries = [e for e in (data.get("models") or []) if isinstance(e, dict) and e.get("model") != base]
    for name, v in setting.items():
        for e in data.get("models") or []:
            if isinstance(e, dict) and isinstance(e.get("parameters"), dict):
                e["parameters"].pop(name, None)
        if isinstance(v, dict) and "per_model" in v:
            vals = v["per_model"]
            if len(vals) != len(entries):
                raise MergeInputError(f"{name}: {{per_model: {vals}}} has {len(vals)} values for {len(entries)} "
                                      "models (the base excluded); give one per model.")
            for e, x in zip(entries, vals):
                if not isinstance(e.get("parameters"), dict):
                    e["parameters"] = {}
                e["parameters"][name] = x
            if isinstance(data.get("parameters"), dict):
                data["parameters"].pop(name, None)
        else:
            if not isinstance(data.get("parameters"), dict):
                data["parameters"] = {}
            data["parameters"][name] = v
    if absolute:
        def fix(p):
            if not isinstance(p, str):
                return p
            for cand in (p, os.path.join(sc.cfg_dir, p)):
                if os.path.exists(cand.split("+")[0]) and "+" not in p:
                    return os.path.abspath(cand)
            return p
        if "base_model" in data:
            data["base_model"] = fix(data["base_model"])
        for e in data.get("models") or []:
            if isinstance(e, dict) and "model" in e:
                e["model"] = fix(e["model"])
    return data


def _describe(sc: SweepConfig, settings: list, i: int) -> str:
    return f"{sc.sweep.where}: sweep: setting {i} ({json.dumps(settings[i])})"


def _plans(sc: SweepConfig, settings: list) -> list:
    plans = []
    for i, s in enumerate(settings):
        try:
            text = yaml.safe_dump(setting_config(sc, s), sort_keys=False)
            plans.append(parse_config(text, source=f"{sc.source} (sweep setting {i})", cfg_dir=sc.cfg_dir))
        except ConfigError as e:
            msg = str(e).split(": ", 2)[-1] if "sweep setting" in str(e) else str(e)
            where = next((p.where for p in sc.sweep.parameters if p.name in str(e)), sc.sweep.where)
            raise ConfigError(f"{where}: sweep: setting {i} ({json.dumps(s)}): {msg}") from None
        except MergeInputError as e:
            raise ConfigError(f"{_describe(sc, settings, i)}: {e}") from None
    p0 = plans[0]
    if p0.slices is not None or p0.slice_merge is not None or p0.method_name == "passthrough":
        raise ConfigError(f"{sc.source}: sweeps merge configs with 'models' and a per-tensor method; this config "
                          "uses slices/passthrough.")
    for i, p in enumerate(plans):
        if (p.method_name, p.factory_kwargs) != (p0.method_name, p0.factory_kwargs):
            raise ConfigError(f"{_describe(sc, settings, i)}: this setting changes a static option of the method "
                              f"({p.factory_kwargs} vs {p0.factory_kwargs}); one sweep compiles one method, so "
                              "sweep numeric parameters only.")
    return plans


def run_config_sweep(path: str, out_dir: str, *, batch: int | None = None, progress: bool = True,
                     plot: Any = None) -> SweepResult:
    """Run the sweep a config describes (LM loss on its ``eval.text``) into ``out_dir``.

    Args:
      path: the sweep config (a mergekit merge config plus ``sweep:``).
      out_dir: the sweep directory (created; resumed when it holds this config's sweep).
      batch: settings per program call (overrides ``sweep.batch``).
      progress: progress lines on stderr.
      plot: the ``sweep.png`` writer (see :func:`run_sweep`).

    Returns:
      The :class:`SweepResult`; ``out_dir`` holds ``results.csv``, ``results.json``, ``sweep.png``,
      ``best.yml`` and ``best.json``.

    Raises:
      ConfigError: an invalid config or setting (located; before any tensor is read).
      SweepDirError: ``out_dir`` holds another config's sweep.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    sc = load_sweep_config(path)
    settings = config_settings(sc)
    plans = _plans(sc, settings)
    p0 = plans[0]
    method = p0.build()
    b = sc.sweep
    readers = [open_model(m, base_dir=sc.cfg_dir, headers_only=True) for m in ([p0.base] if p0.base else []) + p0.models]
    try:
        names = set(readers[0].keys())
        for r in readers[1:]:
            names &= set(r.keys())
        names = sorted(names)
        tok_dir = readers[0].dir
        cfg_json = readers[0].config
    finally:
        for r in readers:
            r.close()
    if cfg_json is None:
        raise ConfigError(f"{sc.source}: the base model has no config.json; LM-loss sweeps need a Hugging Face "
                          "decoder checkpoint.")
    hps = [p.hparams for p in plans]
    try:
        check_settings(method, names, len(p0.models), hps, lambda i: _describe(sc, settings, i))
    except MergeInputError as e:
        raise ConfigError(str(e)) from None  # a located config error (exit 2), before any tensor is read
    models = [read_tensors(m, names, base_dir=sc.cfg_dir) for m in p0.models]
    base = read_tensors(p0.base, names, base_dir=sc.cfg_dir) if p0.base else {k: _zeros(v) for k, v in models[0].items()}
    eval_fn, used = lm_eval(cfg_json, base)
    missing = [n for n in used if n not in base]
    if missing:
        raise MergeInputError(f"tensor {missing[0]!r} is missing from one of the models.")
    data = text_batches(b.eval_text, tok_dir, batch_size=b.eval_batch_size, max_length=b.eval_max_length,
                        vocab_size=int(cfg_json.get("vocab_size", 0)) or None)
    cd = np_dtype(p0.config.dtype)
    if cd is None:
        kinds = {np.dtype(v.dtype).name for t in [base] + models for v in t.values()
                 if np.issubdtype(np.dtype(v.dtype), np.floating) or np.dtype(v.dtype).name == "bfloat16"}
        compute = kinds.pop() if len(kinds) == 1 else "float32"
    else:
        compute = cd.name
    od = np_dtype(p0.config.out_dtype) or cd
    merge_kwargs = {"seed": p0.seed, "compute_dtype": compute, "out_dtype": od}
    with open(b.eval_text, "rb") as f:
        text_hash = hashlib.sha256(f.read()).hexdigest()
    space = SuccessiveHalving(settings, b.eta, b.min_batches) if b.method == "halving" else settings

    def write_best(best: dict, out: str) -> None:
        cfg = setting_config(sc, settings[best["index"]], absolute=True)
        head = (f"# jmerge sweep: best setting {best['index']} of {len(settings)} ({json.dumps(settings[best['index']])}); "
                f"{b.metric}={best['metrics'].get(b.metric)!r}\n# merge it with: jmerge merge best.yml OUT\n")
        atomic_write(os.path.join(out, "best.yml"), head + yaml.safe_dump(cfg, sort_keys=False))

    return run_sweep(method, base, models, space, eval_fn, data=data, metric=b.metric, mode=b.mode, reduce="sum",
                     finalize=lm_finalize, out_dir=out_dir, batch_size=batch or b.batch, merge_kwargs=merge_kwargs,
                     hparams=hps, describe=lambda i: _describe(sc, settings, i),
                     fingerprint={"config": sc.text, "eval_text": text_hash}, progress=progress, write_best=write_best,
                     plot=plot)


def _zeros(x: Any) -> Any:
    import jax.numpy as jnp  # noqa: PLC0415
    return jnp.zeros_like(x)
