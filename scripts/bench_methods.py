"""Time every data-free merge method on a ~100M-parameter tree with 3 task vectors.

Prints each method's wall time (after compilation) and its ratio to task arithmetic measured in
the same run, with the load average (the machine may be shared). Targets (issue 14): every non-SVD
method within 5x task arithmetic; whole-model TIES (``ties_global``: ``ties(scope="global")``) within 3x.

    python scripts/bench_methods.py                 # ~100M params, all methods
    python scripts/bench_methods.py --params 20e6 --methods task_arithmetic ties
    python scripts/bench_methods.py --dtype bfloat16 --delta 0.25 --methods ties   # bf16 checkpoints: heavy ties
    python scripts/bench_methods.py --sync-dispatch --keep-host-memory   # the no-fresh-pages setting
    python scripts/bench_methods.py --streams 1     # leaf programs one after another (default: 2 streams)
    python scripts/bench_methods.py --compare-streams --methods task_arithmetic ties breadcrumbs  # 1 vs 2, one run
    python scripts/bench_methods.py --methods task_arithmetic ties pcb della della_linear arcee_fusion --floors

``--floors``: also times, on the same tree, arithmetic that some methods cannot avoid, and prints each
method's time as a multiple of it: DELLA's exact magnitude ranks need every row sorted (NumPy's sort of
the rows' packed ``key << 32 | position`` int64 values in cache-sized blocks on the host ranks' threads,
the sort ``jmerge.core.rank`` runs, and nothing else: no differences, no packing, no scatter, no draws);
PCB's scores need six exponentials per entry (three fine-tunes: one per pair of task vectors), timed as
one fused XLA pass per leaf with XLA's own ``exp``, plus a per-row top-k and merge of three rows, taken
as TIES's time in the same run; Arcee Fusion needs its row KL divergences, computed as jmerge computes them
(the same bits: the merge's mask at an entry depends on them), and one pass that writes the output from
the inputs and the KLs (the mask at a given threshold), without the exact quartiles of the importances.

``--delta``: the fine-tunes are ``base + delta * N(0, 1)`` (base ~ N(0, 1)), rounded to ``--dtype``. In
bfloat16 (8 significant bits) their task vectors take few distinct values, each many times: the tie-heavy
case of the exact top-k search (``jmerge/core/select.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmerge
from jmerge.core import streams


_SVD = ("tsv_m", "iso_c", "iso_cts")  # bound against their SVDs' own time: scripts/bench_svd.py


def make_tree(n_params: float, seed: int = 0, dtype=jnp.float32):
    """Llama-like leaves (hidden h, mlp 2.75h) sized to about n_params."""
    h = 1024
    per_layer = 4 * h * h + 3 * h * int(2.75 * h) + 2 * h
    layers = max(1, int(round(n_params / per_layer)))
    key = jax.random.key(seed)
    shapes = {}
    for l in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes[f"layers.{l}.attn.{n}"] = (h, h)
        for n in ("gate", "up"):
            shapes[f"layers.{l}.mlp.{n}"] = (h, int(2.75 * h))
        shapes[f"layers.{l}.mlp.down"] = (int(2.75 * h), h)
        shapes[f"layers.{l}.norm1"] = (h,)
        shapes[f"layers.{l}.norm2"] = (h,)
    tree = {}
    for i, (k, s) in enumerate(shapes.items()):
        d = tree
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = jax.random.normal(jax.random.fold_in(key, i), s, dtype)
    return tree


def make_finetunes(base, n_models: int, delta: float) -> list:
    """``n_models`` fine-tunes ``base + delta * N(0, 1)``, each leaf's update from its own key (one key per model
    for every leaf would make same-shaped leaves' updates identical: a whole-model sample of them is then
    correlated, unlike real fine-tunes)."""
    leaves, treedef = jax.tree.flatten(base)
    return [jax.tree.unflatten(treedef, [
        x + delta * jax.random.normal(jax.random.fold_in(jax.random.key(100 + i), j), x.shape, x.dtype)
        for j, x in enumerate(leaves)]) for i in range(n_models)]


def timed(fn, repeat):
    jax.block_until_ready(fn())  # compile + warm
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def timed_streams(fn, repeat, counts=(1, 2)):
    """Best time of ``fn`` with each count of ``streams.LEAF_STREAMS`` in ``counts``, the settings alternated
    within every repeat (so that a change in the machine's load falls on both); the setting is restored."""
    saved = streams.LEAF_STREAMS
    best = {c: float("inf") for c in counts}
    try:
        for c in counts:  # compile + warm (the compiled programs are the same for every count)
            streams.LEAF_STREAMS = c
            jax.block_until_ready(fn())
        for _ in range(repeat):
            for c in counts:
                streams.LEAF_STREAMS = c
                t = time.perf_counter()
                jax.block_until_ready(fn())
                best[c] = min(best[c], time.perf_counter() - t)
    finally:
        streams.LEAF_STREAMS = saved
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--delta", type=float, default=0.01, help="scale of the fine-tunes' updates (base ~ N(0, 1))")
    ap.add_argument("--keep-host-memory", action="store_true",
                    help="time every method inside jmerge.keep_host_memory() (a loop's calls reuse freed pages)")
    ap.add_argument("--sync-dispatch", action="store_true",
                    help="turn JAX's CPU async dispatch off before the first computation: each execution then "
                         "allocates its temporaries on the calling thread, whose freed pages malloc can reuse "
                         "(with --keep-host-memory: every call's; see jmerge/core/heap.py)")
    ap.add_argument("--streams", type=int, default=None,
                    help="execution streams the eager leaf programs take in turn (jmerge.core.streams.LEAF_STREAMS; "
                         "default 2, 1: one after another)")
    ap.add_argument("--compare-streams", action="store_true",
                    help="time every method on one execution stream and on two, alternated in this run, and print "
                         "both (the ratios use the two-stream times)")
    ap.add_argument("--floors", action="store_true",
                    help="also time the arithmetic DELLA, PCB and Arcee Fusion cannot avoid (exact row sorts, "
                         "exponentials, row KLs)")
    args = ap.parse_args()
    if args.compare_streams and args.streams is not None:
        ap.error("--compare-streams times one and two streams itself: leave out --streams")
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)  # read when the CPU client is created
    if args.streams is not None:
        streams.LEAF_STREAMS = args.streams
    with jmerge.keep_host_memory() if args.keep_host_memory else contextlib.nullcontext():
        run(args)


