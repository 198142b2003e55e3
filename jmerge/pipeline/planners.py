"""Planners: a merge plan (from a YAML config) -> the tensor jobs of the output checkpoint.

* :func:`plan_tensor_merges`: one :class:`~jmerge.pipeline.jobs.Merge` job per tensor of the base (or
  of the first model when the method takes no base), with the models' tensors of the same name
  (tied embeddings stand in for a missing ``lm_head``); integer and boolean tensors (position ids,
  masks) are copied from the reference, never merged.
* :func:`plan_slices`: passthrough / frankenmerge: layer ranges of several models stacked into a new
  model, layers renumbered, embeddings from the first slice's model and final norms and heads from
  the last slice's; each a :class:`~jmerge.pipeline.jobs.Copy` (scaled when the config says so).
* :func:`plan_slice_merges`: ``slices`` with a per-tensor method, as mergekit plans them: output layer
  ``k`` of a slice merges layer ``start + k`` of each of its sources (:class:`SliceMergeOp`, carrying
  that tensor's hyperparameters); embeddings merge with the first slice, final norm and head with
  the last. :func:`leaf_hparams` resolves every merge job's hyperparameters.

A ``layer_range`` beyond a model's layer count (``num_hidden_layers``/``n_layer`` of its config.json,
else its tensor names) is an error naming the YAML location, raised before any tensor is read.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..core import MergeInputError, count_layers, layer_index, leaf_kind, prepare_leaf_hparams, resolve_hparams
from ..mergekit import ConfigError, MergePlan
from .jobs import Copy, Merge, Tensor, TensorJob, Zeros

__all__ = ["plan_jobs", "plan_tensor_merges", "plan_slices", "plan_slice_merges", "SliceMergeOp", "leaf_hparams",
           "model_layers", "config_layers", "input_paths", "np_dtype", "LAYER_SUB"]

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
    where = plan.slice_where or [None] * len(plan.slices)
    for (mpath, a, b), wh in zip(plan.slices, where):
        if wh is not None:  # None: a single-model passthrough takes all layers
            _check_layer_range(wh, mpath, a, b, readers[idx[mpath]])
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


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def config_layers(reader: Any) -> Optional[tuple[int, str]]:
    """The layer count a checkpoint's config.json declares (or its ``text_config``'s) and its key, or None.

    References: the Hugging Face Transformers config fields (``num_hidden_layers``, GPT-2's ``n_layer``).
    """
    cfg = reader.config if isinstance(getattr(reader, "config", None), dict) else {}
    if not any(k in cfg for k in _LAYER_KEYS) and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    for k in _LAYER_KEYS:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v, k
    return None


def model_layers(reader: Any) -> tuple[int, str]:
    """A checkpoint's layer count and where it came from: config.json, else the tensor names.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for layer ranges.
    """
    declared = config_layers(reader)
    if declared is not None:
        return declared[0], f"config.json {declared[1]}"
    return count_layers(list(reader.keys())), "its tensor names"


def _check_layer_range(where: str, model: str, a: int, b: int, reader: Any) -> None:
    n, how = model_layers(reader)
    if b > n:
        raise ConfigError(f"{where}: layer_range {[a, b]} is out of range: model '{model}' has {n} layers ({how}); "
                          f"give an end of at most {n}.")


@dataclasses.dataclass(frozen=True)
class SliceMergeOp(Merge):
    """A :class:`~jmerge.pipeline.jobs.Merge` with its own hyperparameter specs (a ``slices`` merge).

    Attributes:
      hparams: the specs of this tensor (numbers and :class:`~jmerge.PerModel` values), used instead
        of the plan's.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for per-slice parameters.
    """

    hparams: Optional[Mapping[str, Any]] = dataclasses.field(default=None, compare=False)


def _renumber(name: str, layer: int) -> str:
    return LAYER_SUB.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", name, count=1)


def _slice_job(plan: MergePlan, readers: Sequence[Any], idx: dict, si: int, inputs: Sequence[Any],
               base_i: Optional[int], out_name: str, src_names: Sequence[str], t: float) -> TensorJob:
    """One output tensor of a slice: the same-offset tensor of each source, merged with its own specs."""
    ref_j = base_i if base_i is not None else 0
    ref = readers[idx[inputs[ref_j].path]]
    shape = tuple(ref.shape(_find(ref, src_names[ref_j], f"model '{inputs[ref_j].model}'")))
    found = []
    for x, nm in zip(inputs, src_names):
        r = readers[idx[x.path]]
        src = _find(r, nm, f"model '{x.model}'")
        if tuple(r.shape(src)) != shape:
            raise MergeInputError(f"tensor '{out_name}': model '{x.model}' has shape {tuple(r.shape(src))} for '{src}' "
                                  f"but '{inputs[ref_j].model}' has {shape}; a slice merges same-shaped layers.")
        found.append(Tensor(idx[x.path], src))
    dt = ref.dtype(found[ref_j].name)
    if leaf_kind(np.empty(0, dt)) != "float":  # integer/bool buffers are copied, never merged
        return TensorJob(out_name, shape, dt, Copy(found[ref_j]), dt)
    models = [j for j in range(len(inputs)) if j != base_i]
    hp = plan.slice_merge.tensor_hparams(si, out_name, [(j, src_names[j]) for j in models], t)
    base = found[base_i] if base_i is not None else Zeros(shape, dt)
    out_dt = np_dtype(plan.config.out_dtype) or np_dtype(plan.config.dtype)
    return TensorJob(out_name, shape, out_dt or dt, SliceMergeOp(base, tuple(found[j] for j in models), hp), dt)


def plan_slice_merges(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> list[TensorJob]:
    """``slices`` with a per-tensor method: each slice's layers merged from its sources, then renumbered.

    Output layer ``k`` of a slice of ``n`` layers merges layer ``start + k`` of every source at
    gradient position ``t = k / (n - 1)`` (``t = 1`` when ``n == 1``); embeddings merge the first
    slice's sources with its parameters, the other non-layer tensors (final norm, head) the last
    slice's, both at ``t = 0`` (mergekit's ``MergePlanner``). Every ``layer_range`` is checked against
    its model's layer count first.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    sm = plan.slice_merge
    idx = {p: i for i, p in enumerate(paths)}
    for sl in sm.slices:
        for x in sl.inputs:
            _check_layer_range(x.where, x.model, x.start, x.end, readers[idx[x.path]])
    first, last = sm.slices[0], sm.slices[-1]
    ref0 = first.inputs[first.base if first.base is not None else 0]
    outside = [n for n in readers[idx[ref0.path]].keys() if layer_index(n) is None]
    jobs = [_slice_job(plan, readers, idx, 0, first.inputs, first.base, n, [n] * len(first.inputs), 0.0)
            for n in outside if _EMBED.search(n)]
    out_layer = 0
    for si, sl in enumerate(sm.slices):
        ref_j = sl.base if sl.base is not None else 0
        ref = sl.inputs[ref_j]
        names = list(readers[idx[ref.path]].keys())
        for k in range(sl.length):
            t = k / (sl.length - 1) if sl.length > 1 else 1.0
            for n in names:
                if layer_index(n) == ref.start + k:
                    src_names = [_renumber(n, x.start + k) for x in sl.inputs]
                    jobs.append(_slice_job(plan, readers, idx, si, sl.inputs, sl.base, _renumber(n, out_layer + k),
                                           src_names, t))
        out_layer += sl.length
    post = last.inputs[:sm.post_inputs]
    jobs += [_slice_job(plan, readers, idx, len(sm.slices) - 1, post, last.base, n, [n] * len(post), 0.0)
             for n in outside if not _EMBED.search(n)]
    return jobs


