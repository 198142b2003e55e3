"""Planners: a merge plan (from a YAML config) -> the tensor jobs of the output checkpoint.

* :func:`plan_tensor_merges`: one :class:`~jmerge.pipeline.jobs.Merge` job per tensor of the base (or
  of the first model when the method takes no base), with the models' tensors of the same name
  (tied embeddings stand in for a missing ``lm_head``); integer and boolean tensors (position ids,
  masks) are copied from the reference, never merged.
* :func:`plan_slices`: passthrough / frankenmerge: layer ranges of several models stacked into a new
  model, layers renumbered, embeddings from the first slice's model and final norms and heads from
  the last slice's; each a :class:`~jmerge.pipeline.jobs.Copy` (scaled when the config says so).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np

from ..core import MergeInputError, count_layers, layer_index, leaf_kind, resolve_hparams
from ..mergekit import MergePlan
from .jobs import Copy, Merge, Tensor, TensorJob, Zeros

__all__ = ["plan_jobs", "plan_tensor_merges", "plan_slices", "input_paths", "np_dtype", "LAYER_SUB"]

_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings")
LAYER_SUB = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.)")
"""The layer index in a tensor name (``model.layers.7.mlp...``), for renumbering and grouping."""

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
           "float32": "float32", "fp32": "float32", "float": "float32", "float64": "float64"}


def np_dtype(name: Optional[str]) -> Optional[np.dtype]:
    """The NumPy dtype of a config dtype name (``"bfloat16"``, ``"fp16"`` ...), or None.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for its ``dtype`` names.
    """
    if name is None:
        return None
    if name not in _DTYPES:
        raise MergeInputError(f"dtype '{name}' is not supported; use one of {sorted(_DTYPES)}.")
    import ml_dtypes  # noqa: PLC0415 - only when a dtype is named
    return np.dtype(ml_dtypes.bfloat16) if _DTYPES[name] == "bfloat16" else np.dtype(_DTYPES[name])


def input_paths(plan: MergePlan) -> list[str]:
    """The checkpoints a plan reads, base first, each once.

    References: none (infrastructure).
    """
    return list(dict.fromkeys(([plan.base] if plan.base else []) + list(plan.models)))


def _find(reader, name: str, who: str) -> str:
    if name in reader:
        return name
    for alt in _TIED.get(name, ()):
        if alt in reader:  # tied embeddings: the output head is the input embedding
            return alt
    raise MergeInputError(f"tensor '{name}' is missing from {who} ({reader.path}); the models must share the "
                          "base architecture (same tensor names and shapes).")


def plan_tensor_merges(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> list[TensorJob]:
    """One merge job per tensor of the reference checkpoint (the base, or the first model).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    idx = {p: i for i, p in enumerate(paths)}
    out_dt = np_dtype(plan.config.out_dtype) or np_dtype(plan.config.dtype)
    ref_i = idx[plan.base] if plan.base is not None else idx[plan.models[0]]
    ref = readers[ref_i]
    jobs = []
    for name in ref.keys():
        shape, dt = tuple(ref.shape(name)), ref.dtype(name)
        models = []
        for mp in plan.models:
            r = readers[idx[mp]]
            src = _find(r, name, f"model '{mp}'")
            if tuple(r.shape(src)) != shape:
                who = "the base" if plan.base else "the first model"
                raise MergeInputError(f"tensor '{name}': model '{mp}' has shape {tuple(r.shape(src))} but {who} has "
                                      f"{shape}.")
            models.append(Tensor(idx[mp], src))
        if leaf_kind(np.empty(0, dt)) != "float":  # integer/bool buffers are copied, never merged
            jobs.append(TensorJob(name, shape, dt, Copy(Tensor(ref_i, name)), dt))
            continue
        base = Tensor(ref_i, name) if plan.base is not None else Zeros(shape, dt)
        jobs.append(TensorJob(name, shape, out_dt or dt, Merge(base, tuple(models)), dt))
    return jobs


def _scales(specs: Sequence[Any], names: Sequence[str]) -> list[float]:
    """Each output tensor's passthrough ``scale`` from its spec (numbers, gradients over the output layers, rules)."""
    n_layers = count_layers(names) or None
    out = []
    for spec, name in zip(specs, names):
        v = resolve_hparams({"scale": spec}, [name], num_layers=n_layers)[0]["scale"]
        out.append(float(np.asarray(v)))
    return out


def plan_slices(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> list[TensorJob]:
    """Passthrough: the layers of each slice in order, renumbered, and the non-layer tensors.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for ``passthrough`` slices.
    """
    idx = {p: i for i, p in enumerate(paths)}
    out_dt = np_dtype(plan.config.out_dtype) or np_dtype(plan.config.dtype)
    top_scale = plan.hparams.get("scale", 1.0)
    params = plan.slice_params or [{} for _ in plan.slices]
    items = []  # (out name, reader index, source name, scale spec)
    out_layer = 0
    for (mpath, a, b), sp in zip(plan.slices, params):
        r = readers[idx[mpath]]
        b = min(b, count_layers(list(r.keys())))
        for name in r.keys():
            li = layer_index(name)
            if li is not None and a <= li < b:
                new = LAYER_SUB.sub(lambda m: f"{m.group(1)}{out_layer + li - a}{m.group(3)}", name, count=1)
                items.append((new, idx[mpath], name, sp.get("scale", top_scale)))
        out_layer += b - a
    first, last = plan.slices[0][0], plan.slices[-1][0]
    for name in readers[idx[first]].keys():
        if layer_index(name) is None:
            # embeddings come before the layers (first slice's model); norms and heads after (last's)
            src_path = first if _EMBED.search(name) else last
            src = _find(readers[idx[src_path]], name, f"model '{src_path}'")
            items.append((name, idx[src_path], src, top_scale))
    scales = _scales([it[3] for it in items], [it[0] for it in items])
    jobs = []
    for (new, ri, src, _), s in zip(items, scales):
        r = readers[ri]
        jobs.append(TensorJob(new, tuple(r.shape(src)), out_dt or r.dtype(src), Copy(Tensor(ri, src), s), r.dtype(src)))
    return jobs


def plan_jobs(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> list[TensorJob]:
    """The jobs of a plan: slices for passthrough, per-tensor merges otherwise.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    jobs = plan_slices(plan, readers, paths) if plan.slices is not None else plan_tensor_merges(plan, readers, paths)
    if not jobs:
        raise MergeInputError(f"no tensors to write (inputs: {list(paths)}).")
    return jobs
