#!/usr/bin/env python3
"""The floor of an out-of-core merge on this machine, and jmerge's task arithmetic as a multiple of it.

The floor reads every input tensor (base + 3 fine-tunes of ``scripts/bench_vs_mergekit.py``'s cached
Llama-shaped bf16 models) and writes an output of the same size as the merge's, through jmerge's own
reader, executor and writer (``run_jobs``: the same read-ahead, buffer pool, writer thread and atomic
``CheckpointWriter``) with no merge arithmetic: each job's "program" returns the base tensor as read.
Both run as subprocesses in the same invocation (page cache warmed before each), alternating floor and
merge, with wall, user and system CPU seconds, minor page faults and peak RSS of each.

    python scripts/bench_floor.py                  # full size (~0.54B params, 3.9 GB read)
    python scripts/bench_floor.py --size small

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for the tensor-by-tensor model;
Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_mergekit as bvm  # noqa: E402  (the cached models, the timed wrapper, the warm-up read)


class _NoArithmetic:
    """A stand-in for the method's ``LeafProgram``: the merged tensor is the base as read (no arithmetic)."""

    phases = ()

    def __call__(self, base, models, hp, key, stats=None, view=None, **options):
        return base  # whatever options the executor passes (dtypes, compile options, stacking)


def copy_floor(dirs: list[str], out_dir: str) -> None:
    """Read every tensor of every input in ``dirs`` and write the first's (same size as a merge's output)."""
    import numpy as np

    from jmerge.io import CheckpointWriter, open_checkpoint
    from jmerge.pipeline.executor import MergeContext, run_jobs
    from jmerge.pipeline.jobs import Merge, Tensor, TensorJob

    readers = [open_checkpoint(d) for d in dirs]
    try:
        names = readers[0].keys()
        jobs = [TensorJob(n, tuple(readers[0].shape(n)), np.dtype(readers[0].dtype(n)),
                          Merge(Tensor(0, n), tuple(Tensor(i, n) for i in range(1, len(readers)))),
                          np.dtype(readers[0].dtype(n))) for n in names]
        # entrywise (the "merge" returns the base's rows as read): large tensors go in blocks of rows, as task
        # arithmetic's do, so the floor reads and writes through the same path and memory
        ctx = MergeContext(program=_NoArithmetic(), hparams={n: {} for n in names}, views={n: None for n in names},
                           seed=0, entrywise=True)
        with CheckpointWriter(out_dir, [(j.out_name, j.shape, j.dtype) for j in jobs], overwrite=True) as w:
            run_jobs(jobs, readers, w, ctx, tune_malloc=True)  # as run_merge does
    finally:
        for r in readers:
            r.close()


def floor_cmd(dirs: list[str], out_dir: str) -> list[str]:
    """The command line of one floor run (for :func:`bench_vs_mergekit.timed`)."""
    return [sys.executable, os.path.abspath(__file__), "--copy-floor", out_dir, *dirs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(bvm.SIZES), default="full")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jmerge-bench"))
    ap.add_argument("--repeat", type=int, default=2, help="floor/merge pairs (after one cold merge)")
    ap.add_argument("--copy-floor", nargs="+", metavar=("OUT", "INPUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.copy_floor:
        copy_floor(a.copy_floor[1:], a.copy_floor[0])
        return 0

    dirs = bvm.make_models(os.path.join(a.cache, a.size), a.size)
    in_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    work = tempfile.mkdtemp(prefix="jmerge-floor-", dir=a.cache)
    runs: list[tuple[str, dict]] = []
    try:
        cfg = os.path.join(work, "task_arithmetic.yml")
        with open(cfg, "w") as f:
            f.write(bvm.CONFIGS["task_arithmetic"].format(base=dirs[0], ft1=dirs[1], ft2=dirs[2], ft3=dirs[3]))
        jm_out, fl_out = os.path.join(work, "jm"), os.path.join(work, "floor")
        jcmd = [sys.executable, "-m", "jmerge.cli", "merge", cfg, jm_out, "--quiet", "--overwrite",
                "--compile-cache", os.path.join(work, "xla-cache")]
        bvm.warm(dirs)
        runs.append(("jmerge cold", bvm.with_moved(bvm.timed(jcmd), in_bytes, jm_out)))
        for _ in range(a.repeat):
            bvm.warm(dirs)
            runs.append(("floor", bvm.with_moved(bvm.timed(floor_cmd(dirs, fl_out)), in_bytes, fl_out)))
            bvm.warm(dirs)
            runs.append(("jmerge warm", bvm.with_moved(bvm.timed(jcmd), in_bytes, jm_out)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, r in runs:
        if r["rc"] != 0:
            print(f"{name} failed:\n{r['err']}")
            return 1
    print(f"size={a.size}; input {in_bytes / 1e9:.2f} GB; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'run':<14}{'wall s':>8}{'user s':>8}{'sys s':>8}{'minor faults':>14}{'faults/GB':>11}{'RSS GB':>8}"
          f"{'load':>7}")
    for name, x in runs:
        print(f"{name:<14}{x['wall']:>8.2f}{x['user']:>8.2f}{x['sys']:>8.2f}{x['minflt']:>14,}"
              f"{x['faults_per_gb']:>11,.0f}{x['maxrss_kb'] / 1e6:>8.2f}{x.get('load', float('nan')):>7.1f}")
    floor = min(x["wall"] for n, x in runs if n == "floor")
    warm = min(x["wall"] for n, x in runs if n == "jmerge warm")
    print(f"task arithmetic (warm compile cache) = {warm / floor:.2f}x the floor ({warm:.2f} s / {floor:.2f} s, "
          f"best of {a.repeat} each)")
    print(json.dumps({"floor_s": floor, "jmerge_warm_s": warm, "multiple": warm / floor}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
