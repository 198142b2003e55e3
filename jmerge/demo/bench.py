"""The digits merging benchmark: train (or load) the models, merge with every method, evaluate.

Protocol (a small-scale copy of the CLIP ViT 8-task benchmark of the model-merging papers):

1. **Pretraining**: the backbone and a 10-way head learn digit identity on half of the training
   images with a generic augmentation (random 1-pixel shifts, pixel noise). Only the backbone is kept.
2. **Zero-shot** (our stand-in for CLIP's zero-shot heads): the pretrained backbone stays frozen and
   each task gets a linear probe trained on its training split. "Zero-shot" thus means *no change to
   the backbone for the task*, not "no task data at all".
3. **Individual**: for each task, backbone and head (initialised from the probe) are fine-tuned on
   the task's training split. These are the eight models that get merged.
4. **Multi-task**: one backbone and the eight heads trained jointly: the upper reference.
5. **Merges**: the eight fine-tuned backbones are merged into one with every available jmerge method;
   the merged backbone is evaluated on every task with that task's own fine-tuned head.

Reported: per-task test accuracy, the average, and the normalised accuracy (merged accuracy divided
by the individual model's accuracy on the task, averaged over tasks).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from .tasks import TASKS, load_images, split_indices, task_data

__all__ = ["DemoConfig", "REDUCED", "FULL", "build_models", "run_benchmark", "run_demo", "add_arguments",
           "main_from_args", "format_table", "DEFAULT_HPARAMS", "LITERATURE_ORDER", "DEMO_METHODS", "LEARNED"]

CACHE_VERSION = 1

# Data-free methods: hyperparameters used in the benchmark (others run with their factory defaults).
DEFAULT_HPARAMS: dict[str, dict] = {
    "task_arithmetic": {"scale": 0.3},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_ties": {"density": 0.5, "scale": 1.0},
    "dare_linear": {"density": 0.5, "scale": 0.3},
    "della_linear": {"scale": 0.3},
    "breadcrumbs": {"scale": 0.3},
    "breadcrumbs_ties": {"scale": 1.0},
    "della": {"scale": 1.0},
    "magmax": {"scale": 0.5},
    "consensus_ta": {"scale": 0.3},
    "consensus_ties": {"scale": 1.0},
    "pcb": {"scale": 1.0},
}
# Not merges of several task models into one (or not applicable to 8 models): never run.
SKIP_ALWAYS = {"negation": "negates one task vector (forgetting), not a multi-task merge"}

LITERATURE_ORDER = ("task arithmetic < TIES < layer-wise AdaMerging < individual "
                    "(CLIP ViT-B/32, 8 tasks: 68.0 < 72.2 < 82.6 < 90.3; FusionBench)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules of one benchmark run (all of it enters the cache key)."""

    model: M.ModelConfig = M.ModelConfig(width=48, depth=2, heads=4)
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS)
    pretrain_steps: int = 500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    pretrain_fraction: float = 0.5
    probe_steps: int = 300
    finetune_steps: int = 150
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    multitask_steps: int = 300
    multitask_batch: int = 16
    adamerging_steps: int = 100
    chunks: int = 10

    def cache_key(self, seed: int) -> str:
        d = dataclasses.asdict(self)
        d.pop("adamerging_steps")
        d.pop("chunks")
        blob = json.dumps({"config": d, "seed": seed, "version": CACHE_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


REDUCED = DemoConfig()
FULL = DemoConfig(model=M.ModelConfig(width=64, depth=3, heads=4), pretrain_steps=1500, pretrain_batch=128,
                  probe_steps=500, finetune_steps=400, finetune_batch=32, multitask_steps=1000,
                  multitask_batch=32, adamerging_steps=300)


# ----------------------------------------------------------------------------------------------
# Data and training


def _data(cfg: DemoConfig):
    images, digits = load_images()
    tr, te = split_indices(len(images), 0.3, seed=0)
    tasks = [t for t in TASKS if t.name in cfg.tasks]
    if len(tasks) != len(cfg.tasks):
        unknown = set(cfg.tasks) - {t.name for t in TASKS}
        raise ValueError(f"unknown demo tasks {sorted(unknown)}; known: {[t.name for t in TASKS]}")
    xs, ys = zip(*(task_data(t, images, digits) for t in tasks))
    xs, ys = np.stack(xs), np.stack(ys)
    masks = np.stack([M.class_mask(t.num_classes) for t in tasks])
    return dict(tasks=tasks, x_train=xs[:, tr], y_train=ys[:, tr], x_test=xs[:, te], y_test=ys[:, te],
                masks=masks, pre_x=images.reshape(-1, 64)[tr], pre_y=digits[tr])


def _flatten(prefix: str, tree) -> dict:
    from flax.traverse_util import flatten_dict
    return {f"{prefix}/{k}": np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}


def _unflatten(prefix: str, flat) -> dict:
    from flax.traverse_util import unflatten_dict
    n = len(prefix) + 1
    return jax.tree.map(jnp.asarray, unflatten_dict({k[n:]: flat[k] for k in flat if k.startswith(prefix + "/")},
                                                    sep="/"))


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "jmerge", "demo")


def build_models(cfg: DemoConfig, data: dict, *, seed: int = 0, cache_dir: str | None = None,
                 quiet: bool = False) -> tuple[dict, bool]:
    """Pretrained backbone, probes, fine-tuned models and multi-task model; cached on disk.

    Returns ``(models, from_cache)``. The cache file is keyed by a hash of ``cfg`` and ``seed``.
    """
    cache_dir = cache_dir or _default_cache_dir()
    path = os.path.join(cache_dir, f"models-{cfg.cache_key(seed)}.npz")
    names = ("base", "probe_heads", "ft_backbones", "ft_heads", "mtl")
    if os.path.exists(path):
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
        return {n: _unflatten(n, flat) for n in names}, True

    from tqdm.auto import tqdm

    T = len(data["tasks"])
    mc = cfg.model
    total = cfg.pretrain_steps + cfg.finetune_steps + cfg.multitask_steps
    bar = tqdm(total=total, desc="training", unit="step", disable=quiet, file=sys.stderr)
    key = jax.random.key(seed)
    k_init, k_head, k_pre, k_ft, k_mtl = jax.random.split(key, 5)

    # 1. pretraining: digit identity on part of the train split, with augmentation
    bar.set_postfix_str("pretrain")
    n_pre = int(len(data["pre_x"]) * cfg.pretrain_fraction)
    params = {"backbone": M.init_backbone(mc, k_init), "head": M.init_head(mc, k_head, 0.02)}
    params, _ = M.train_loop(mc, params, jnp.asarray(data["pre_x"][:n_pre]), jnp.asarray(data["pre_y"][:n_pre]),
                             jnp.asarray(M.class_mask(10)), steps=cfg.pretrain_steps, batch=cfg.pretrain_batch,
                             lr=cfg.pretrain_lr, key=k_pre, augment=True, chunks=cfg.chunks, progress=bar.update)
    base = params["backbone"]

    # 2. zero-shot heads: linear probes on the frozen base
    bar.set_postfix_str("probes")
    xtr, ytr, masks = map(jnp.asarray, (data["x_train"], data["y_train"], data["masks"]))
    probe = M.train_probes(mc, base, xtr, ytr, masks, steps=cfg.probe_steps)

    # 3. individual fine-tuning of backbone + head, all tasks in one vmapped program
    bar.set_postfix_str("fine-tune x%d" % T)
    stacked = {"backbone": jax.tree.map(lambda a: jnp.broadcast_to(a, (T,) + a.shape), base), "head": probe}
    ft, _ = M.train_loop(mc, stacked, xtr, ytr, masks, steps=cfg.finetune_steps, batch=cfg.finetune_batch,
                         lr=cfg.finetune_lr, key=k_ft, chunks=cfg.chunks, progress=bar.update, tasks_axis=True)

    # 4. multi-task training
    bar.set_postfix_str("multi-task")
    mtl, _ = M.train_multitask(mc, {"backbone": base, "heads": probe}, xtr, ytr, masks, steps=cfg.multitask_steps,
                               batch=cfg.multitask_batch, lr=cfg.finetune_lr, key=k_mtl, chunks=cfg.chunks,
                               progress=bar.update)
    bar.close()
    models = {"base": base, "probe_heads": probe, "ft_backbones": ft["backbone"], "ft_heads": ft["head"],
              "mtl": mtl}
    os.makedirs(cache_dir, exist_ok=True)
    flat = {}
    for n in names:
        flat.update(_flatten(n, models[n]))
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    return models, False


# ----------------------------------------------------------------------------------------------
# Merging


def _unstack(tree, T):
    return [jax.tree.map(lambda a: a[t], tree) for t in range(T)]


def _data_free_methods(names: Sequence[str] | None, T: int):
    import jmerge
    avail = jmerge.available_methods()
    chosen = list(avail) if names is None else [n for n in names if n in avail]
    runs, skipped = [], {}
    if names is not None:
        for n in names:
            if n not in avail and n not in LEARNED:
                skipped[n] = "not available in this jmerge"
    for name in chosen:
        if name in SKIP_ALWAYS:
            if names is not None:
                skipped[name] = SKIP_ALWAYS[name]
            continue
        hp = DEFAULT_HPARAMS.get(name, {})
        try:
            method = avail[name](**hp)
        except TypeError:
            method, hp = avail[name](), {}
        if method.max_models is not None and method.max_models < T:
            skipped[name] = f"takes at most {method.max_models} models"
            continue
        if method.min_models > T:
            skipped[name] = f"needs at least {method.min_models} models"
            continue
        runs.append((name, method, hp))
    return runs, skipped


def _task_fns(ctx):
    mc = ctx["model_config"]
    return [(lambda p, x, t=t: M.logits(mc, p, ctx["heads"][t], x, ctx["masks"][t])[:, :ctx["num_classes"][t]])
            for t in range(ctx["T"])]


def _adamerging(granularity):
    def run(ctx):
        import jmerge
        res = jmerge.adamerging(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_test"]),
                                granularity=granularity, steps=ctx["steps"], batch_size=16, seed=ctx["seed"])
        return res.params, {"steps": ctx["steps"], "batch_size": 16, "init": 0.3,
                            "loss": "entropy on unlabeled test inputs"}
    return run


def _atlas(ctx):
    import jmerge
    res = jmerge.atlas(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_test"]), steps=ctx["steps"],
                       batch_size=16, seed=ctx["seed"])
    return res.params, {"steps": ctx["steps"], "batch_size": 16, "loss": "entropy on unlabeled test inputs"}


def _concrete(ctx):
    import jmerge
    res = jmerge.concrete_merge(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_test"]),
                                inner="task_arithmetic", scale=0.3, steps=ctx["steps"], batch_size=16,
                                seed=ctx["seed"])
    return res.params, {"inner": "task_arithmetic", "scale": 0.3, "steps": ctx["steps"], "batch_size": 16}


def _fisher(ctx):
    import jmerge
    res = jmerge.fisher_merge(_task_fns(ctx), ctx["models"], batches=list(ctx["x_train"]), n_examples=256,
                              seed=ctx["seed"])
    return res.params, {"n_examples": 256, "data": "train inputs, labels sampled from each model"}


def _regmean(ctx):
    import jmerge
    mc = ctx["model_config"]
    n = 256

    def apply(p, x):
        return M.Backbone(mc).apply({"params": p}, x)

    grams = []
    for t, m in enumerate(ctx["models"]):
        g = jmerge.gram_matrices(apply, m, ctx["x_train"][t][:n])
        grams.append({(k[len("params."):] if k.startswith("params.") else k): v for k, v in g.items()})
    res = jmerge.regmean_merge(ctx["models"], grams, alpha=0.95)
    return res.params, {"alpha": 0.95, "n_examples": n, "linear layers": len(grams[0])}


LEARNED = {
    "adamerging_task": ("adamerging", _adamerging("task")),
    "adamerging_layer": ("adamerging", _adamerging("layer")),
    "atlas": ("atlas", _atlas),
    "concrete_ta": ("concrete_merge", _concrete),
    "fisher": ("fisher_merge", _fisher),
    "regmean": ("regmean_merge", _regmean),
}

# The reduced demo runs these (the full benchmark runs every available method).
DEMO_METHODS = ("linear", "task_arithmetic", "ties", "magmax", "tsv_m", "iso_c", "regmean",
                "adamerging_task", "adamerging_layer")


def _pretty(name: str) -> str:
    return name


def run_benchmark(cfg: DemoConfig = REDUCED, *, seed: int = 0, cache_dir: str | None = None,
                  methods: Sequence[str] | None = None, quiet: bool = False) -> dict:
    """Build or load the models, evaluate references, merge with every method and evaluate.

    Args:
      cfg: sizes and schedules.
      seed: training and merging seed.
      cache_dir: where trained models are cached (default ``~/.cache/jmerge/demo``).
      methods: method names to run (data-free names from ``jmerge.available_methods()`` and
        ``adamerging_task`` / ``adamerging_layer``); default all.
      quiet: no progress bars.

    Returns:
      ``{"tasks": [...], "rows": [{"method", "kind", "acc": [...], "avg", "normalized", "seconds", "hparams"}],
      "skipped": {name: reason}, "from_cache": bool, "timings": {...}}``.
    """
    import jmerge
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    data = _data(cfg)
    models, from_cache = build_models(cfg, data, seed=seed, cache_dir=cache_dir, quiet=quiet)
    t_train = time.perf_counter() - t0
    mc, T = cfg.model, len(data["tasks"])
    xte, yte, masks = map(jnp.asarray, (data["x_test"], data["y_test"], data["masks"]))
    heads = models["ft_heads"]

    rows = []

    def add(name, kind, acc, secs=0.0, hp=None, ind=None):
        acc = [float(a) for a in acc]
        row = {"method": name, "kind": kind, "acc": acc, "avg": float(np.mean(acc)), "seconds": secs,
               "hparams": hp or {}}
        row["normalized"] = float(np.mean(np.asarray(acc) / np.asarray(ind))) if ind is not None else None
        rows.append(row)
        return row

    zs = M.accuracy(mc, models["base"], models["probe_heads"], xte, yte, masks)
    ind = M.accuracy(mc, models["ft_backbones"], heads, xte, yte, masks, backbone_per_task=True)
    mtl = M.accuracy(mc, models["mtl"]["backbone"], models["mtl"]["heads"], xte, yte, masks)
    add("zero-shot (frozen base + linear probe)", "reference", zs, ind=ind)
    add("individual fine-tuned", "reference", ind, ind=ind)
    add("multi-task trained", "reference", mtl, ind=ind)

    base = models["base"]
    ft_list = _unstack(models["ft_backbones"], T)
    runs, skipped = _data_free_methods(methods, T)
    learned = [n for n in LEARNED if methods is None or n in methods]
    heads_list = _unstack(heads, T)
    bar = tqdm(total=len(runs) + len(learned), desc="merging", unit="method", disable=quiet, file=sys.stderr)
    for name, method, hp in runs:
        bar.set_postfix_str(name)
        t1 = time.perf_counter()
        try:
            merged = jmerge.merge(method, base, ft_list, seed=seed)
            acc = M.accuracy(mc, merged, heads, xte, yte, masks)
            add(name, "data-free", acc, time.perf_counter() - t1, hp, ind)
        except Exception as e:  # a method that cannot run here is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        bar.update(1)
    for name in learned:
        fn_name, fn = LEARNED[name]
        bar.set_postfix_str(name)
        if not hasattr(jmerge, fn_name):
            skipped[name] = f"jmerge.{fn_name} not available in this jmerge"
            bar.update(1)
            continue
        t1 = time.perf_counter()
        ctx = dict(model_config=mc, T=T, heads=heads_list, masks=list(masks), base=base, models=ft_list,
                   x_test=xte, x_train=jnp.asarray(data["x_train"]), num_classes=[t.num_classes for t in data["tasks"]], steps=cfg.adamerging_steps,
                   seed=seed)
        try:
            merged, hp = fn(ctx)
            acc = M.accuracy(mc, merged, heads, xte, yte, masks)
            add(name, "learned", acc, time.perf_counter() - t1, hp, ind)
        except Exception as e:
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        bar.update(1)
    bar.close()
    return {"tasks": [t.name for t in data["tasks"]], "task_descriptions": [t.description for t in data["tasks"]],
            "rows": rows, "skipped": skipped, "from_cache": from_cache,
            "timings": {"build_s": t_train, "total_s": time.perf_counter() - t0}, "config": dataclasses.asdict(cfg),
            "seed": seed}


# ----------------------------------------------------------------------------------------------
# Output


def format_table(results: dict, markdown: bool = True) -> str:
    """The results as a Markdown table (accuracies in %)."""
    tasks = results["tasks"]
    head = ["method", "kind"] + tasks + ["avg", "norm."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        norm = "" if r["normalized"] is None else f"{100 * r['normalized']:.1f}"
        cells = [r["method"], r["kind"]] + [f"{100 * a:.1f}" for a in r["acc"]] + [f"{100 * r['avg']:.1f}", norm]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: str, *, title: str = "jmerge digits merging benchmark") -> dict:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``accuracy.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in
             dict(md="results.md", csv="results.csv", json="results.json", png="accuracy.png").items()}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "kind"] + results["tasks"] + ["avg", "normalized", "seconds", "hparams"])
        for r in results["rows"]:
            w.writerow([r["method"], r["kind"]] + [f"{a:.4f}" for a in r["acc"]]
                       + [f"{r['avg']:.4f}", "" if r["normalized"] is None else f"{r['normalized']:.4f}",
                          f"{r['seconds']:.2f}", json.dumps(r["hparams"], sort_keys=True)])
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = [f"# {title}", "",
          "Test accuracy (%) of one merged backbone per method on 8 tasks built from scikit-learn's digits "
          "(1797 real 8x8 images), each task evaluated with its own head; *norm.* = mean over tasks of "
          "merged / individual accuracy. Expected shape from the literature: " + LITERATURE_ORDER + ".", "",
          "Tasks: " + "; ".join(f"**{n}**: {d}" for n, d in zip(results["tasks"], results["task_descriptions"])),
          "", format_table(results), ""]
    if results["skipped"]:
        md += ["Not run:", ""] + [f"- `{k}`: {v}" for k, v in sorted(results["skipped"].items())] + [""]
    hp_lines = [f"- `{r['method']}`: {json.dumps(r['hparams'], sort_keys=True)}" for r in results["rows"]
                if r["kind"] != "reference"]
    md += ["Hyperparameters (methods not listed with values use their factory defaults):", ""] + hp_lines + [""]
    md += [f"Seed {results['seed']}; models {'loaded from cache' if results['from_cache'] else 'trained'}; "
           f"total {results['timings']['total_s']:.0f} s.", ""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    try:
        _plot(results, paths["png"])
    except ImportError:  # matplotlib missing: table outputs only
        paths.pop("png")
    return paths


def _plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    colors = {"reference": "#888888", "data-free": "#4C72B0", "learned": "#DD8452"}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [100 * r["avg"] for r in rows], color=[colors[r["kind"]] for r in rows])
    for yi, r in zip(y, rows):
        ax.text(100 * r["avg"] + 0.5, yi, f"{100 * r['avg']:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=8)
    ax.set_xlabel("average test accuracy over tasks (%)")
    ax.set_xlim(0, 105)
    ax.set_title("Merging 8 fine-tuned digit ViTs (jmerge)", fontsize=10)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Entry points


def run_demo(argv: Sequence[str] | None = None, *, full: bool = False, out_dir: str = "jmerge-demo", cache_dir: str | None = None,
             methods: Sequence[str] | None = None, seed: int = 0, quiet: bool = False,
             config: DemoConfig | None = None) -> dict:
    """Run the digits merging benchmark and print its table (what ``jmerge demo`` does).

    The reduced version (default) trains in about a minute or two on 2 CPU cores; trained models are
    cached under ``cache_dir`` keyed by the configuration, so later runs only merge and evaluate.

    Args:
      argv: command-line arguments of ``jmerge demo`` (e.g. ``["--full"]``); when given, they are
        parsed with :func:`add_arguments` and the exit code is returned instead of the results.
      full: the full benchmark (bigger model, more steps) instead of the reduced one.
      out_dir: where ``results.md``, ``results.csv``, ``results.json`` and ``accuracy.png`` go
        (None: write nothing).
      cache_dir: model cache directory (default ``~/.cache/jmerge/demo``).
      methods: method names to run (default: every available method with ``full``, else
        ``DEMO_METHODS``).
      seed: seed of training and of random merges.
      quiet: no progress bars and no printed table.
      config: an explicit :class:`DemoConfig` (overrides ``full``).

    Returns:
      The results dict of :func:`run_benchmark`, plus ``"paths"`` of the written files.
    """
    if argv is not None:
        import argparse
        parser = argparse.ArgumentParser(prog="jmerge demo", description="jmerge's digits merging benchmark")
        add_arguments(parser)
        return main_from_args(parser.parse_args(list(argv)))
    cfg = config or (FULL if full else REDUCED)
    if methods is None and not full and config is None:
        methods = list(DEMO_METHODS)
    res = run_benchmark(cfg, seed=seed, cache_dir=cache_dir, methods=methods, quiet=quiet)
    res["paths"] = write_outputs(res, out_dir) if out_dir else {}
    if not quiet:
        print(format_table(res))
        if res["skipped"]:
            print("not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(res["skipped"].items())))
        print(f"{'models loaded from cache' if res['from_cache'] else 'models trained'}; "
              f"total {res['timings']['total_s']:.1f} s" + (f"; outputs in {out_dir}" if out_dir else ""))
    return res


def add_arguments(parser) -> None:
    """Add the ``jmerge demo`` options to an ``argparse`` parser."""
    parser.add_argument("--full", action="store_true", help="full benchmark (bigger model, more steps; minutes)")
    parser.add_argument("--out-dir", default="jmerge-demo", help="where the table, CSV and chart are written")
    parser.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/jmerge/demo)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: a representative set; with --full: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table")


def main_from_args(args) -> int:
    """Run the demo from parsed ``add_arguments`` options; returns the exit code."""
    methods = None if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(full=args.full, out_dir=args.out_dir, cache_dir=args.cache_dir, methods=methods, seed=args.seed,
             quiet=args.quiet)
    return 0