def leaf_hparams(method: Any, merges: Sequence[TensorJob], hparams: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resolved hyperparameters of each merge job: its own specs (:class:`SliceMergeOp`), else ``hparams``.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track) for per-layer and per-model values.
    """
    names = [j.out_name for j in merges]
    n_layers = count_layers(names) or None
    if not any(getattr(j.op, "hparams", None) is not None for j in merges):
        return prepare_leaf_hparams(method, names, len(merges[0].op.models), hparams, num_layers=n_layers)
    out = []
    for j in merges:
        own = getattr(j.op, "hparams", None)
        out += prepare_leaf_hparams(method, [j.out_name], len(j.op.models), hparams if own is None else own,
                                    num_layers=n_layers)
    return out


def plan_jobs(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> list[TensorJob]:
    """The jobs of a plan: slice merges, passthrough slices, or per-tensor merges.

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """
    from .vocab import vocabulary_plan  # noqa: PLC0415 - it builds on this module
    vocab = vocabulary_plan(plan, readers, paths)  # tokenizer_source / tokenizer: vocabulary tensors re-indexed
    readers = vocab.readers  # vocabulary tensors seen with the output vocabulary's rows
    if plan.slice_merge is not None:
        jobs = plan_slice_merges(plan, readers, paths)
    else:
        jobs = plan_slices(plan, readers, paths) if plan.slices is not None else plan_tensor_merges(plan, readers, paths)
    jobs = vocab.apply(jobs)
    if not jobs:
        raise MergeInputError(f"no tensors to write (inputs: {list(paths)}).")
    return jobs
