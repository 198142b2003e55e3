"""Dynamic merges on the digits benchmark: Twin-Merging, SMILE and WEMoE tuned on validation, tested.

Each runner takes the benchmark context of :func:`jmerge.demo.bench.run_benchmark` and returns
``(test accuracies (T,), validation average, chosen values, settings tried, stored bytes, diagnostics)``.
Every hyperparameter here is *structural* (it changes array shapes or trains something: ranks, top-k,
the shared model the router reads, a test-time adaptation run), so each is chosen by a small explicit
loop over the grids below, scored with the benchmark's validation split; none goes through
:func:`jmerge.sweep.run_sweep` (which sweeps the traced hyperparameters of one ``jmerge.merge``).

- **Twin-Merging**: shared model (task arithmetic at a scale of :data:`TWIN_SHARED`, or TIES), exclusive
  knowledge rank (:data:`TWIN_RANKS`; every rank stores less than the 8 models); router: an MLP on the shared
  model's pooled features, trained on the *train* split's inputs labelled with their task (validation stays
  held out for the choice); merged per input (the paper).
- **SMILE**: expert rank ``k``, router rank ``gate_k``, ``top_k`` and where the non-linear leaves come from
  (``others``: base or average) (:data:`SMILE_GRID`); zero-shot routing.
- **WEMoE**: task-arithmetic scale of the non-MLP weights (= the routers' initial output) and the
  test-time adaptation's learning rate and steps (:data:`WEMOE_GRID`; 0 steps = no adaptation); the
  adaptation minimises the prediction entropy on unlabeled *test* inputs (the paper; as AdaMerging here).

Stored bytes count every array the dynamic model keeps (float32), see :meth:`TwinMerge.storage`
(``total_bytes``), :func:`jmerge.dynamic.smile_storage` (``total_bytes``), :func:`jmerge.dynamic.wemoe_storage`
(``wemoe_bytes``).

References: Lu et al., "Twin-Merging" (NeurIPS 2024); Tang et al., "SMILE" (2024); Tang et al., "Merging
Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M

__all__ = ["DYNAMIC", "DYNAMIC_ALIASES", "tree_nbytes",
           "TWIN_SHARED", "TWIN_RANKS", "SMILE_GRID", "WEMOE_GRID"]

# Twin-Merging: shared merges (name, method, hparams) x ranks of the exclusive knowledge.
TWIN_SHARED = [("ta 0.1", "task_arithmetic", {"scale": 0.1}), ("ta 0.2", "task_arithmetic", {"scale": 0.2}),
               ("ta 0.3", "task_arithmetic", {"scale": 0.3}), ("ta 0.5", "task_arithmetic", {"scale": 0.5}),
               ("ties 0.1/0.5", "ties", {"density": 0.1, "scale": 0.5})]
TWIN_RANKS = [2, 4, 8, 16]
TWIN_ROUTER = dict(hidden=(64,), steps=500, lr=3e-3)
# SMILE: expert rank k, router rank gate_k, experts per input.
# ``others``: leaves that are not linear kernels (LayerNorms, position table) from the base (the paper) or
# the models' average (FusionBench's ``average_experts``).
SMILE_GRID = {"k": [4, 8, 16], "gate_k": [4, 16], "top_k": [1, 2], "others": ["base", "average"]}
# WEMoE: scale of the merged non-MLP weights (= routers' initial output), TTA learning rate, TTA steps.
WEMOE_GRID = {"scale": [0.2, 0.3], "lr": [1e-4, 1e-3], "steps": [0, 100, 300]}
WEMOE_BATCH = 16


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (``size * itemsize``).

    References: none (infrastructure).
    """
    return int(sum(int(np.size(x)) * np.dtype(jnp.asarray(x).dtype).itemsize for x in jax.tree.leaves(tree)))


def _data(ctx):
    d = ctx["data"]
    return {s: (jnp.asarray(d[f"x_{s}"]), jnp.asarray(d[f"y_{s}"])) for s in ("train", "val", "test")}


def _heads(ctx):
    return jax.tree.map(jnp.asarray, ctx["heads_stacked"]), jnp.asarray(ctx["data"]["masks"])


# ----------------------------------------------------------------------------------------------
# Twin-Merging