def packed_blocks(base, models) -> list:
    """DELLA's sort keys of the tree: per leaf, model and block of rows (``rank._HOST_BLOCK`` entries), the int64
    values ``|model - base|``'s key ``<< 32 | position in the row``, float32, rows as in
    :func:`jmerge.core.rank.difference_ranks` (the leading axis). Sorted, a row's low 32 bits list its entries
    from the smallest magnitude up (ties by position): the inverse permutation is DELLA's ranks."""
    from jmerge.core import rank

    blocks = []
    models = [jax.tree.leaves(m) for m in models]
    for i, b in enumerate(jax.tree.leaves(base)):
        b = np.asarray(b, np.float32)
        rows = b.reshape(b.shape[0], -1) if b.ndim > 1 else b.reshape(1, -1)
        m = rows.shape[1]
        rb = max(1, rank._HOST_BLOCK // m)
        for mod in models:
            x = np.asarray(mod[i], np.float32).reshape(rows.shape) - rows
            keys = np.minimum(x.view(np.int32) & rank._ABS, rank._INF_KEY)  # |x|'s bits, NaN as +inf (as rank)
            packed = (keys.astype(np.int64) << 32) | np.arange(m, dtype=np.int64)[None]
            blocks += [packed[a:a + rb] for a in range(0, rows.shape[0], rb)]
    return blocks


def sort_floor(base, models, repeat) -> float:
    """Seconds to sort every row of the tree's task vectors as DELLA's exact ranks need: NumPy's in-place sort
    of :func:`packed_blocks` on the host ranks' threads (the values built, and copied in before each sort,
    outside the timing)."""
    from concurrent.futures import ThreadPoolExecutor

    from jmerge.core import rank

    jobs = [(b, np.empty_like(b)) for b in packed_blocks(base, models)]
    parts = [jobs[w::rank._WORKERS] for w in range(rank._WORKERS)]

    def sort_all(js):
        for _, dst in js:
            dst.sort(axis=-1)

    best = float("inf")
    with ThreadPoolExecutor(rank._WORKERS) as pool:
        for _ in range(repeat):
            for src, dst in jobs:
                np.copyto(dst, src)
            t = time.perf_counter()
            list(pool.map(sort_all, parts))
            best = min(best, time.perf_counter() - t)
    return best


def exp_floor(base, models, repeat) -> float:
    """Seconds for PCB's exponentials alone: per leaf, one jitted pass that reads the inputs, forms the
    T (T + 1) / 2 pairwise products of the task vectors and writes the sum of their ``exp`` (XLA's own)."""

    @jax.jit
    def leaf(b, *ms):
        r = [m.astype(jnp.float32) - b.astype(jnp.float32) for m in ms]
        return sum(jnp.exp(r[t] * r[u]) for t in range(len(r)) for u in range(t, len(r)))

    leaves = [jax.tree.leaves(m) for m in models]
    return timed(lambda: [leaf(b, *(l[i] for l in leaves)) for i, b in enumerate(jax.tree.leaves(base))], repeat)


def kl_floor(base, models, repeat) -> float:
    """Seconds for what Arcee Fusion cannot avoid, without its quartiles: per leaf, jmerge's row KLs of the first
    fine-tune against the base (:func:`jmerge.methods.fusion.fusion_importance`'s, the same bits) and one pass
    writing the model's entries where ``|model - base| * KL >= threshold`` and the base's elsewhere
    (:func:`kl_floor_leaf`)."""
    leaves = jax.tree.leaves(models[0])
    c = jnp.float32(1e-9)
    return timed(lambda: [kl_floor_leaf(b, leaves[i], c) for i, b in enumerate(jax.tree.leaves(base))], repeat)


@jax.jit
def kl_floor_leaf(b, m, threshold):
    """One leaf of :func:`kl_floor`: Arcee Fusion's merged leaf for a given fence ``threshold``."""
    from jmerge.methods import fusion

    m32, b32 = m.astype(jnp.float32), b.astype(jnp.float32)
    imp = fusion.fusion_importance(m32, b32)
    return jnp.where(imp >= threshold, m32, b32).astype(b.dtype)


def run(args):

    base = make_tree(args.params)
    n = sum(x.size for x in jax.tree.leaves(base))
    dt = jnp.dtype(args.dtype)
    models = [jax.tree.map(lambda x: x.astype(dt), m) for m in make_finetunes(base, args.models, args.delta)]
    base = jax.tree.map(lambda x: x.astype(dt), base)
    jax.block_until_ready(models)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tree: {n / 1e6:.1f}M params, "
          f"{len(jax.tree.leaves(base))} leaves, {args.models} fine-tuned models ({args.dtype}, updates "
          f"{args.delta} N(0, 1)); load average {os.getloadavg()[0]:.1f}"
          + ("; inside jmerge.keep_host_memory()" if args.keep_host_memory else "")
          + ("; CPU async dispatch off" if args.sync_dispatch else "")
          + ("; one and two execution streams, alternated" if args.compare_streams
             else f"; {streams.LEAF_STREAMS} execution stream(s)"))
    registry = dict(jmerge.available_methods())
    registry["ties_global"] = lambda: jmerge.ties(scope="global")  # the paper's whole-model trim
    names = args.methods or sorted(registry)
    names = ["task_arithmetic"] + [m for m in names if m != "task_arithmetic"]
    rows = []
    ta = None
    for name in names:
        try:
            method = registry[name]()
            T = args.models
            if method.max_models is not None:
                T = min(T, method.max_models)
            ms = models[:max(T, method.min_models)]
            fn = lambda: jmerge.merge(method, base, ms)
            if args.compare_streams:
                ab = timed_streams(fn, args.repeat)
                t = ab[2]
            else:
                t = timed(fn, args.repeat)
        except Exception as e:  # report and continue
            print(f"{name:24s} FAILED: {type(e).__name__}: {str(e)[:120]}")
            continue
        ta = t if name == "task_arithmetic" else ta
        rows.append((name, t, t / ta))
        print(f"{name:24s} {t:8.3f} s   {t / ta:6.2f}x task_arithmetic"
              + (f"   (one stream {ab[1]:.3f} s: two are {ab[1] / ab[2]:.2f}x faster)" if args.compare_streams else ""),
              flush=True)
    if ta is not None and len(rows) > 1:
        # task arithmetic again: the first timing of the run also pays for the process's first allocations
        again = timed(lambda: jmerge.merge(registry["task_arithmetic"](), base, models), args.repeat)
        ta = min(ta, again)
        print(f"task_arithmetic again    {again:8.3f} s; ratios below against the faster, {ta:.3f} s")
        rows = [(name, t, t / ta) for name, t, _ in rows]
    if args.floors:
        times = {name: t for name, t, _ in rows}
        floors = {"della": sort_floor(base, models, args.repeat)}
        floors["della_linear"] = floors["della"]
        if "ties" in times:
            floors["pcb"] = exp_floor(base, models, args.repeat) + times["ties"]
        floors["arcee_fusion"] = kl_floor(base, models, args.repeat)
        print(f"floors: DELLA's row sorts {floors['della']:.3f} s ({floors['della'] / ta:.2f}x task arithmetic)"
              + (f"; PCB's exponentials + TIES {floors['pcb']:.3f} s ({floors['pcb'] / ta:.2f}x)" if "pcb" in floors
                 else "; PCB's needs ties in --methods")
              + f"; Arcee Fusion's row KLs + one output pass {floors['arcee_fusion']:.3f} s "
                f"({floors['arcee_fusion'] / ta:.2f}x)")
        for name, t, _ in rows:
            if name in floors:
                print(f"{name:24s} {t:8.3f} s = {t / floors[name]:5.2f}x its floor")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for name, t, ratio in rows:
        if name == "ties_global":
            print(f"{name} / task arithmetic = {ratio:.2f}x (target <= 3x): {'OK' if ratio <= 3.0 else 'ABOVE TARGET'}")
        elif name not in _SVD and name != "task_arithmetic":
            print(f"{name} / task arithmetic = {ratio:.2f}x (target <= 5x): {'OK' if ratio <= 5.0 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
