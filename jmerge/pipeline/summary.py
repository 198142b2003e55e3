"""The ``--dry-run`` plan: method, inputs, slices, tensor groups with their hyperparameters, bytes, memory.

Reads only the checkpoints' headers; compiles and merges nothing. A hyperparameter that varies over a
group's layers is listed per layer, in layer order (``t=[0, 0.25, 0.5] per layer``).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import collections
import math

import numpy as np

from ..core import layer_index
from ..mergekit import MergePlan
from ..mergekit.arch import model_views
from .jobs import Merge
from .planners import LAYER_SUB, input_paths, leaf_hparams, plan_jobs
from .validate import open_input, validate_plan

__all__ = ["plan_summary"]


def _fmt_bytes(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.3f} {unit}"
    return f"{int(n)} B"


def _group(name: str) -> str:
    return LAYER_SUB.sub(lambda m: f"{m.group(1)}*{m.group(3)}", name, count=1)


def _public_hparams(method, hp: dict) -> dict:
    """Per-leaf values under the method's public names (one entry per public name)."""
    out = {}
    for q, v in hp.items():
        public = next((a for a, t in method.aliases.items() if q in t), q)
        out.setdefault(public, v)
    return out


def _fmt_value(v) -> str:
    """One leaf's value: a number, or ``[a, b]`` for per-model values that differ."""
    a = np.atleast_1d(np.asarray(v, np.float64))
    a = a[:1] if np.all(a == a[0]) else a
    return "[" + ", ".join(f"{x:.6g}" for x in a) + "]" if len(a) > 1 else f"{a[0]:.6g}"


def _hp_text(method, hps, js) -> str:
    """Each hyperparameter of a group: one value, or the values per layer in layer order."""
    js = sorted(js, key=lambda j: (layer_index(j.out_name) is None, layer_index(j.out_name) or 0))
    vals: dict = collections.OrderedDict()
    for j in js:
        for k, v in _public_hparams(method, hps[j.out_name]).items():
            vals.setdefault(k, []).append(_fmt_value(v))
    return " " + ", ".join(f"{k}=" + (v[0] if len(set(v)) == 1 else "[" + ", ".join(v) + "] per layer")
                           for k, v in vals.items())


def _slice_lines(plan: MergePlan) -> list[str]:
    """The output layers of a ``slices`` merge and the sources of each slice."""
    lines, out = [], 0
    for i, sl in enumerate(plan.slice_merge.slices):
        srcs = ", ".join(f"{x.model}[{x.start}:{x.end}]" + (" (base)" if j == sl.base else "")
                         for j, x in enumerate(sl.inputs))
        lines.append(f"  {i}: layers {out}-{out + sl.length - 1} <- {srcs}")
        out += sl.length
    return [f"slices ({len(plan.slice_merge.slices)}, {out} layers):"] + lines


def plan_summary(plan: MergePlan, *, window: int = 4, allow_crimes: bool = False) -> str:
    """Human-readable plan: method, inputs, tensor groups with their hyperparameters, bytes, memory.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    paths = input_paths(plan)
    validate_plan(plan, allow_crimes=allow_crimes)  # every problem at once, from headers only
    readers = [open_input(plan, p, headers_only=True) for p in paths]
    try:
        readers = model_views(readers, paths, allow_crimes=allow_crimes)  # as run_merge: crimes check, MoE names
        jobs = plan_jobs(plan, readers, paths)
        method = plan.build()
        merges = [j for j in jobs if isinstance(j.op, Merge)]
        hps = {}
        if method is not None and merges:
            hps = dict(zip([j.out_name for j in merges], leaf_hparams(method, merges, plan.hparams)))
        head = f"method: {plan.mergekit_name or plan.method_name}"
        if method is not None:
            kw = f", {plan.factory_kwargs}" if plan.factory_kwargs else ""
            head += f" (jmerge '{plan.method_name}'{kw})"
        lines = [head, f"base: {plan.base or '(none: the models are merged directly)'}",
                 "models: " + ", ".join(plan.models), f"seed: {plan.seed}"]
        if plan.slice_merge is not None:
            lines += _slice_lines(plan)
        groups: dict = collections.OrderedDict()
        for j in jobs:
            groups.setdefault(_group(j.out_name), []).append(j)
        lines.append(f"tensor groups ({len(groups)}):")
        for g, js in groups.items():
            txt = _hp_text(method, hps, js) if hps and js[0].out_name in hps else ""
            lines.append(f"  {g} x{len(js)} {js[0].shape} {np.dtype(js[0].in_dtype).name}->"
                         f"{np.dtype(js[0].dtype).name}{txt}")
        n_in = len(jobs[0].sources)
        read_b = sum(j.read_bytes(readers) for j in jobs)
        out_b = sum(math.prod(j.shape) * np.dtype(j.dtype).itemsize for j in jobs)
        # as the executor runs them: large copies and merges of an entrywise method in blocks of rows, large merges
        # of a method with a chunked form (TIES) chunk by chunk from the checkpoints
        from ..core import LeafProgram  # noqa: PLC0415
        from ..core.chunks import chunked_form, entrywise  # noqa: PLC0415
        from .executor import MergeContext, chunk_entries, split_rows, streams  # noqa: PLC0415
        chunked = chunked_form(method) if method is not None else None
        ctx = MergeContext(program=None, hparams={}, views={}, seed=0,
                           entrywise=method is not None and entrywise(method),
                           chunk_program=LeafProgram(chunked) if chunked is not None else None)
        runs = split_rows(jobs, readers, ctx)
        flowing = [streams(j, readers, ctx) for j in runs]
        flows = sum(flowing)
        big = max(chunk_entries(math.prod(j.shape)) if f else math.prod(j.shape) for j, f in zip(runs, flowing))
        itm = max(np.dtype(j.in_dtype).itemsize for j in jobs)
        peak = window * big * itm * n_in + big * 4 * (n_in + 3) + 400 * 2**20
        blocks = f" (blocks of rows: {len(runs)} runs for {len(jobs)} tensors)" if len(runs) > len(jobs) else ""
        blocks += f" ({flows} merged chunk by chunk from the checkpoints)" if flows else ""
        lines += [f"output tensors: {len(jobs)}{blocks}",
                  f"bytes read: {_fmt_bytes(read_b)}, written: {_fmt_bytes(out_b)}",
                  f"peak memory estimate: {peak / 2**30:.2f} GiB ({window} tensors in flight, largest "
                  f"{big * itm / 2**20:.1f} MiB per input, + ~0.4 GiB JAX runtime)"]
        return "\n".join(lines)
    finally:
        for r in readers:
            r.close()
