"""Batched sweep vs a Python loop: 64 TIES settings (λ x density, 8 x 8) on the quality benchmark's models.

    python scripts/bench_sweep.py                 # loop vs batched, then 1/2/4/8 simulated devices
    python scripts/bench_sweep.py --no-scaling --eval-images 64
    python scripts/bench_sweep.py --eval none     # the merges alone (a checksum of the merged params)
    python scripts/bench_sweep.py --platform default --no-scaling   # on the machine's GPU/TPU (default: CPU)

* loop: what a user writes without jmerge.sweep: for each setting ``jmerge.merge(jmerge.ties(), ...)`` and a
  jitted evaluation (``float(...)`` of it), 64 times. Its first iteration compiles (every leaf shape's merge
  program, and the evaluation); the figure counts that. After the timed loop the child times the evaluation
  alone and the merge alone (a few calls each), so the report splits a setting's cost between the two.
* batched: ``jmerge.sweep.run_sweep`` with the same settings and evaluation: one traced program (merge +
  evaluation, settings axis over the devices; on CPU the merges of a device's settings vmapped, so work no
  setting changes is done once, and the evaluations one at a time). Trace + lower, XLA compile and run are
  reported apart.

Both run in fresh processes (no compilation cache shared), so "total" is what a user's first sweep costs;
``--warm`` adds a second pair of runs that share JAX's persistent compilation cache (a user's next sweep on the
same models, as ``jmerge sweep`` enables it).

The models and the evaluation are the benchmark's own (:func:`jmerge.demo.load_benchmark`: the models
``jmerge demo`` trains and caches; :func:`jmerge.demo.task_evaluator` on the validation split, where the
benchmark's sweeps choose hyperparameters): the mean accuracy over the 8 tasks of the merged backbone with
each task's frozen head, on all 270 validation images per task (``--eval-images N``: the first N). The
evaluation is the same computation in both paths and no merge implementation can skip it; the report prints
its cost as separate calls and the speed-up the batched run would reach with no trace or compile at all.
Results of both paths must agree (same accuracies); the script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(eval_images: int | None, kind: str = "val"):
    """The quality benchmark's models and its validation evaluation: ``(base, models, eval_fn, info)``.

    ``kind="val"``: the benchmark's validation accuracy (first ``eval_images`` images per task, or all);
    ``"none"``: a checksum of the merged params (the sum of every leaf's sum), so both paths time the merges.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jmerge.demo import load_benchmark as load, task_evaluator

    base, models, heads, splits = load()
    x, y = splits["val"]
    if eval_images:
        splits = dict(splits, val=(x[:, :eval_images], y[:, :eval_images]))
    ev = task_evaluator(heads, splits, "val")

    if kind == "none":
        def eval_fn(backbone):
            return sum(jnp.sum(a) for a in jax.tree.leaves(backbone))
    else:
        def eval_fn(backbone):  # mean accuracy over tasks, each task's frozen head on the merged backbone
            return ev(backbone)["accuracy"]
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(base))
    info = {"tasks": len(models), "params_per_model": n_params, "leaves": len(jax.tree.leaves(base)),
            "eval": kind, "eval_images_per_task": int(splits["val"][0].shape[1]),
            "val_images_per_task": int(x.shape[1]), "config": str(splits["model_config"])}
    return base, models, eval_fn, info


