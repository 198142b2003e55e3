"""WEMoE on the digits 8-task benchmark: average accuracy and storage vs 8 full models.

Usage: python3 scripts/quality_wemoe.py [--reduced] [--seed 0] [--cache-dir DIR] [--steps 300] [--lr 1e-3]
[--batch 16] [--scaling 0.3] [--granularity sample] [--units mlp|blocks]

Rows: the individual fine-tuned backbones, static task arithmetic (scale 0.3), WEMoE before test-time
adaptation (= task arithmetic, the routers' initial output) and after it (Adam on the prediction entropy of
unlabeled test inputs of every task, as in the paper). Every transformer block's MLP (``fc1``, ``fc2``) is a
weight-ensembling MoE; everything else is merged by task arithmetic. Each task is evaluated with its own
fine-tuned head, as in ``jmerge demo``; storage counts backbone entries only.

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


def load_benchmark(reduced: bool = False, seed: int = 0, cache_dir: str | None = None) -> dict:
    """The digits benchmark through jmerge.demo's public API (the one place to adapt if the demo changes).

    Returns ``{"tasks", "base", "models" (T backbones), "logits" (backbone, x, t) -> task t's logits (its frozen
    head and class mask), "x_test", "y_test" (T, N, ...)}``.
    """
    from jmerge.demo import FULL, REDUCED
    from jmerge.demo import load_benchmark as demo_benchmark
    from jmerge.demo import model as M

    base, finetuned, heads, splits = demo_benchmark(REDUCED if reduced else FULL, seed=seed, cache_dir=cache_dir)
    mc, masks = splits["model_config"], splits["masks"]

    def logits(backbone, x, t):
        return M.logits(mc, backbone, jax.tree.map(lambda a: a[t], heads), x, masks[t])

    x, y = splits["test"]
    return {"tasks": list(splits["tasks"]), "base": base, "models": list(finetuned), "logits": logits,
            "x_test": np.asarray(x), "y_test": np.asarray(y)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--scaling", type=float, default=0.3)
    ap.add_argument("--granularity", default="sample", choices=["sample", "token", "batch"])
    ap.add_argument("--units", default="mlp", choices=["mlp", "blocks"],
                    help="mlp: each block's fc1+fc2 (the paper); blocks: whole transformer blocks as experts")
    a = ap.parse_args(argv)

    import jmerge
    from jmerge.dynamic.wemoe import (build_wemoe, vit_mlp_groups, wemoe_apply, wemoe_storage, wemoe_tta,
                                      with_constant_routing)

    t0 = time.perf_counter()
    B = load_benchmark(a.reduced, a.seed, a.cache_dir)
    T, base, models, logits = len(B["tasks"]), B["base"], B["models"], B["logits"]
    xte, yte = B["x_test"], B["y_test"]
    n_model = sum(int(np.size(x)) for x in jax.tree.leaves(base))
    rows = []

    def acc(f):
        return [float(np.mean(np.argmax(np.asarray(f(xte[t], t)), -1) == yte[t])) for t in range(T)]

    def wemoe_logits(st, x, t):  # the whole forward (backbone + head) runs under WEMoE's interceptor
        return wemoe_apply(lambda p, xx: logits(p, xx, t), spec, st, x)

    def add(name, accs, stored):
        rows.append((name, 100 * float(np.mean(accs)), stored))
        print(f"  {name}: avg {100 * np.mean(accs):.1f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    f = jax.jit(logits, static_argnums=2)
    add("individual fine-tuned (8 models)", acc(lambda x, t: f(models[t], x, t)), T * n_model)
    ta = jmerge.merge(jmerge.task_arithmetic(scale=a.scaling), base, models)
    add(f"task arithmetic (scale {a.scaling})", acc(lambda x, t: f(ta, x, t)), n_model)

    units = vit_mlp_groups(base) if a.units == "mlp" else sorted(vit_mlp_groups(base))  # blocks: one unit each
    spec, state = build_wemoe(base, models, units, scaling=a.scaling, granularity=a.granularity,
                              key=jax.random.PRNGKey(a.seed))
    run = jax.jit(wemoe_logits, static_argnums=2)
    size = wemoe_storage(spec, state)["wemoe"]
    eye = np.eye(T, dtype=np.float32)
    add(f"WEMoE {a.units}, oracle routing (one-hot on the true task; bound)",
        acc(lambda x, t: run(with_constant_routing(state, eye[t]), x, t)), size)
    add("WEMoE before TTA (= task arithmetic)", acc(lambda x, t: run(state, x, t)), size)
    t1 = time.perf_counter()
    state, losses = wemoe_tta(spec, state, wemoe_logits,
                              [np.asarray(x) for x in xte], steps=a.steps, lr=a.lr, batch_size=a.batch,
                              key=jax.random.PRNGKey(a.seed + 1))
    tta_s = time.perf_counter() - t1
    add(f"WEMoE {a.units} ({a.granularity} routing, TTA {a.steps} steps, lr {a.lr:g})",
        acc(lambda x, t: run(state, x, t)), size)
    print(f"\nentropy loss (sum over {T} tasks): {losses[:10].mean():.3f} (first 10 steps) -> "
          f"{losses[-10:].mean():.3f} (last 10); TTA {tta_s:.0f}s\n")
    print("| method | avg acc (%) | stored backbone entries | vs 8 full models |")
    print("|---|---|---|---|")
    for name, avg, stored in rows:
        print(f"| {name} | {avg:.1f} | {stored:,} | {stored / (T * n_model):.2f}x |")


if __name__ == "__main__":
    main()
