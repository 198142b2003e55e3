"""Out-of-core merge of checkpoints on disk, one tensor at a time.

:func:`run_merge` executes a :class:`~jmerge.MergePlan` (from a YAML config): for each output tensor
it reads the base's and every model's tensor straight into NumPy buffers (``pread``, no mmap), runs
:func:`jmerge.merge_leaf` (the compiled per-leaf merge; bf16 -> f32 conversion happens inside it;
compiled once per shape and dtype) and writes the result at its planned offset with the atomic
:class:`~jmerge.CheckpointWriter`. Reads of the next tensors run in a thread pool while the current
one merges, and writes run in another, with a bounded window of tensors in flight, so memory is a
few tensors, not the model. Methods with whole-model statistics (global TIES) take a first pass
that only collects the statistics.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the config and tensor-by-tensor execution model.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from ..core import MergeInputError, count_layers, layer_index

__all__ = ["run_merge", "plan_summary", "TensorJob"]

_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings")
_LAYER_SUB = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.)")


def _np_dtype(name: Optional[str]):
    if name is None:
        return None
    import ml_dtypes
    table = {"bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16, "float16": np.float16, "fp16": np.float16,
             "half": np.float16, "float32": np.float32, "fp32": np.float32, "float": np.float32,
             "float64": np.float64}
    if name not in table:
        raise MergeInputError(f"dtype '{name}' is not supported; use one of {sorted(table)}.")
    return np.dtype(table[name])


@dataclasses.dataclass
class TensorJob:
    """One output tensor: where its inputs come from and how it is produced."""

    out_name: str
    shape: tuple
    dtype: np.dtype          # output dtype
    base: Optional[tuple]    # (reader index, tensor name) or None (zero base)
    models: list             # [(reader index, tensor name)]
    in_dtype: np.dtype       # stored dtype of the inputs (of the base / first model)
    scale: float = 1.0       # passthrough only


def _find(reader, name: str, who: str) -> str:
    if name in reader:
        return name
    for alt in _TIED.get(name, ()):
        if alt in reader:  # tied embeddings: the output head is the input embedding
            return alt
    raise MergeInputError(f"tensor '{name}' is missing from {who} ({reader.path}); the models must share the "
                          "base architecture (same tensor names and shapes).")


def _plan_jobs(plan, readers, paths) -> list[TensorJob]:
    cfg = plan.config
    compute = _np_dtype(cfg.dtype)
    out_dt = _np_dtype(cfg.out_dtype) or compute
    idx = {p: i for i, p in enumerate(paths)}
    jobs = []
    if plan.slices is not None:
        from ..core import resolve_hparams

        def _resolve_one(spec, name, path, _t):
            return resolve_hparams({name: spec}, [path])[0][name]
        first = readers[idx[plan.slices[0][0]]]
        out_layer = 0
        names_done = set()
        scale_spec = plan.hparams.get("scale", 1.0)
        for si, (mpath, a, b) in enumerate(plan.slices):
            r = readers[idx[mpath]]
            b = min(b, count_layers(list(r.keys())))
            src_scale = (cfg.slices[si].sources[0].parameters or {}).get("scale", scale_spec) if cfg.slices \
                else plan.hparams.get("scale", 1.0)
            for name in r.keys():
                li = layer_index(name)
                if li is None or not (a <= li < b):
                    continue
                new = _LAYER_SUB.sub(lambda m: f"{m.group(1)}{out_layer + li - a}{m.group(3)}", name, count=1)
                s = float(_resolve_one(src_scale, "scale", new, 0.0)) if not isinstance(src_scale, (int, float)) \
                    else float(src_scale)
                jobs.append(TensorJob(new, r.shape(name), out_dt or r.dtype(name), None, [(idx[mpath], name)],
                                      r.dtype(name), s))
                names_done.add(new)
            out_layer += b - a
        last_path = plan.slices[-1][0]
        last = readers[idx[last_path]]
        for name in first.keys():
            if layer_index(name) is None:
                # embeddings come before the layers (first slice's model); norms and heads after (last's)
                pre = _EMBED.search(name) is not None
                src_path, r = (plan.slices[0][0], first) if pre else (last_path, last)
                src = _find(r, name, f"model '{src_path}'")
                jobs.append(TensorJob(name, r.shape(src), out_dt or r.dtype(src), None, [(idx[src_path], src)],
                                      r.dtype(src), float(_resolve_one(scale_spec, "scale", name, 0.0))))
        return jobs
    ref_i = idx[plan.base] if plan.base is not None else idx[plan.models[0]]
    ref = readers[ref_i]
    for name in ref.keys():
        models = []
        for mp in plan.models:
            r = readers[idx[mp]]
            n2 = _find(r, name, f"model '{mp}'")
            if tuple(r.shape(n2)) != tuple(ref.shape(name)):
                raise MergeInputError(f"tensor '{name}': model '{mp}' has shape {tuple(r.shape(n2))} but "
                                      f"{'the base' if plan.base else 'the first model'} has {tuple(ref.shape(name))}.")
            models.append((idx[mp], n2))
        jobs.append(TensorJob(name, tuple(ref.shape(name)), out_dt or ref.dtype(name),
                              (ref_i, name) if plan.base is not None else None, models, ref.dtype(name)))
    return jobs


def _group(name: str) -> str:
    return _LAYER_SUB.sub(lambda m: f"{m.group(1)}*{m.group(3)}", name, count=1)


def plan_summary(plan, *, window: int = 4) -> str:
    """Human-readable plan: method, inputs, tensor groups with their hyperparameters, bytes, memory."""
    from .. import io as c
    paths = list(dict.fromkeys(([plan.base] if plan.base else []) + plan.models))
    readers = [c.open_checkpoint(p) for p in paths]
    try:
        jobs = _plan_jobs(plan, readers, paths)
        method = plan.build()
        hps = _leaf_hparams(plan, method, jobs) if method is not None else {}
        lines = [f"method: {plan.mergekit_name or plan.method_name}"
                 + (f" (jmerge '{plan.method_name}'{', ' + str(plan.factory_kwargs) if plan.factory_kwargs else ''})"
                    if method is not None else ""),
                 f"base: {plan.base or '(none: the models are merged directly)'}",
                 "models: " + ", ".join(plan.models), f"seed: {plan.seed}"]
        groups: dict[str, list] = collections.OrderedDict()
        for j in jobs:
            groups.setdefault(_group(j.out_name), []).append(j)
        lines.append(f"tensor groups ({len(groups)}):")
        for g, js in groups.items():
            hp_txt = ""
            if hps:
                vals = collections.OrderedDict()
                for j in js:
                    for k, v in hps[j.out_name].items():
                        a = np.atleast_1d(np.asarray(v, np.float64))
                        a = a[:1] if np.all(a == a[0]) else a
                        vals.setdefault(k, set()).add(tuple(f"{x:.6g}" for x in a))
                hp_txt = " " + ", ".join(
                    f"{k}=" + ("/".join("[" + ", ".join(x) + "]" if len(x) > 1 else x[0] for x in sorted(v))
                               if len(v) <= 4 else f"<{len(v)} values>") for k, v in vals.items())
            lines.append(f"  {g} x{len(js)} {js[0].shape} {np.dtype(js[0].in_dtype).name}->"
                         f"{np.dtype(js[0].dtype).name}{hp_txt}")
        n_in = len(jobs[0].models) + (jobs[0].base is not None) if jobs else 0
        read_b = sum(int(np.prod(j.shape)) * np.dtype(j.in_dtype).itemsize * (len(j.models) + (j.base is not None))
                     for j in jobs)
        out_b = sum(int(np.prod(j.shape)) * np.dtype(j.dtype).itemsize for j in jobs)
        big = max((int(np.prod(j.shape)) for j in jobs), default=0)
        itm = max((np.dtype(j.in_dtype).itemsize for j in jobs), default=4)
        peak = window * big * itm * n_in + big * 4 * (n_in + 3) + 400 * 2**20
        lines += [f"output tensors: {len(jobs)}", f"bytes read: {_fmt_bytes(read_b)}, written: {_fmt_bytes(out_b)}",
                  f"peak memory estimate: {peak / 2**30:.2f} GiB ({window} tensors in flight, largest "
                  f"{big * itm / 2**20:.1f} MiB per input, + ~0.4 GiB JAX runtime)"]
        return "\n".join(lines)
    finally:
        for r in readers:
            r.close()


def _fmt_bytes(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.3f} {unit}"
    return f"{int(n)} B"


def _leaf_hparams(plan, method, jobs) -> dict[str, dict]:
    from ..core import leaves_with_paths, prepare_leaf_hparams
    tree = {j.out_name: 0 for j in jobs}
    n_layers = count_layers([j.out_name for j in jobs])
    per = prepare_leaf_hparams(method, tree, len(jobs[0].models) if jobs else 1, plan.hparams,
                               num_layers=n_layers or None)
    paths = leaves_with_paths(tree)[0]
    return dict(zip(paths, per))


class _Buffers:
    """Reuse read buffers of the same size (fresh allocations page-fault on every byte)."""

    def __init__(self):
        self._free: dict[int, list] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            if self._free[nbytes]:
                return self._free[nbytes].pop()
        return np.empty(max(nbytes, 1), np.uint8)[:nbytes]

    def put(self, bufs) -> None:
        with self._lock:
            for b in bufs:
                if len(self._free[b.nbytes]) < 8:
                    self._free[b.nbytes].append(b)


def _mesh_sharding(mesh_spec: Optional[str]):
    if not mesh_spec:
        return None
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    m = re.fullmatch(r"(?:(\w+)=)?(\d+)", mesh_spec.strip())
    if not m:
        raise MergeInputError(f"--mesh '{mesh_spec}': give the number of devices, e.g. '8' or 'data=8'.")
    n = int(m.group(2))
    devs = jax.devices()
    if n > len(devs):
        raise MergeInputError(f"--mesh asks for {n} devices but only {len(devs)} are visible: {devs}.")
    name = m.group(1) or "x"
    mesh = Mesh(np.array(devs[:n]), (name,))
    return lambda shape: NamedSharding(mesh, PartitionSpec(name) if shape and shape[0] % n == 0 else PartitionSpec())


def run_merge(plan, out_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
              quiet: bool = False, copy_tokenizer: bool = True, window: int = 4, read_threads: int = 2,
              max_inflight_bytes: int = 768 * 2**20,
              mesh: Optional[str] = None, seed: Optional[int] = None,
              _fail_after: Optional[int] = None) -> dict:
    """Merge the checkpoints of ``plan`` into ``out_dir`` (sharded safetensors, written atomically).

    Args:
      plan: a :class:`~jmerge.MergePlan` (see :func:`jmerge.load_config`).
      out_dir: output directory; it appears only when the merge has fully succeeded.
      overwrite: replace an existing ``out_dir``.
      max_shard_bytes: shard size limit of the output files.
      quiet: no progress bar.
      copy_tokenizer: copy tokenizer files (from ``tokenizer_source`` or the base) next to the weights.
      window: how many tensors may be in flight (read, merging or being written) at once.
      max_inflight_bytes: input bytes (all models of a tensor) allowed in flight at once, on top of
        ``window``; a tensor larger than this is processed alone. Bounds peak memory for methods
        whose intermediates are several times their inputs (TIES on a large embedding).
      read_threads: threads reading inputs ahead of the merge.
      mesh: shard each tensor's first axis over this many devices (``"8"`` or ``"data=8"``).
      seed: overrides the config's seed.

    Returns:
      ``{"out_dir", "tensors", "bytes_read", "bytes_written", "seconds"}``.

    Raises:
      MergeInputError: for missing tensors, shape mismatches, bad hyperparameters (before writing).
      CheckpointError: for unreadable inputs or an existing output without ``overwrite``.
    """
    import jax
    import jax.numpy as jnp
    from ..core import LeafProgram, infer_views, merge_leaf
    from ..core import leaf_key

    from .. import io as c
    t0 = time.perf_counter()
    seed = plan.seed if seed is None else seed
    paths = list(dict.fromkeys(([plan.base] if plan.base else []) + plan.models))
    readers = [c.open_checkpoint(p) for p in paths]
    pools = []
    try:
        jobs = _plan_jobs(plan, readers, paths)
        if not jobs:
            raise MergeInputError(f"no tensors to write (inputs: {paths}).")
        method = plan.build()
        hps = _leaf_hparams(plan, method, jobs) if method is not None else {}
        if method is not None:
            from ..core import check_ranges
            check_ranges(method, [j.out_name for j in jobs], [hps[j.out_name] for j in jobs])
            hps = {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in hps.items()}
        compute = _np_dtype(plan.config.dtype)
        sharding = _mesh_sharding(mesh)
        bufs = _Buffers()
        src_dir = readers[0].dir
        first_cfg = readers[0].config

        def read(job: TensorJob):
            arrs, raw = [], []
            srcs = ([job.base] if job.base is not None else []) + list(job.models)
            for ri, name in srcs:
                r = readers[ri]
                b = bufs.get(r.nbytes(name))
                raw.append(b)
                a = r.get(name, out=b)
                if compute is not None and a.dtype != compute and np.dtype(compute).itemsize < a.dtype.itemsize:
                    a = a.astype(compute)  # mergekit casts inputs to `dtype` before merging
                arrs.append(a)
            if job.base is None and method is not None:
                base = np.zeros(job.shape, arrs[0].dtype)
            else:
                base = arrs.pop(0) if job.base is not None else None
            return base, arrs, raw

        layout = [(j.out_name, j.shape, j.dtype) for j in jobs]
        meta = {"merged_with": "jmerge", "merge_method": str(plan.mergekit_name or plan.method_name)}
        writer = c.CheckpointWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                                    metadata=meta)
        total_in = sum(int(np.prod(j.shape)) * np.dtype(j.in_dtype).itemsize * (len(j.models) + (j.base is not None))
                       for j in jobs)
        from tqdm.auto import tqdm
        bar = tqdm(total=total_in, unit="B", unit_scale=True, desc="jmerge", disable=quiet, smoothing=0.05)
        rpool = cf.ThreadPoolExecutor(read_threads, thread_name_prefix="jmerge-read")
        wpool = cf.ThreadPoolExecutor(1, thread_name_prefix="jmerge-write")
        pools += [rpool, wpool]

        def in_bytes(j):
            return int(np.prod(j.shape)) * np.dtype(j.in_dtype).itemsize * (len(j.models) + (j.base is not None))

        def stream(fn_submit):
            """Read ahead with a bounded window; call fn_submit(job, base, models, raw) in order."""
            pending = collections.deque()
            it = iter(jobs)
            nxt = next(it, None)

            def fill():
                nonlocal nxt
                # at least one read ahead; more while under both the count and the byte budget
                while nxt is not None and (not pending or (len(pending) < window and
                                                           sum(in_bytes(q) for q, _ in pending) + in_bytes(nxt)
                                                           <= max_inflight_bytes)):
                    pending.append((nxt, rpool.submit(read, nxt)))
                    nxt = next(it, None)

            fill()
            while pending:
                j, fut = pending.popleft()
                base, arrs, raw = fut.result()
                fn_submit(j, base, arrs, raw)
                fill()

        def put(x):
            if sharding is None:
                return x
            return jax.device_put(x, sharding(x.shape))

        with writer:
            # Pass 1 (only for methods with whole-model statistics, e.g. global top-k TIES).
            stats = {j.out_name: {} for j in jobs}
            program = LeafProgram(method) if method is not None else None
            vws = dict(zip([j.out_name for j in jobs], infer_views([j.out_name for j in jobs], [j.shape for j in jobs])))
            for pi, (_, sname, phase) in enumerate(program.phases if program is not None else ()):
                collected = []

                def collect(j, base, arrs, raw, _pi=pi, _out=collected):
                    r = program.collect(_pi, put(base), tuple(put(a) for a in arrs), hps[j.out_name],
                                        leaf_key(seed, j.out_name), stats[j.out_name], vws[j.out_name])
                    _out.append(jax.tree.map(np.asarray, r))
                    bufs.put(raw)

                stream(collect)
                finals = program.finalize(pi, collected, [hps[j.out_name] for j in jobs])
                for j, v in zip(jobs, finals):
                    stats[j.out_name].setdefault(sname, {})[phase.name] = v
                if not quiet:
                    bar.write(f"statistics pass '{phase.name}' done")

            futures = collections.deque()
            done_count = [0]

            def finish(j, out, raw):
                arr = np.asarray(out)
                writer.write(j.out_name, arr)
                bufs.put(raw)
                bar.update(in_bytes(j))
                done_count[0] += 1
                if _fail_after is not None and done_count[0] >= _fail_after:
                    raise RuntimeError(f"injected failure after {done_count[0]} tensors")

            def merge_one(j, base, arrs, raw):
                if method is None:  # passthrough: copy (and scale) the bytes
                    a = arrs[0]
                    if j.scale != 1.0:
                        a = (a.astype(np.float32) * np.float32(j.scale))
                    out = a.astype(j.dtype, copy=False)
                else:
                    out = merge_leaf(method, put(base), tuple(put(a) for a in arrs), hp=hps[j.out_name],
                                     path=j.out_name, seed=seed, stats=stats[j.out_name] or None,
                                     out_dtype=j.dtype, view=vws[j.out_name])
                futures.append((in_bytes(j), wpool.submit(finish, j, out, raw)))
                # bound the merges in flight (JAX dispatches asynchronously) by count and by bytes
                while futures and (len(futures) > window or futures[0][1].done()
                                   or sum(b for b, _ in futures) > max_inflight_bytes):
                    futures.popleft()[1].result()

            stream(merge_one)
            while futures:
                futures.popleft()[1].result()
            bar.close()
            # config, tokenizer, model card
            if plan.slices is not None and first_cfg is not None:
                cfgj = dict(first_cfg)
                n = count_layers([j.out_name for j in jobs])
                for k in ("num_hidden_layers", "n_layer", "num_layers"):
                    if k in cfgj:
                        cfgj[k] = n
                writer.write_text("config.json", json.dumps(cfgj, indent=2))
                c.copy_aux_files(src_dir, writer, config=False, tokenizer=copy_tokenizer,
                                 tokenizer_source=_tok_src(plan, src_dir))
            elif os.path.isdir(src_dir):
                c.copy_aux_files(src_dir, writer, config=True, tokenizer=copy_tokenizer,
                                 tokenizer_source=_tok_src(plan, src_dir))
                if first_cfg is not None and (plan.config.out_dtype or plan.config.dtype):
                    cfgj = dict(first_cfg)
                    cfgj["torch_dtype"] = np.dtype(jobs[0].dtype).name
                    cfgj["dtype"] = cfgj["torch_dtype"]
                    writer.write_text("config.json", json.dumps(cfgj, indent=2))
            if plan.config.chat_template and copy_tokenizer:
                writer.write_text("chat_template.jinja", plan.config.chat_template)
            writer.write_text("README.md", c.model_card(plan.yaml_text, str(plan.mergekit_name or plan.method_name),
                                                        list(paths)))
        return {"out_dir": os.path.abspath(out_dir), "tensors": len(jobs), "bytes_read": total_in,
                "bytes_written": int(writer.total_size), "seconds": time.perf_counter() - t0}
    finally:
        for p in pools:
            p.shutdown(wait=True, cancel_futures=True)
        for r in readers:
            r.close()


def _tok_src(plan, default: str) -> Optional[str]:
    ts = plan.config.tokenizer_source
    if ts in (None, "base", "union"):
        return None
    return ts if os.path.isdir(ts) else None