def settings(n: int):
    import numpy as np
    k = int(round(n ** 0.5))
    return [{"scale": float(s), "density": float(d)} for s in np.linspace(0.3, 1.5, k)
            for d in np.linspace(0.1, 0.8, n // k)]


def child(args) -> dict:
    """One measured path in this (fresh) process."""
    t0 = time.perf_counter()
    import jax
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jmerge
    import jmerge.sweep as sw
    base, models, eval_fn, info = load_benchmark(args.eval_images, args.eval)
    sets = settings(args.settings)
    out = {"path": args.child, "devices": len(jax.devices()), "device": str(jax.devices()[0].device_kind), "info": info,
           "load_s": time.perf_counter() - t0}
    if args.child == "loop":
        ev = jax.jit(eval_fn)
        accs, times = [], []
        for s in sets:
            t = time.perf_counter()
            merged = jmerge.merge(jmerge.ties(), base, models, hparams=s)
            accs.append(float(ev(merged)))
            times.append(time.perf_counter() - t)
        out.update(metrics=accs, total_s=sum(times), first_s=times[0], rest_s=sum(times[1:]),
                   per_setting_s=sum(times[1:]) / max(1, len(times) - 1))
        # After the timed loop: the evaluation alone and the merge alone (what a setting's time is made of).
        k = min(8, len(sets))
        t = time.perf_counter()
        for _ in range(k):
            float(ev(merged))
        out["eval_s"] = (time.perf_counter() - t) / k
        t = time.perf_counter()
        for s in sets[:k]:
            jax.block_until_ready(jmerge.merge(jmerge.ties(), base, models, hparams=s))
        out["merge_s"] = (time.perf_counter() - t) / k
    else:
        t = time.perf_counter()
        res = sw.run_sweep(jmerge.ties(), base, models, sets, eval_fn, mode="max", progress=False,
                           vmap_width=_width(args.vmap_width), batch_size=args.batch)
        total = time.perf_counter() - t
        out.update(metrics=[r["metrics"]["metric"] for r in res.records], total_s=total, **res.timings,
                   other_s=total - sum(res.timings.values()), per_setting_s=res.timings["run_s"] / len(sets))
    return out


def _width(v: str):
    return None if v == "none" else v if v in ("auto", "merge") else int(v)


def run_child(path: str, devices: int, args, cache: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    if args.platform != "default":
        env["JAX_PLATFORMS"] = args.platform
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--settings", str(args.settings),
           "--eval-images", str(args.eval_images), "--eval", args.eval]
    cmd += ["--vmap-width", str(args.vmap_width), "--platform", args.platform]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    if cache:
        cmd += ["--cache", cache]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{path} on {devices} device(s) failed:\n{r.stderr[-3000:]}")
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))[6:])


def _line(name: str, r: dict) -> str:
    if r["path"] == "loop":
        return (f"{name:<26} total {r['total_s']:7.2f} s = first setting (compiles) {r['first_s']:6.2f} s + "
                f"{len(r['metrics']) - 1} more {r['rest_s']:6.2f} s ({r['per_setting_s'] * 1e3:.1f} ms each; alone: "
                f"evaluation {r['eval_s'] * 1e3:.1f} ms, merge {r['merge_s'] * 1e3:.1f} ms)")
    return (f"{name:<26} total {r['total_s']:7.2f} s = trace+lower {r['trace_s']:6.2f} s + compile "
            f"{r['compile_s']:6.2f} s + run {r['run_s']:6.2f} s ({r['per_setting_s'] * 1e3:.1f} ms/setting)"
            f" + host {r['other_s']:.2f} s")


