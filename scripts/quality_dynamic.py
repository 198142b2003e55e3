"""Twin-Merging and SMILE on the digits 8-task benchmark: average accuracy and storage vs 8 full models.

Usage: python3 scripts/quality_dynamic.py [--seed 0] [--cache-dir DIR] [--rank 4] [--smile-k 4]
[--gate-k 2]

Rows: the individual fine-tuned models (8 full backbones), static task arithmetic, Twin-Merging (shared =
task arithmetic or TIES; exclusive knowledge at rank r or full; per-input and per-batch merging; router:
an MLP on the shared backbone's pooled features, trained on the benchmark's validation split)
and SMILE (every Dense/attention kernel of the backbone upscaled; zero-shot routing). Each task is evaluated
with its own fine-tuned head, as in `jmerge demo`. Storage counts backbone entries only (the heads are per
task in every row).

All access to the benchmark goes through :func:`load_benchmark` (adapt it if jmerge.demo changes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def load_benchmark(seed: int = 0, cache_dir: str | None = None) -> dict:
    """The digits benchmark's models and data through jmerge.demo's public API (the one place to adapt).

    Returns ``{"tasks": [names], "base": backbone params, "models": [T fine-tuned backbones],
    "features": f(backbone, x) -> (N, F), "apply": f(backbone, x, t) -> task t's logits (its frozen head),
    "val", "test": per-task ``(x (T, N, 64), y (T, N))``}``.
    """
    from jmerge.demo import load_benchmark as demo_benchmark
    from jmerge.demo import model as M

    base, finetuned, heads, splits = demo_benchmark(seed=seed, cache_dir=cache_dir)
    mc, masks = splits["model_config"], splits["masks"]
    T = len(splits["tasks"])
    head = [jax.tree.map(lambda a, t=t: a[t], heads) for t in range(T)]

    def features(backbone, x):
        return M.features(mc, backbone, x)

    def apply(backbone, x, t):
        return M.logits(mc, backbone, head[t], x, masks[t])

    return {"tasks": list(splits["tasks"]), "base": base, "models": list(finetuned), "features": features,
            "apply": apply, "val": splits["val"], "test": splits["test"]}


def _acc(lg, y):
    return float(np.mean(np.argmax(np.asarray(lg), -1) == np.asarray(y)))


def _n_params(tree) -> int:
    return sum(int(np.size(a)) for a in jax.tree.leaves(tree))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rank", type=int, default=4, help="Twin-Merging rank of each exclusive matrix")
    ap.add_argument("--smile-k", type=int, default=4)
    ap.add_argument("--gate-k", type=int, default=2)
    a = ap.parse_args(argv)

    import jmerge
    from jmerge.dynamic import smile_apply, smile_upscale, train_router, twin_apply, twin_merge
    from jmerge.dynamic.router import router_logits, softmax_weights

    t0 = time.perf_counter()
    B = load_benchmark(a.seed, a.cache_dir)
    T, base, models, feat, apply = len(B["tasks"]), B["base"], B["models"], B["features"], B["apply"]
    (xte, yte), (xval, _) = B["test"], B["val"]
    n_model = _n_params(base)
    rows = []

    def add(name, accs, stored, note=""):
        rows.append((name, float(np.mean(accs)), stored, note))
        print(f"  {name}: avg {100 * np.mean(accs):.1f}  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    f_static = jax.jit(apply, static_argnums=2)

    def static_acc(backbone):
        return [_acc(f_static(backbone, xte[t], t), yte[t]) for t in range(T)]

    add("individual fine-tuned (8 models)", [_acc(f_static(models[t], xte[t], t), yte[t]) for t in range(T)],
        T * n_model)
    add("task arithmetic (static, scale 0.3)",
        static_acc(jmerge.merge(jmerge.task_arithmetic(scale=0.3), base, models)), n_model)

    for k, gk, top in ((a.smile_k, a.gate_k, 1), (a.smile_k, a.gate_k, 2), (2 * a.smile_k, 4 * a.gate_k, 1),
                        ("full", 8 * a.gate_k, 1)):
        sm = smile_upscale(base, models, k=k, gate_k=gk, top_k=top, clamp_rank=True)
        f = jax.jit(lambda s, x, t: smile_apply(lambda p, xb: apply(p, xb, t), s, x), static_argnums=2)
        accs = [_acc(f(sm, xte[t], t), yte[t]) for t in range(T)]
        add(f"SMILE (k {k}, gate_k {gk}, top-{top})", accs, sm.storage()["total_params"])

    # Twin-Merging; router: an MLP on the shared backbone's features of the validation split, labelled by task
    fs = jax.jit(feat)

    def twin_rows(shared, label, hp):
        fit = None
        for rank in (a.rank, "full"):
            tw = twin_merge(base, models, shared=shared, shared_hparams=hp, rank=rank, clamp_rank=True)
            if fit is None:  # the shared model (so the router) does not depend on the rank
                xv = np.concatenate(list(xval))
                yv = np.repeat(np.arange(T), xval.shape[1])
                fit = train_router(fs(tw.shared, xv), yv, T, hidden=(64,), steps=500, lr=3e-3, seed=a.seed)
            route = jax.jit(lambda p, x, tw=tw: softmax_weights(router_logits(p, fs(tw.shared, x))))
            per_input = jax.jit(lambda tw, w, x, t: twin_apply(lambda p, xb: apply(p, xb, t), tw, x, w,
                                                               per_input=True), static_argnums=3)
            per_batch = jax.jit(lambda tw, w, x, t: twin_apply(lambda p, xb: apply(p, xb, t), tw, x, w),
                                static_argnums=3)
            acc_i, acc_b, racc = [], [], []
            for t in range(T):
                w = route(fit.params, xte[t])
                racc.append(float(np.mean(np.argmax(np.asarray(w), -1) == t)))
                acc_i.append(_acc(per_input(tw, w, xte[t], t), yte[t]))
                acc_b.append(_acc(per_batch(tw, w, xte[t], t), yte[t]))
            st = tw.storage()
            note = f"router task acc {100 * np.mean(racc):.1f}% (val-split fit {100 * fit.train_accuracy:.1f}%)"
            add(f"Twin-Merging ({label}, rank {rank}, per input)", acc_i, st["total_params"], note)
            add(f"Twin-Merging ({label}, rank {rank}, per batch of one task)", acc_b, st["total_params"], note)

    twin_rows("task_arithmetic", "shared = TA 0.3", {"scale": 0.3})
    twin_rows("ties", "shared = TIES 0.2", None)

    print()
    print(f"digits 8-task benchmark (jmerge.demo models), backbone {n_model} entries")
    print("| method | avg acc (%) | stored entries | vs 8 models | note |")
    print("|---|---|---|---|---|")
    for name, avg, stored, note in rows:
        print(f"| {name} | {100 * avg:.1f} | {stored:,} | {stored / (T * n_model):.2f}x | {note} |")


if __name__ == "__main__":
    main()