def _twin(ctx):
    from ..dynamic import train_router, twin_apply, twin_merge
    from ..dynamic.router import router_logits, softmax_weights

    mc, T, base, models = ctx["model_config"], ctx["T"], ctx["base"], ctx["models"]
    D = _data(ctx)
    heads, masks = _heads(ctx)

    @jax.jit
    def feats(p, x):
        return M.features(mc, p, x)

    def make_eval(per_input):
        @jax.jit
        def ev(tw, router, x, y):
            def one(a):
                h, m, xt, yt, t = a
                w = softmax_weights(router_logits(router, M.features(mc, tw.shared, xt)))
                lg = twin_apply(lambda p, xb: M.logits(mc, p, h, xb, m), tw, xt, w, per_input=per_input)
                return (jnp.mean((jnp.argmax(lg, -1) == yt).astype(jnp.float32)),
                        jnp.mean((jnp.argmax(w, -1) == t).astype(jnp.float32)))
            return jax.lax.map(one, (heads, masks, x, y, jnp.arange(T)))
        return ev

    ev_input, ev_batch = make_eval(True), make_eval(False)
    xtr = D["train"][0]
    best, n = None, 0
    for label, method, hp in TWIN_SHARED:
        router = None
        for rank in TWIN_RANKS:
            tw = twin_merge(base, models, shared=method, shared_hparams=hp, rank=rank, clamp_rank=True,
                            seed=ctx["seed"])
            if router is None:  # the router reads the shared model: one per shared model, any rank
                f = feats(tw.shared, xtr.reshape(-1, xtr.shape[-1]))
                fit = train_router(f, np.repeat(np.arange(T), xtr.shape[1]), T, seed=ctx["seed"], **TWIN_ROUTER)
                router = fit.params
            acc, _ = ev_input(tw, router, *D["val"])
            v, n = float(jnp.mean(acc)), n + 1
            if best is None or v > best[0]:
                best = (v, label, method, hp, rank, tw, router)
    v, label, method, hp, rank, tw, router = best
    acc, racc = ev_input(tw, router, *D["test"])
    acc_b, _ = ev_batch(tw, router, *D["test"])
    st = tw.storage()
    full = twin_merge(base, models, shared=method, shared_hparams=hp, rank="full", seed=ctx["seed"])
    acc_full, _ = ev_input(full, router, *D["test"])
    diag = {"router_task_acc_test": float(jnp.mean(racc)),
            "per_batch_test_avg": float(jnp.mean(acc_b)),
            "full_rank_test_avg": float(jnp.mean(acc_full)),
            "stored_params": int(st["total_params"])}
    return ([float(a) for a in acc], v, {"shared": label, "rank": rank}, n, int(st["total_bytes"]), diag)


# ----------------------------------------------------------------------------------------------
# SMILE


def _smile(ctx):
    from ..dynamic import smile_apply, smile_upscale

    mc, T, base, models = ctx["model_config"], ctx["T"], ctx["base"], ctx["models"]
    D = _data(ctx)
    heads, masks = _heads(ctx)

    def make_eval(oracle):
        @jax.jit
        def ev(sm, x, y):
            def one(a):
                h, m, xt, yt, t = a
                routing = jax.nn.one_hot(t, T) if oracle else None  # oracle: every layer on the input's task
                lg = smile_apply(lambda p, xb: M.logits(mc, p, h, xb, m), sm, xt, routing=routing)
                return jnp.mean((jnp.argmax(lg, -1) == yt).astype(jnp.float32))
            return jax.lax.map(one, (heads, masks, x, y, jnp.arange(T)))
        return ev

    ev_zero_shot, ev_oracle = make_eval(False), make_eval(True)

    best, n = None, 0
    grid = SMILE_GRID
    for k, gk, top, oth in itertools.product(grid["k"], grid["gate_k"], grid["top_k"], grid["others"]):
        sm = smile_upscale(base, models, k=k, gate_k=gk, top_k=top, others=oth, clamp_rank=True)
        v, n = float(jnp.mean(ev_zero_shot(sm, *D["val"]))), n + 1
        if best is None or v > best[0]:
            best = (v, {"k": k, "gate_k": gk, "top_k": top, "others": oth}, sm)
    v, hp, sm = best
    acc = ev_zero_shot(sm, *D["test"])
    oracle = ev_oracle(sm, *D["test"])
    full = smile_upscale(base, models, k="full", gate_k=hp["gate_k"], top_k=hp["top_k"], others=hp["others"],
                         clamp_rank=True)
    st = sm.storage()
    diag = {"forced_true_task_test_avg": float(jnp.mean(oracle)),
            "full_rank_forced_true_task_test_avg": float(jnp.mean(ev_oracle(full, *D["test"]))),
            "full_rank_zero_shot_routing_test_avg": float(jnp.mean(ev_zero_shot(full, *D["test"]))),
            "stored_params": int(st["total_params"])}
    diag.update(_smile_routing_acc(sm, base, mc, D["test"][0]))
    return ([float(a) for a in acc], v, hp, n, sm.storage()["total_bytes"], diag)


def _smile_routing_acc(sm, base, mc, x) -> dict:
    """Fraction of test tokens whose top-1 SMILE expert is their own task's, per linear layer (averaged)."""
    import flax.linen as nn

    from ..dynamic import smile_routing

    T = sm.num_tasks
    hits: dict = {}

    def interceptor(next_fun, a, kw, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Dense, nn.DenseGeneral)):
            key = ".".join(str(p) for p in ctx.module.scope.path) + ".kernel"
            lay = sm.layers.get(key) or sm.layers.get("params." + key)
            if lay is not None:
                xin = a[0] if a else kw["inputs"]
                w = smile_routing(lay, xin)  # (N*tokens, T)
                hits[key] = w
        return next_fun(*a, **kw)

    out = []
    for t in range(T):
        hits.clear()
        with nn.intercept_methods(interceptor):
            M.features(mc, base, x[t])
        out.append(np.mean([float(jnp.mean(jnp.argmax(w, -1) == t)) for w in hits.values()]))
    return {"routing_true_task_fraction_test": float(np.mean(out))}