def _warm(args, figures: dict) -> int:
    """Each path twice in fresh processes sharing a persistent compilation cache; the second run is reported."""
    with tempfile.TemporaryDirectory() as d:
        for path in ("loop", "batched"):
            run_child(path, 1, args, cache=os.path.join(d, path))  # fills the cache
            figures[f"{path}_warm"] = r = run_child(path, 1, args, cache=os.path.join(d, path))
            print(_line(f"{path}, warm compile cache", r), flush=True)
    print(f"speed-up (warm cache, total): {figures['loop_warm']['total_s'] / figures['batched_warm']['total_s']:.2f}x")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=0,
                   help="validation images per task (default 0: all of the benchmark's validation split, 270)")
    p.add_argument("--eval", choices=("val", "none"), default="val",
                   help="'val': validation accuracy (default); 'none': a checksum of the merged params (merges only)")
    p.add_argument("--vmap-width", default="auto",
                   help="'auto', 'merge', 'none' or a number (jmerge.sweep.SettingsProgram)")
    p.add_argument("--batch", type=int, default=None, help="settings per program call (default: all)")
    p.add_argument("--devices", default="1,2,4,8", help="simulated device counts of the scaling runs")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--warm", action="store_true", help="also runs sharing a persistent compilation cache")
    p.add_argument("--warm-only", action="store_true", help="only the runs sharing a compilation cache")
    p.add_argument("--scaling-only", action="store_true", help="only the batched runs on --devices")
    p.add_argument("--platform", default="cpu",
                   help="JAX platform of the measured runs: 'cpu' (default), 'gpu', 'tpu' or 'default' (JAX's choice)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--child", choices=("loop", "batched"), help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT" + json.dumps(child(args)), flush=True)
        return 0

    from jmerge.demo import load_benchmark as load
    load(quiet=False)  # the benchmark's models: trained once (about 90 s on 2 idle cores), then cached
    if args.warm_only:
        return _warm(args, {})
    if args.scaling_only:
        for n in [int(x) for x in args.devices.split(",")]:
            r = run_child("batched", n, args)
            print(f"  {n} device(s): trace+lower {r['trace_s']:6.2f} s, compile {r['compile_s']:6.2f} s, run "
                  f"{r['run_s']:6.2f} s, total {r['total_s']:6.2f} s; metrics[:4] {r['metrics'][:4]}", flush=True)
        return 0
    loop = run_child("loop", 1, args)
    batched = run_child("batched", 1, args)
    info = loop["info"]
    ev = (f"validation accuracy, {info['eval_images_per_task']} of {info['val_images_per_task']} images per task"
          if info["eval"] == "val" else "none (a checksum of the merged params)")
    print(f"models: jmerge demo's ({info['config']}; {info['tasks']} fine-tuned backbones, {info['params_per_model']} "
          f"parameters in {info['leaves']} leaves); eval: {ev}; {len(loop['metrics'])} TIES settings (scale x "
          f"density); 1 device ({loop['device']}), {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(_line("loop (merge + eval) x N", loop))
    print(_line("batched (run_sweep)", batched))
    diff = max(abs(a - b) for a, b in zip(loop["metrics"], batched["metrics"]))
    print(f"speed-up (total): {loop['total_s'] / batched['total_s']:.2f}x; run only (excluding the first "
          f"setting / compile): {loop['rest_s'] * len(loop['metrics']) / max(1, len(loop['metrics']) - 1) / batched['run_s']:.2f}x;"
          f" max |metric difference| {diff:.3g}")
    n = len(loop["metrics"])
    floor = n * loop["eval_s"]
    print(f"bound: {n} evaluations alone take {floor:.2f} s as separate calls ({loop['eval_s'] * 1e3:.1f} ms each; the "
          f"merges alone {loop['merge_s'] * 1e3:.1f} ms each in the loop); the batched program runs a setting (merge + "
          f"evaluation) in {batched['per_setting_s'] * 1e3:.1f} ms, so even with no trace or compile it would beat "
          f"the loop by at most {loop['total_s'] / batched['run_s']:.2f}x (total)")
    figures = {"loop": loop, "batched": batched}
    if info["eval"] == "val":
        ok = diff <= 1.0 / (info["eval_images_per_task"] * info["tasks"]) + 1e-6  # at most one image flips
    else:  # checksums of equal merges, reduced in two programs
        ok = all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(loop["metrics"], batched["metrics"]))
    if args.warm:
        _warm(args, figures)
    if not args.no_scaling:
        print("scaling (batched, simulated CPU devices on this machine):")
        base_run = None
        for n in [int(x) for x in args.devices.split(",")]:
            r = batched if n == 1 else run_child("batched", n, args)
            base_run = base_run or r
            figures[f"batched_{n}dev"] = r
            print(f"  {n} device(s): trace+lower {r['trace_s']:6.2f} s, compile {r['compile_s']:6.2f} s, run "
                  f"{r['run_s']:6.2f} s (x{base_run['run_s'] / r['run_s']:.2f} vs 1 device), total {r['total_s']:6.2f} s")
            ok &= max(abs(a - b) for a, b in zip(r["metrics"], batched["metrics"])) <= 1e-6
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    if not ok:
        print("FAILED: the batched results differ from the loop's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
