"""The digits merging benchmark: train (or load) the models, tune every method on validation, test.

Protocol (a small-scale copy of the CLIP ViT 8-task benchmark of the model-merging papers):

1. **Pretraining**: the backbone and a linear 10-way head learn digit identity on the training
   images (upright, with random 1-pixel shifts and pixel noise). Only the backbone is kept.
2. **Task heads** (the stand-in for CLIP's zero-shot text heads): per task, a cosine classifier whose
   class vectors are the normalised mean *pretrained* features of the task's training inputs of
   each class. Heads are frozen from here on: every backbone is read by the same head.
3. **Zero-shot**: the pretrained backbone with those heads (no backbone change for the task).
4. **Individual**: for each task the backbone alone is fine-tuned on the task's training split, head
   frozen (as CLIP's heads are in the task-arithmetic papers). These are the eight models merged.
5. **Multi-task**: one backbone trained jointly on all tasks under the same frozen heads.
6. **Merges**: every method's hyperparameters are chosen on the validation split by a sweep
   (:func:`jmerge.sweep.run_sweep`, one vmapped program per method, evaluator
   :func:`jmerge.demo.evaluate.task_evaluator`); the chosen setting is reported on test. TALL masks and
   EMR build one model per task (as in their papers), each read by its task's head.

Reported: per-task test accuracy, the average, the normalised accuracy (merged / individual, averaged
over tasks), the validation average of the chosen setting and the chosen values.

References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); Yadav et al.,
"TIES-Merging" (NeurIPS 2023); Yang et al., "AdaMerging" (ICLR 2024); Wang et al., "Localizing Task
Information for Improved Model Merging and Compression" (ICML 2024); Huang et al., "EMR-Merging"
(NeurIPS 2024); Tang et al., "FusionBench" (2024).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from .dynamic import DYNAMIC, DYNAMIC_ALIASES, tree_nbytes
from .evaluate import per_task_accuracy, task_evaluator
from .tasks import TASKS, load_images, split_train_val_test, task_data

__all__ = ["DemoConfig", "REDUCED", "FULL", "build_models", "load_benchmark", "Benchmark", "run_benchmark",
           "run_demo", "add_arguments", "main_from_args", "format_table", "write_outputs", "SWEEPS",
           "DEMO_SWEEPS", "summary_line", "LITERATURE_ORDER", "DEMO_METHODS", "LEARNED", "PER_TASK", "DYNAMIC",
           "merge_results", "storage_entry"]

# Bumped whenever training changes: version 2 keys also held models trained by earlier code (same config).
CACHE_VERSION = 3

# Data-free methods: the grid each one's hyperparameters are chosen from on validation (ranges as in the
# papers: lambda 0.1..1 for task arithmetic, density 0.1..0.3 / lambda ~1 for TIES, ...). Methods absent
# here have no main hyperparameter (linear, model stock, Karcher, multi-SLERP ...) and run at defaults.
SWEEPS: dict[str, dict[str, list]] = {
    "task_arithmetic": {"scale": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]},
    "ties": {"density": [0.1, 0.2, 0.3, 0.5], "scale": [0.2, 0.3, 0.5, 0.7, 1.0, 1.3]},
    "dare_linear": {"density": [0.3, 0.5, 0.7, 0.9], "scale": [0.1, 0.2, 0.3, 0.5]},
    "dare_ties": {"density": [0.3, 0.5, 0.7, 0.9], "scale": [0.3, 0.5, 0.7, 1.0, 1.3]},
    "breadcrumbs": {"density": [0.7, 0.9], "scale": [0.1, 0.2, 0.3, 0.5, 0.7]},
    "breadcrumbs_ties": {"density": [0.7, 0.9], "scale": [0.3, 0.5, 0.7, 1.0, 1.3]},
    "della": {"density": [0.3, 0.5, 0.7], "scale": [0.3, 0.5, 0.7, 1.0, 1.3]},
    "della_linear": {"density": [0.3, 0.5, 0.7], "scale": [0.1, 0.2, 0.3, 0.5]},
    "magmax": {"scale": [0.2, 0.3, 0.5, 0.7, 1.0]},
    "sce": {"density": [0.2, 0.5, 1.0], "scale": [0.3, 0.5, 0.7, 1.0]},
    "consensus_ta": {"k": [2, 3], "scale": [0.1, 0.2, 0.3, 0.5, 0.7]},
    "consensus_ties": {"k": [2, 3], "scale": [0.5, 0.7, 1.0, 1.3]},
    "pcb": {"ratio": [0.05, 0.1, 0.2], "scale": [0.3, 0.5, 0.7, 1.0, 1.3]},
    "tsv_m": {"scale": [0.3, 0.5, 0.7, 1.0, 1.3]},
    "iso_c": {"scale": [0.3, 0.5, 0.7, 1.0, 1.3, 1.6]},
    "iso_cts": {"scale": [0.3, 0.5, 0.7, 1.0, 1.3, 1.6]},
    "lines": {"alpha": [0.0, 0.1, 0.2], "beta": [0.3, 0.5, 0.7, 1.0]},
}
# The reduced demo's (smaller) grids.
DEMO_SWEEPS: dict[str, dict[str, list]] = {
    **SWEEPS,
    "task_arithmetic": {"scale": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.1, 0.2, 0.3], "scale": [0.3, 0.5, 0.7, 1.0]},
    "tsv_m": {"scale": [0.3, 0.5, 0.7, 1.0]},
    "iso_c": {"scale": [0.5, 0.7, 1.0, 1.3]},
}
# Grids of the per-task-model methods: TALL mask lambda chosen per task (as in the paper), the merged vector's
# scale shared; RegMean's alpha.
TALL_LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6]
REGMEAN_ALPHAS = [0.5, 0.7, 0.9, 0.95, 1.0]
# Grids of learned methods whose training settings are chosen on validation (one training run per setting, a
# loop; steps = the config's ``adamerging_steps``). aTLAS: supervised as in its task-addition setting
# (cross-entropy; here on the labelled *train* split, validation held out for the choice), coefficient Adam
# lr and initial coefficient (0: the paper's start at the pretrained model). Concrete TA: entropy on unlabeled
# test inputs (the paper); task-arithmetic scale, mask-logit Adam lr and initial mask logit (0: the paper's
# keep probability 0.5; 3: keep probability 0.95, training only removes entries); temperature 0.5 (paper).
ATLAS_GRID = {"lr": [0.003, 0.01, 0.03, 0.1], "init": [0.0, 0.3]}
CONCRETE_GRID = {"scale": [0.1, 0.2, 0.3], "lr": [0.01, 0.03], "mask_init": [0.0, 3.0]}
# Not merges of several task models into one (or not applicable to 8 models): never run. TALL masks and EMR
# run as per-task models (``PER_TASK``) instead of their shared-backbone registry entries.
SKIP_ALWAYS = {"negation": "negates one task vector (forgetting), not a multi-task merge",
               "tall_merge": "run as per-task models: see 'tall_masks (per-task)'",
               "emr": "run as per-task models: see 'emr (per-task)'"}

LITERATURE_ORDER = ("zero-shot < task arithmetic < TIES < layer-wise AdaMerging < individual "
                    "(CLIP ViT-B/32, 8 tasks: 48.3 < 69.1 < 72.4 < 80.1 < 90.5; AdaMerging paper, Yang et al. 2024, "
                    "Table 2)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules of one benchmark run (the training part enters the cache key).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """

    model: M.ModelConfig = M.ModelConfig(width=64, depth=2, heads=4, temperature=30.0)
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS)
    val_fraction: float = 0.15
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    multitask_steps: int = 300
    multitask_batch: int = 16
    adamerging_steps: int = 100
    adamerging_lr: float = 1e-3
    chunks: int = 10
    sweeps: str = "demo"  # "demo" (DEMO_SWEEPS) or "full" (SWEEPS)

    def cache_key(self, seed: int) -> str:
        d = dataclasses.asdict(self)
        for k in ("adamerging_steps", "adamerging_lr", "chunks", "sweeps"):
            d.pop(k)
        blob = json.dumps({"config": d, "seed": seed, "version": CACHE_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


REDUCED = DemoConfig()
# The documented benchmark: the same trained models (one cache entry), every method, the full grids and
# longer AdaMerging / aTLAS / Concrete schedules.
FULL = dataclasses.replace(REDUCED, adamerging_steps=300, sweeps="full")


# ----------------------------------------------------------------------------------------------
# Data and training


def _data(cfg: DemoConfig):
    images, digits = load_images()
    tr, va, te = split_train_val_test(len(images), 0.3, cfg.val_fraction, seed=0)
    tasks = [t for t in TASKS if t.name in cfg.tasks]
    if len(tasks) != len(cfg.tasks):
        unknown = set(cfg.tasks) - {t.name for t in TASKS}
        raise ValueError(f"unknown demo tasks {sorted(unknown)}; known: {[t.name for t in TASKS]}")
    xs, ys = zip(*(task_data(t, images, digits) for t in tasks))
    xs, ys = np.stack(xs), np.stack(ys)
    masks = np.stack([M.class_mask(t.num_classes) for t in tasks])
    return dict(tasks=tasks, x_train=xs[:, tr], y_train=ys[:, tr], x_val=xs[:, va], y_val=ys[:, va],
                x_test=xs[:, te], y_test=ys[:, te], masks=masks, pre_x=images.reshape(-1, 64)[tr],
                pre_y=digits[tr])


def _splits(cfg: DemoConfig, data: dict) -> dict:
    return {"train": (data["x_train"], data["y_train"]), "val": (data["x_val"], data["y_val"]),
            "test": (data["x_test"], data["y_test"]), "masks": data["masks"],
            "tasks": tuple(t.name for t in data["tasks"]), "num_classes": tuple(t.num_classes for t in data["tasks"]),
            "model_config": cfg.model}


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


MODEL_NAMES = ("base", "heads", "ft_backbones", "mtl")


def build_models(cfg: DemoConfig, data: dict, *, seed: int = 0, cache_dir: str | None = None,
                 quiet: bool = False) -> tuple[dict, bool]:
    """Pretrained backbone, frozen task heads, fine-tuned backbones and multi-task backbone; cached on disk.

    Returns ``(models, from_cache)`` with ``models = {"base", "heads", "ft_backbones" (leading task axis),
    "mtl"}``. The cache file is keyed by a hash of ``cfg``'s training fields and ``seed``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    cache_dir = cache_dir or _default_cache_dir()
    path = os.path.join(cache_dir, f"models-{cfg.cache_key(seed)}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
        return {n: _unflatten(n, flat) for n in MODEL_NAMES}, True

    from tqdm.auto import tqdm

    T = len(data["tasks"])
    mc = cfg.model
    total = cfg.pretrain_steps + cfg.finetune_steps + cfg.multitask_steps
    bar = tqdm(total=total, desc="training", unit="step", disable=quiet, file=sys.stderr)
    key = jax.random.key(seed)
    k_init, k_head, k_pre, k_ft, k_mtl = jax.random.split(key, 5)

    # 1. pretraining: digit identity on the (upright) training images, with augmentation
    bar.set_postfix_str("pretrain")
    params = {"backbone": M.init_backbone(mc, k_init), "head": M.init_head(mc, k_head, 0.02)}
    params, _ = M.train_loop(mc, params, jnp.asarray(data["pre_x"]), jnp.asarray(data["pre_y"]),
                             jnp.asarray(M.class_mask(10)), steps=cfg.pretrain_steps, batch=cfg.pretrain_batch,
                             lr=cfg.pretrain_lr, key=k_pre, augment=True, chunks=cfg.chunks, progress=bar.update,
                             linear=True)
    base = params["backbone"]

    # 2. frozen task heads: class prototypes of the pretrained features
    bar.set_postfix_str("heads")
    xtr, ytr, masks = map(jnp.asarray, (data["x_train"], data["y_train"], data["masks"]))
    heads = M.prototype_heads(mc, base, xtr, ytr, [t.num_classes for t in data["tasks"]])

    # 3. individual fine-tuning of the backbone (heads frozen), all tasks in one vmapped program
    bar.set_postfix_str("fine-tune x%d" % T)
    stacked = {"backbone": jax.tree.map(lambda a: jnp.broadcast_to(a, (T,) + a.shape), base), "head": heads}
    ft, _ = M.train_loop(mc, stacked, xtr, ytr, masks, steps=cfg.finetune_steps, batch=cfg.finetune_batch,
                         lr=cfg.finetune_lr, key=k_ft, chunks=cfg.chunks, progress=bar.update, tasks_axis=True,
                         train_head=False)

    # 4. multi-task training of one backbone under the same frozen heads
    bar.set_postfix_str("multi-task")
    mtl, _ = M.train_multitask(mc, {"backbone": base, "heads": heads}, xtr, ytr, masks, steps=cfg.multitask_steps,
                               batch=cfg.multitask_batch, lr=cfg.finetune_lr, key=k_mtl, chunks=cfg.chunks,
                               progress=bar.update)
    bar.close()
    models = {"base": base, "heads": heads, "ft_backbones": ft["backbone"], "mtl": mtl["backbone"]}
    os.makedirs(cache_dir, exist_ok=True)
    flat = {}
    for n in MODEL_NAMES:
        flat.update(_flatten(n, models[n]))
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    return models, False


class Benchmark(NamedTuple):
    """What :func:`load_benchmark` returns (unpacks as ``base, finetuned, heads, splits``).

    Attributes:
      base: the pretrained backbone params (a Flax params dict).
      finetuned: the T fine-tuned backbone params (a list, task order of ``splits["tasks"]``).
      heads: the frozen task heads ``{"w": (T, width, 10), "b": (T, 10)}``.
      splits: ``{"train" | "val" | "test": (x (T, N, 64), y (T, N)), "masks": (T, 10), "tasks": names,
        "num_classes": per task, "model_config": ModelConfig}``; evaluate with
        :func:`jmerge.demo.task_evaluator`.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """

    base: Any
    finetuned: list
    heads: Any
    splits: dict


def load_benchmark(cfg: DemoConfig | None = None, *, seed: int = 0, cache_dir: str | None = None,
                   quiet: bool = True) -> Benchmark:
    """The benchmark's models and task data: train them once (cached on disk) or load them.

    Args:
      cfg: sizes and schedules (default :data:`REDUCED`, the ``jmerge demo`` models; :data:`FULL` for the
        documented benchmark).
      seed: training seed.
      cache_dir: model cache (default ``~/.cache/jmerge/demo``).
      quiet: no progress bar while training.

    Returns:
      :class:`Benchmark` ``(base, finetuned, heads, splits)``. Merge ``finetuned`` onto ``base`` with any
      jmerge method and score it with ``task_evaluator(heads, splits, "val")(merged)["accuracy"]``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    cfg = cfg or REDUCED
    data = _data(cfg)
    models, _ = build_models(cfg, data, seed=seed, cache_dir=cache_dir, quiet=quiet)
    T = len(data["tasks"])
    return Benchmark(models["base"], _unstack(models["ft_backbones"], T), models["heads"], _splits(cfg, data))


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
            if n not in avail and n not in LEARNED and n not in PER_TASK:
                skipped[n] = "not available in this jmerge"
    for name in chosen:
        if name in SKIP_ALWAYS:
            if names is not None and name not in PER_TASK_ALIASES:
                skipped[name] = SKIP_ALWAYS[name]
            continue
        method = avail[name]()
        if method.max_models is not None and method.max_models < T:
            skipped[name] = f"takes at most {method.max_models} models"
            continue
        if method.min_models > T:
            skipped[name] = f"needs at least {method.min_models} models"
            continue
        runs.append((name, method))
    return runs, skipped


def _sweep(method, base, models, space: dict | None, eval_fn, seed: int) -> tuple[dict, float, int]:
    """The best setting of ``space`` (a grid) on validation through :func:`jmerge.sweep.run_sweep`."""
    from jmerge.sweep import grid, run_sweep
    settings = grid(space) if space else [{}]
    res = run_sweep(method, base, models, settings, eval_fn, metric="accuracy", mode="max", progress=False,
                    merge_kwargs={"seed": seed})
    if res.best is None:
        errs = {r["error"] for r in res.records if r["error"]}
        raise RuntimeError("every setting failed: " + "; ".join(sorted(errs))[:300])
    return dict(res.best["params"]), float(res.best["metrics"]["accuracy"]), len(settings)


def _task_fns(ctx):
    mc = ctx["model_config"]
    return [(lambda p, x, t=t: M.logits(mc, p, ctx["heads"][t], x, ctx["masks"][t])[:, :ctx["num_classes"][t]])
            for t in range(ctx["T"])]


def _adamerging(granularity):
    def run(ctx):
        import jmerge
        import optax
        init = ctx["ta_scale"]
        res = jmerge.adamerging(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_test"]),
                                granularity=granularity, init=init, optimizer=optax.adam(ctx["lr"]),
                                steps=ctx["steps"], batch_size=16, seed=ctx["seed"])
        return res.params, {"init": init, "lr": ctx["lr"], "steps": ctx["steps"], "batch_size": 16,
                            "loss": "entropy on unlabeled test inputs"}
    return run


def _best_on_val(ctx, grid: dict, train) -> tuple[Any, dict]:
    """Train once per setting of ``grid`` (``train(**setting) -> params``); keep the best on validation."""
    from jmerge.sweep import grid as make_grid
    settings = make_grid(grid)
    best = None
    for hp in settings:
        params = train(**hp)
        v = float(ctx["val_eval"](params)["accuracy"])
        if best is None or v > best[0]:
            best = (v, hp, params)
    return best[2], {**best[1], "_val": best[0], "_settings": len(settings)}


def _atlas(ctx):
    import jmerge
    import optax

    def train(lr, init):
        return jmerge.atlas(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_train"]),
                            labels=list(ctx["y_train"]), loss="ce", init=init, optimizer=optax.adam(lr),
                            steps=ctx["steps"], batch_size=16, seed=ctx["seed"]).params

    params, hp = _best_on_val(ctx, ATLAS_GRID, train)
    return params, {**hp, "steps": ctx["steps"], "batch_size": 16, "loss": "cross-entropy on labelled train inputs"}


def _concrete(ctx):
    import jmerge
    import optax

    def train(scale, lr, mask_init):
        return jmerge.concrete_merge(_task_fns(ctx), ctx["base"], ctx["models"], batches=list(ctx["x_test"]),
                                     inner="task_arithmetic", scale=scale, mask_init=mask_init,
                                     optimizer=optax.adam(lr), temperature=0.5, steps=ctx["steps"], batch_size=16,
                                     seed=ctx["seed"]).params

    params, hp = _best_on_val(ctx, CONCRETE_GRID, train)
    return params, {**hp, "inner": "task_arithmetic", "steps": ctx["steps"], "batch_size": 16,
                    "loss": "entropy on unlabeled test inputs"}


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
    best = None
    for a in REGMEAN_ALPHAS:  # alpha chosen on validation
        merged = jmerge.regmean_merge(ctx["models"], grams, alpha=a).params
        v = float(ctx["val_eval"](merged)["accuracy"])
        if best is None or v > best[0]:
            best = (v, a, merged)
    return best[2], {"alpha": best[1], "n_examples": n, "linear layers": len(grams[0]), "_val": best[0]}


LEARNED = {
    "adamerging_task": ("adamerging", _adamerging("task")),
    "adamerging_layer": ("adamerging", _adamerging("layer")),
    "atlas": ("atlas", _atlas),
    "concrete_ta": ("concrete_merge", _concrete),
    "fisher": ("fisher_merge", _fisher),
    "regmean": ("regmean_merge", _regmean),
}


def _tall_per_task(ctx):
    """TALL masks: per task ``theta_0 + m_t ⊙ tau_MTL`` with ``tau_MTL = scale * sum_t tau_t``; the mask's
    lambda_t is chosen per task and the scale shared, both on validation (Wang et al. 2024)."""
    import jmerge
    from jmerge.methods.masks import extras_item, tall_task_models
    base, models, T = ctx["base"], ctx["models"], ctx["T"]
    scales = SWEEPS["task_arithmetic"]["scale"]
    val = {}  # (lambda, scale) -> (T,) validation accuracies
    masks = {}

    @jax.jit  # one program for the 45 (lambda, scale) settings: merge, per-task models and evaluation
    def val_of(mask, scale):
        merged = jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": scale})
        return ctx["val_eval_per_task"](_stack(tall_task_models(base, merged, mask)))

    for lam in TALL_LAMBDAS:
        _, extras = jmerge.merge(jmerge.tall_merge(lambda_=lam, scale=1.0), base, models, return_extras=True)
        masks[lam] = extras_item(extras, "tall_masks")
        for sc in scales:
            val[(lam, sc)] = np.asarray(val_of(masks[lam], np.float32(sc)))
    best_sc, best = None, None
    for sc in scales:
        lams = [max(TALL_LAMBDAS, key=lambda lam: (val[(lam, sc)][t], -lam)) for t in range(T)]
        score = float(np.mean([val[(lams[t], sc)][t] for t in range(T)]))
        if best is None or score > best[0]:
            best, best_sc = (score, lams), sc
    merged = jmerge.merge(jmerge.task_arithmetic(scale=best_sc), base, models)
    per_lam = {lam: tall_task_models(base, merged, masks[lam]) for lam in set(best[1])}
    per = _stack([per_lam[best[1][t]][t] for t in range(T)])
    return per, {"scale": best_sc, "lambda_per_task": best[1], "_val": best[0],
                 "_settings": len(TALL_LAMBDAS) * len(scales)}


def _emr_per_task(ctx):
    """EMR: per task ``theta_0 + s_t m_t ⊙ tau_uni`` (tuning-free; Huang et al. 2024)."""
    from jmerge.methods.masks import emr_task_models
    per = _stack(emr_task_models(ctx["base"], ctx["models"]))
    return per, {"_val": float(ctx["val_eval_per_task_avg"](per)), "_settings": 1}


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


PER_TASK = {"tall_masks": _tall_per_task, "emr_per_task": _emr_per_task}
PER_TASK_ALIASES = {"tall_merge": "tall_masks", "emr": "emr_per_task"}
PER_TASK_LABEL = {"tall_masks": "tall_masks (per-task models)", "emr_per_task": "emr (per-task models)"}

# The reduced demo runs these (the full benchmark runs every available method).
DEMO_METHODS = ("linear", "task_arithmetic", "ties", "tall_masks", "emr_per_task", "regmean", "adamerging_layer")


def run_benchmark(cfg: DemoConfig = REDUCED, *, seed: int = 0, cache_dir: str | None = None,
                  methods: Sequence[str] | None = None, quiet: bool = False) -> dict:
    """Build or load the models, evaluate references, tune every method on validation, evaluate on test.

    Args:
      cfg: sizes, schedules and which sweep grids (``cfg.sweeps``: ``"demo"`` or ``"full"``).
      seed: training and merging seed.
      cache_dir: where trained models are cached (default ``~/.cache/jmerge/demo``).
      methods: method names to run (data-free names from ``jmerge.available_methods()``, the learned ones
        in ``LEARNED``, the per-task ones ``tall_masks`` / ``emr_per_task``); default all.
      quiet: no progress bars.

    Returns:
      ``{"tasks": [...], "rows": [{"method", "kind", "acc": [...], "avg", "normalized", "val", "seconds",
      "hparams", "settings"}], "skipped": {name: reason}, "from_cache": bool, "timings": {...}}``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); Yadav et al.,
    "TIES-Merging" (NeurIPS 2023).
    """
    import jmerge
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    data = _data(cfg)
    models, from_cache = build_models(cfg, data, seed=seed, cache_dir=cache_dir, quiet=quiet)
    t_train = time.perf_counter() - t0
    splits = _splits(cfg, data)
    mc, T = cfg.model, len(data["tasks"])
    heads = models["heads"]
    val_eval = task_evaluator(heads, splits, "val")
    test_eval = jax.jit(task_evaluator(heads, splits, "test"))
    val_per = jax.jit(task_evaluator(heads, splits, "val", per_task_models=True))
    test_per = jax.jit(task_evaluator(heads, splits, "test", per_task_models=True))
    val_per_acc = jax.jit(lambda b: per_task_accuracy(mc, b, heads, *splits["val"], splits["masks"],
                                                      per_task_models=True))
    names = splits["tasks"]

    def accs(out):
        return [float(out[f"acc_{n}"]) for n in names]

    rows = []

    model_bytes = tree_nbytes(models["base"])

    def add(name, kind, acc, val=None, secs=0.0, hp=None, ind=None, settings=None, nbytes=None, diag=None):
        acc = [float(a) for a in acc]
        row = {"method": name, "kind": kind, "acc": acc, "avg": float(np.mean(acc)), "val": val, "seconds": secs,
               "hparams": hp or {}, "settings": settings,
               "storage": storage_entry(nbytes if nbytes is not None else _default_storage(name, kind, T) * model_bytes,
                                        model_bytes, T)}
        if diag:
            row["diagnostics"] = diag
        row["normalized"] = float(np.mean(np.asarray(acc) / np.asarray(ind))) if ind is not None else None
        rows.append(row)
        return row

    base = models["base"]
    ind = accs(test_per(models["ft_backbones"]))
    add("zero-shot (pretrained backbone, frozen heads)", "reference", accs(test_eval(base)),
        float(jax.jit(val_eval)(base)["accuracy"]), ind=ind)
    add("individual fine-tuned", "reference", ind, float(val_per(models["ft_backbones"])["accuracy"]), ind=ind)
    add("multi-task trained", "reference", accs(test_eval(models["mtl"])),
        float(jax.jit(val_eval)(models["mtl"])["accuracy"]), ind=ind)

    ft_list = _unstack(models["ft_backbones"], T)
    wanted = None if methods is None else [DYNAMIC_ALIASES.get(m, PER_TASK_ALIASES.get(m, m)) for m in methods]
    runs, skipped = _data_free_methods(wanted, T)
    per_task = [n for n in PER_TASK if wanted is None or n in wanted]
    learned = [n for n in LEARNED if wanted is None or n in wanted]
    dynamic = [n for n in DYNAMIC if wanted is None or n in wanted]
    if wanted is not None:
        for n in dynamic:
            skipped.pop(n, None)
    spaces = SWEEPS if cfg.sweeps == "full" else DEMO_SWEEPS
    bar = tqdm(total=len(runs) + len(per_task) + len(learned) + len(dynamic), desc="sweeps + merges", unit="method",
               disable=quiet, file=sys.stderr)
    ta_scale = 0.3  # the papers' usual value; replaced by the tuned one when task arithmetic runs first
    for name, method in runs:
        bar.set_postfix_str(name)
        t1 = time.perf_counter()
        try:
            space = spaces.get(name)
            best, v, n = _sweep(method, base, ft_list, space, val_eval, seed)
            if name == "task_arithmetic":
                ta_scale = float(best["scale"])
            merged = jmerge.merge(method, base, ft_list, hparams=best, seed=seed)
            add(name, "data-free", accs(test_eval(merged)), v, time.perf_counter() - t1, best, ind, n)
        except Exception as e:  # a method that cannot run here is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        bar.update(1)
    ctx = dict(model_config=mc, T=T, heads=_unstack(heads, T), masks=list(jnp.asarray(data["masks"])), base=base,
               models=ft_list, x_test=jnp.asarray(data["x_test"]), x_train=jnp.asarray(data["x_train"]),
               y_train=jnp.asarray(data["y_train"]),
               num_classes=[t.num_classes for t in data["tasks"]], steps=cfg.adamerging_steps, lr=cfg.adamerging_lr,
               seed=seed, ta_scale=ta_scale, val_eval=jax.jit(val_eval), val_eval_per_task=val_per_acc,
               val_eval_per_task_avg=lambda b: val_per(b)["accuracy"])
    for name in per_task:
        bar.set_postfix_str(name)
        t1 = time.perf_counter()
        try:
            per, hp = PER_TASK[name](ctx)
            v, n = hp.pop("_val"), hp.pop("_settings")
            add(PER_TASK_LABEL[name], "per-task", accs(test_per(per)), v, time.perf_counter() - t1, hp, ind, n)
        except Exception as e:
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        bar.update(1)
    for name in learned:
        fn_name, fn = LEARNED[name]
        bar.set_postfix_str(name)
        if not hasattr(jmerge, fn_name):
            skipped[name] = f"jmerge.{fn_name} not available in this jmerge"
            bar.update(1)
            continue
        t1 = time.perf_counter()
        try:
            merged, hp = fn(ctx)
            v = hp.pop("_val", None)
            if v is None:
                v = float(ctx["val_eval"](merged)["accuracy"])
            add(name, "learned", accs(test_eval(merged)), v, time.perf_counter() - t1, hp, ind,
                hp.pop("_settings", len(REGMEAN_ALPHAS) if name == "regmean" else None))
        except Exception as e:
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        bar.update(1)
    ctx.update(data=data, heads_stacked=heads)
    for name in dynamic:
        bar.set_postfix_str(name)
        t1 = time.perf_counter()
        try:
            acc, v, hp, n, nbytes, diag = DYNAMIC[name](ctx)
            add(name, "dynamic", acc, v, time.perf_counter() - t1, hp, ind, n, nbytes=nbytes, diag=diag)
        except Exception as e:
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        bar.update(1)
    bar.close()
    return {"tasks": list(names), "task_descriptions": [t.description for t in data["tasks"]],
            "rows": rows, "skipped": skipped, "from_cache": from_cache,
            "timings": {"build_s": t_train, "total_s": time.perf_counter() - t0}, "config": dataclasses.asdict(cfg),
            "seed": seed, "model_bytes": model_bytes}


def storage_entry(nbytes: int, model_bytes: int, num_tasks: int) -> dict:
    """``{"bytes", "x_model" (bytes / one model's), "x_full" (bytes / num_tasks full models')}``.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024), Sec. 4 (storage against the fine-tuned models).
    """
    nbytes = int(nbytes)
    return {"bytes": nbytes, "x_model": nbytes / model_bytes, "x_full": nbytes / (num_tasks * model_bytes)}


def _default_storage(name: str, kind: str, T: int) -> int:
    """Models' worth of bytes a static row stores: one merged backbone, or one backbone per task
    (individual fine-tuned, TALL masks and EMR evaluated as per-task models)."""
    return T if kind == "per-task" or name == "individual fine-tuned" else 1


def merge_results(old: dict, new: dict, *, tol: float = 1e-6) -> dict:
    """``old`` results with ``new``'s rows merged in: a row of the same method replaces the old one in place,
    other new rows go after the last row of their kind (kinds in the table's order); old rows without a
    storage figure get one (one model, or ``T`` models for per-task rows); ``skipped`` and timings combine.

    Raises:
      ValueError: the two results are of different tasks, model sizes or models: a reference row (zero-shot,
        individual, multi-task) present in both whose accuracies differ by more than ``tol`` means the new rows
        were computed on other models (another model cache or training run), so mixing them would be wrong.

    References: none (infrastructure).
    """
    if list(old["tasks"]) != list(new["tasks"]):
        raise ValueError(f"cannot merge results of tasks {new['tasks']} into results of tasks {old['tasks']}")
    mb = new["model_bytes"]
    if old.get("model_bytes", mb) != mb:
        raise ValueError(f"cannot merge results of a {mb}-byte model into results of a {old['model_bytes']}-byte "
                         "model (another benchmark configuration)")
    old_refs = {r["method"]: r for r in old["rows"] if r["kind"] == "reference"}
    for r in new["rows"]:
        o = old_refs.get(r["method"]) if r["kind"] == "reference" else None
        if o is not None and np.max(np.abs(np.asarray(o["acc"]) - np.asarray(r["acc"]))) > tol:
            raise ValueError(f"the models differ from those of the existing results: '{r['method']}' scores "
                             f"{100 * r['avg']:.2f} now and {100 * o['avg']:.2f} there; rerun every method (no "
                             "--update) or use the model cache of that run (--cache-dir)")
    T = len(new["tasks"])
    rows = [dict(r) for r in old["rows"]]
    for r in rows:
        if "storage" not in r:
            r["storage"] = storage_entry(_default_storage(r["method"], r["kind"], T) * mb, mb, T)
    index = {r["method"]: i for i, r in enumerate(rows)}
    order = ["reference", "data-free", "per-task", "learned", "dynamic"]
    for r in new["rows"]:
        if r["method"] in index:
            rows[index[r["method"]]] = r
            continue
        rank = order.index(r["kind"]) if r["kind"] in order else len(order)
        pos = max((i + 1 for i, o in enumerate(rows)
                   if (order.index(o["kind"]) if o["kind"] in order else len(order)) <= rank), default=0)
        rows.insert(pos, r)
        index = {o["method"]: i for i, o in enumerate(rows)}
    ran = {r["method"] for r in new["rows"]}
    skipped = {k: v for k, v in old.get("skipped", {}).items() if k not in ran}
    skipped.update(new.get("skipped", {}))
    timings = dict(old.get("timings", {}))
    timings["updates"] = list(timings.get("updates", [])) + [
        {"methods": [r["method"] for r in new["rows"] if r["kind"] != "reference"],
         "total_s": new["timings"]["total_s"]}]
    return {**old, "rows": rows, "skipped": skipped, "timings": timings, "model_bytes": mb}


# ----------------------------------------------------------------------------------------------
# Output


def _chosen(hp: dict) -> str:
    keep = {k: v for k, v in hp.items() if k not in ("loss", "data", "batch_size", "n_examples", "linear layers",
                                                      "inner", "steps")}
    out = []
    for k, v in keep.items():
        if isinstance(v, (list, tuple)):
            v = "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, float):
            v = f"{v:g}"
        out.append(f"{k}={v}")
    return ", ".join(out)


def format_table(results: dict, markdown: bool = True, *, storage: bool = False) -> str:
    """The results as a Markdown table (test accuracies in %, validation average, chosen values; with
    ``storage`` also the bytes stored, relative to one model and to the ``T`` fine-tuned models).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    tasks = results["tasks"]
    T = len(tasks)
    head = ["method", "kind"] + tasks + ["avg", "norm.", "val", "chosen on val"]
    if storage:
        head += ["storage (x 1 model)", f"storage (x {T} models)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        norm = "" if r["normalized"] is None else f"{100 * r['normalized']:.1f}"
        val = "" if r.get("val") is None else f"{100 * r['val']:.1f}"
        cells = ([r["method"], r["kind"]] + [f"{100 * a:.1f}" for a in r["acc"]]
                 + [f"{100 * r['avg']:.1f}", norm, val, _chosen(r["hparams"])])
        if storage:
            st = r.get("storage")
            cells += ["", ""] if st is None else [f"{st['x_model']:.2f}", f"{st['x_full']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(results: dict) -> str:
    """One line: zero-shot, individual and the main merges' test averages (what the benchmark shows).

    References: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024).
    """
    by = {r["method"]: r for r in results["rows"]}
    parts = []
    for key, label in (("zero-shot (pretrained backbone, frozen heads)", "zero-shot"), ("task_arithmetic", "TA"),
                       ("ties", "TIES"), ("adamerging_layer", "layer-wise AdaMerging"),
                       ("individual fine-tuned", "individual")):
        if key in by:
            parts.append(f"{label} {100 * by[key]['avg']:.1f}")
    return "average test accuracy: " + ", ".join(parts)


def write_outputs(results: dict, out_dir: str, *, title: str = "jmerge digits merging benchmark") -> dict:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``accuracy.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in
             dict(md="results.md", csv="results.csv", json="results.json", png="accuracy.png").items()}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "kind"] + results["tasks"] + ["avg", "normalized", "val", "settings", "seconds",
                                                            "hparams", "storage_bytes", "storage_x_model",
                                                            "storage_x_full"])
        for r in results["rows"]:
            st = r.get("storage") or {}
            w.writerow([r["method"], r["kind"]] + [f"{a:.4f}" for a in r["acc"]]
                       + [f"{r['avg']:.4f}", "" if r["normalized"] is None else f"{r['normalized']:.4f}",
                          "" if r.get("val") is None else f"{r['val']:.4f}", r.get("settings") or "",
                          f"{r['seconds']:.2f}", json.dumps(r["hparams"], sort_keys=True), st.get("bytes", ""),
                          f"{st['x_model']:.4f}" if st else "", f"{st['x_full']:.4f}" if st else ""])
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    T = len(results["tasks"])
    md = [f"# {title}", "",
          "Test accuracy (%) of one merged backbone per method (per-task models for TALL masks and EMR; "
          "models merged per input for the *dynamic* rows: Twin-Merging, SMILE, WEMoE) on "
          "8 tasks built from scikit-learn's digits (1797 real 8x8 images), each task read by its own frozen "
          "head; *norm.* = mean over tasks of merged / individual accuracy; *val* = validation average of the "
          "setting chosen on validation (*chosen on val*; grids in `jmerge.demo.bench.SWEEPS`). Expected shape "
          "from the literature: " + LITERATURE_ORDER + ". *storage*: bytes stored (float32) relative to one "
          f"backbone ({results.get('model_bytes', 0):,} bytes) and to the {T} fine-tuned backbones; dynamic rows "
          "count every array they keep (`jmerge.demo.dynamic`).", "",
          "Tasks: " + "; ".join(f"**{n}**: {d}" for n, d in zip(results["tasks"], results["task_descriptions"])),
          "", format_table(results, storage=True), ""]
    if results["skipped"]:
        md += ["Not run:", ""] + [f"- `{k}`: {v}" for k, v in sorted(results["skipped"].items())] + [""]
    hp_lines = [f"- `{r['method']}`: {json.dumps(r['hparams'], sort_keys=True)}"
                + (f" (best of {r['settings']} settings on validation)" if r.get("settings") else "")
                for r in results["rows"] if r["kind"] != "reference"]
    md += ["Hyperparameters (chosen on validation; `{}` = the method's defaults, nothing to tune):", ""]
    md += hp_lines + [""]
    diag = [f"- `{r['method']}`: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["diagnostics"].items())
            for r in results["rows"] if r.get("diagnostics")]
    if diag:
        md += ["Diagnostics of the dynamic rows (test split; see NOTES.md):", ""] + diag + [""]
    md += [f"Seed {results['seed']}; models {'loaded from cache' if results['from_cache'] else 'trained'}; "
           f"total {results['timings']['total_s']:.0f} s."]
    for u in results["timings"].get("updates", []):
        md[-1] += f" Rows of {', '.join(u['methods'])} merged in from a later run ({u['total_s']:.0f} s)."
    md += [""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    try:
        _plot(results, paths["png"])
    except ImportError:  # matplotlib missing: table outputs only
        paths.pop("png")
    return paths


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    colors = {"reference": "#888888", "data-free": "#4C72B0", "per-task": "#55A868", "learned": "#DD8452",
              "dynamic": "#8172B3"}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [100 * r["avg"] for r in rows], color=[colors[r["kind"]] for r in rows])
    for yi, r in zip(y, rows):
        ax.text(100 * r["avg"] + 0.5, yi, f"{100 * r['avg']:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=8)
    ax.set_xlabel("average test accuracy over tasks (%)")
    ax.set_xlim(0, 105)
    zs = next((r for r in rows if r["method"].startswith("zero-shot")), None)
    ind = next((r for r in rows if r["method"].startswith("individual")), None)
    for ref, style in ((zs, ":"), (ind, "--")):
        if ref is not None:
            ax.axvline(100 * ref["avg"], color="#444444", linestyle=style, linewidth=0.8)
    ax.set_title("8 digit ViTs merged by jmerge (tuned on val., test acc.)", fontsize=10)
    from matplotlib.patches import Patch
    kinds = {r["kind"] for r in rows}
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items() if k in kinds], fontsize=8,
              loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Entry points


def run_demo(argv: Sequence[str] | None = None, *, full: bool = False, out_dir: str = "jmerge-demo", cache_dir: str | None = None,
             methods: Sequence[str] | None = None, seed: int = 0, quiet: bool = False,
             config: DemoConfig | None = None, update: bool = False) -> dict:
    """Run the digits merging benchmark and print its table (what ``jmerge demo`` does).

    The reduced version (default) trains, tunes and evaluates within about 3 minutes on 2 CPU cores;
    trained models are cached under ``cache_dir`` keyed by the configuration, so later runs only sweep,
    merge and evaluate.

    Args:
      argv: command-line arguments of ``jmerge demo`` (e.g. ``["--full"]``); when given, they are
        parsed with :func:`add_arguments` and the exit code is returned instead of the results.
      full: the full benchmark (the same models; every method, the full grids, longer AdaMerging).
      out_dir: where ``results.md``, ``results.csv``, ``results.json`` and ``accuracy.png`` go
        (None: write nothing).
      cache_dir: model cache directory (default ``~/.cache/jmerge/demo``).
      methods: method names to run (default: every available method with ``full``, else
        ``DEMO_METHODS``).
      seed: seed of training and of random merges.
      quiet: no progress bars and no printed table.
      config: an explicit :class:`DemoConfig` (overrides ``full``).
      update: merge this run's rows into ``out_dir/results.json`` (:func:`merge_results`: rows of the methods
        run replace theirs, the others are kept) and rewrite every output from the merged results.

    Returns:
      The results dict of :func:`run_benchmark` (with ``update``: the merged results), plus ``"paths"`` of
      the written files.
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
    old_path = os.path.join(out_dir, "results.json") if (update and out_dir) else None
    if old_path and os.path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        if old.get("seed", seed) != seed:
            raise ValueError(f"{old_path} holds seed {old['seed']}; rerun with --seed {old['seed']} to update it")
        res = merge_results(old, res)
    res["paths"] = write_outputs(res, out_dir) if out_dir else {}
    if not quiet:
        print(format_table(res))
        print(summary_line(res))
        if res["skipped"]:
            print("not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(res["skipped"].items())))
        print(f"{'models loaded from cache' if res['from_cache'] else 'models trained'}; "
              f"total {res['timings']['total_s']:.1f} s" + (f"; outputs in {out_dir}" if out_dir else ""))
    return res


def add_arguments(parser) -> None:
    """Add the ``jmerge demo`` options to an ``argparse`` parser."""
    parser.add_argument("--full", action="store_true",
                        help="full benchmark (same models; every method, full validation grids; tens of minutes)")
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