# ----------------------------------------------------------------------------------------------
# WEMoE


def _wemoe(ctx):
    from ..dynamic.wemoe import (build_wemoe, vit_mlp_groups, wemoe_apply, wemoe_storage, wemoe_tta,
                                  with_constant_routing)
    import optax

    mc, T, base, models = ctx["model_config"], ctx["T"], ctx["base"], ctx["models"]
    D = _data(ctx)
    heads, masks = _heads(ctx)
    head_list = [jax.tree.map(lambda a, t=t: a[t], heads) for t in range(T)]
    groups = vit_mlp_groups(base)
    spec = None

    def logits_fn(st, x, t):
        return wemoe_apply(lambda p, xb: M.logits(mc, p, head_list[t], xb, masks[t]), spec, st, x)

    @jax.jit
    def ev(st, x, y):
        def one(a):
            h, m, xt, yt = a
            lg = wemoe_apply(lambda p, xb: M.logits(mc, p, h, xb, m), spec, st, xt)
            return jnp.mean((jnp.argmax(lg, -1) == yt).astype(jnp.float32))
        return jax.lax.map(one, (heads, masks, x, y))

    @jax.jit
    def mean_routing(st, x):
        def one(a):
            h, m, xt = a
            _, r = wemoe_apply(lambda p, xb: M.logits(mc, p, h, xb, m), spec, st, xt, return_routing=True)
            return jnp.stack([jnp.mean(v, axis=0) for v in r.values()]).mean(0)  # (T,) mean routing weights
        return jax.lax.map(one, (heads, masks, x))

    xte_unlabeled = [np.asarray(x) for x in D["test"][0]]

    def tta(state, steps, lr):
        return wemoe_tta(spec, state, logits_fn, xte_unlabeled, steps=int(steps), lr=float(lr),
                         batch_size=WEMOE_BATCH, key=jax.random.PRNGKey(ctx["seed"] + 1),
                         optimizer=optax.adam(float(lr)))

    best, n, runs = None, 0, {}
    grid = WEMOE_GRID
    for scale in grid["scale"]:
        spec, state0 = build_wemoe(base, models, groups, scaling=scale, granularity="sample",
                                   key=jax.random.PRNGKey(ctx["seed"]))
        for steps in sorted(grid["steps"]):
            for lr in (grid["lr"] if steps else [0.0]):  # no adaptation: the lr does not matter
                state, losses = tta(state0, steps, lr) if steps else (state0, np.zeros((0,)))
                runs[(scale, lr, steps)] = (losses, state)
                v, n = float(jnp.mean(ev(state, *D["val"]))), n + 1
                if best is None or v > best[0]:
                    best = (v, {"scale": scale, "tta_lr": lr, "tta_steps": steps}, state, spec)
    v, hp, state, spec = best
    acc = ev(state, *D["test"])
    eye = np.eye(T, dtype=np.float32)
    oracle = [float(ev(with_constant_routing(state, eye[t]), *D["test"])[t]) for t in range(T)]
    diag = {"oracle_routing_test_avg": float(np.mean(oracle)), "stored_params": wemoe_storage(spec, state)["wemoe"]}
    # what the adaptation does at the chosen scale with the grid's largest lr and steps (the entropy collapse)
    probe = (hp["scale"], max(grid["lr"]), max(grid["steps"]))
    if probe in runs:
        losses, st = runs[probe]
        r = np.asarray(mean_routing(st, D["test"][0]))  # (true task, routing weight per task)
        diag.update({"tta_probe": {"scale": probe[0], "lr": probe[1], "steps": probe[2]},
                     "tta_entropy_first10": float(np.mean(losses[:10])),
                     "tta_entropy_last10": float(np.mean(losses[-10:])),
                     "tta_test_avg": float(jnp.mean(ev(st, *D["test"]))),
                     "tta_val_avg": float(jnp.mean(ev(st, *D["val"]))),
                     "tta_routing_own_task_mean": float(np.mean(np.diag(r))),
                     "tta_routing_other_tasks_mean": float((r.sum() - np.trace(r)) / (T * T - T))})
    return ([float(a) for a in acc], v, hp, n, wemoe_storage(spec, state)["wemoe_bytes"], diag)


DYNAMIC = {"twin_merging": _twin, "smile": _smile, "wemoe": _wemoe}
DYNAMIC_ALIASES = {"twin": "twin_merging", "twin-merging": "twin_merging", "we_moe": "wemoe"}
