"""Validate a whole merge plan against its inputs' headers before any weights are read or downloaded.

:func:`validate_plan` opens every input of a :class:`~jmerge.MergePlan` in header-only mode
(:func:`jmerge.io.open_model`: local checkpoints, Hub ids from the cache or from their remote
safetensors headers, ``model+lora`` adapters checked against their model) and collects every problem
it can see from ``config.json`` and the safetensors headers -- inputs that cannot be opened, layer
counts that differ, tensors missing from a model, shapes or kinds (float/integer) that differ from the
reference -- then plans the jobs and resolves every tensor's hyperparameters exactly as the merge will.
All problems are reported together in one :class:`~jmerge.MergeInputError` line, so a mistake costs
seconds, not a download of every model.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track); the safetensors format (headers: names, shapes, dtypes).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ..core import MergeInputError, leaf_kind
from ..mergekit import MergePlan
from ..mergekit.arch import model_views
from .planners import _TIED, config_layers, input_paths, plan_jobs
from .vocab import is_vocab_tensor

__all__ = ["validate_plan", "open_input", "plan_base_dir"]

_MAX_PROBLEMS = 8


def plan_base_dir(plan: MergePlan) -> Optional[str]:
    """The directory of the plan's config file (relative model paths may be relative to it), or None.

    References: none (infrastructure).
    """
    src = getattr(plan, "source", None)
    return os.path.dirname(os.path.abspath(src)) if src and os.path.isfile(src) else None


def open_input(plan: MergePlan, spec: str, *, headers_only: bool = False) -> Any:
    """Open one input of a plan with :func:`jmerge.io.open_model` (paths relative to the config's dir).

    References: none (infrastructure).
    """
    from .. import io  # noqa: PLC0415
    return io.open_model(spec, base_dir=plan_base_dir(plan), headers_only=headers_only)


def _is_float(dt: Any) -> bool:
    return leaf_kind(np.empty(0, dt)) == "float"  # the planners' rule: other kinds are copied, not merged


def _layers(reader: Any) -> Optional[int]:
    declared = config_layers(reader)
    return None if declared is None else declared[0]


def _some(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _tensor_problems(plan: MergePlan, readers: dict) -> list[str]:
    """Per-tensor merges: every model has the reference's tensors, with the same shapes and kinds."""
    ref_path = plan.base if plan.base is not None else plan.models[0]
    ref = readers[ref_path]
    who = "the base" if plan.base is not None else "the first model"
    vocab_free = bool(getattr(plan.config, "tokenizer_source", None) or getattr(plan.config, "tokenizer", None))
    problems = []
    n_ref = _layers(ref)
    for mp in plan.models:
        if mp == ref_path:
            continue
        r = readers[mp]
        n = _layers(r)
        if n is not None and n_ref is not None and n != n_ref:
            problems.append(f"model '{mp}' has {n} layers (config.json) but {who} has {n_ref}")
        missing, shapes, kinds = [], [], []
        for name in ref.keys():
            src = name if name in r else next((a for a in _TIED.get(name, ()) if a in r), None)
            if src is None:
                missing.append(name)
                continue
            a, b = tuple(ref.shape(name)), tuple(r.shape(src))
            if a != b and not (vocab_free and is_vocab_tensor(name)):
                shapes.append(f"'{name}' {b} vs {a}")
            if _is_float(ref.dtype(name)) != _is_float(r.dtype(src)):
                kinds.append(f"'{name}' {np.dtype(r.dtype(src)).name} vs {np.dtype(ref.dtype(name)).name}")
        if missing:
            problems.append(f"{len(missing)} tensor(s) of {who} are missing from model '{mp}' "
                            f"({_some([repr(m) for m in missing])})")
        if shapes:
            problems.append(f"model '{mp}' has {len(shapes)} tensor(s) shaped unlike {who} ({_some(shapes)})")
        if kinds:
            problems.append(f"model '{mp}' has {len(kinds)} tensor(s) of another kind than {who} ({_some(kinds)})")
    return problems


def _hparam_check(plan: MergePlan, readers: list, paths: list) -> None:
    """Plan the jobs on the headers and resolve every tensor's hyperparameters, as the merge will."""
    from .executor import _context  # noqa: PLC0415 - the executor imports this module
    jobs = plan_jobs(plan, readers, paths)
    _context(plan, jobs, plan.seed, None)


def validate_plan(plan: MergePlan, *, allow_crimes: bool = False) -> None:
    """Check a plan against its inputs' ``config.json`` and safetensors headers; read no weights.

    Every input is opened headers-only (nothing large is downloaded) and shown under mergekit's tensor
    names (:func:`jmerge.mergekit.arch.model_views`, which also refuses mixed architectures unless
    ``allow_crimes``); problems found across inputs (unopenable inputs, layer counts, missing tensors,
    shapes, tensor kinds) are collected; when there are none the jobs are planned and each tensor's
    hyperparameters resolved and range-checked, as the merge will.

    Args:
      plan: the merge plan.
      allow_crimes: accept models of different architectures (mergekit's ``--allow-crimes``).

    Raises:
      MergeInputError: one line listing every problem found (``CheckpointError`` texts included).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    paths = input_paths(plan)
    readers: dict = {}
    problems: list[str] = []
    try:
        for p in paths:
            try:
                readers[p] = open_input(plan, p, headers_only=True)
            except MergeInputError as e:
                problems.append(str(e))
        views: dict = {}
        if not problems:
            try:
                views = dict(zip(paths, model_views([readers[p] for p in paths], paths, allow_crimes=allow_crimes)))
            except MergeInputError as e:
                problems.append(str(e))
        if not problems and plan.slices is None and plan.models:
            problems += _tensor_problems(plan, views)
        if not problems:
            try:
                _hparam_check(plan, [views[p] for p in paths], paths)
            except MergeInputError as e:
                problems.append(str(e))
    finally:
        for r in readers.values():
            r.close()
    if not problems:
        return
    problems = [" ".join(p.split()) for p in problems]
    if len(problems) == 1:  # located errors (file:line:col) already start with the source
        one = problems[0]
        raise MergeInputError(one if one.startswith(f"{plan.source}:") else f"{plan.source}: {one}")
    shown = "; ".join(f"({i + 1}) {p}" for i, p in enumerate(problems[:_MAX_PROBLEMS]))
    more = f"; ... {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    raise MergeInputError(f"{plan.source}: {len(problems)} problems with the inputs, found before reading any "
                          f"weights: {shown}{more}")
