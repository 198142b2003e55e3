"""Time the SVD merge methods against the LAPACK SVDs they need, measured in the same run.

For the ~100M-parameter float32 tree of ``scripts/bench_methods.py`` (Llama-like leaves, 3 task
vectors), per method: jmerge's merge time, the time NumPy (LAPACK ``gesdd``, float32, economy size)
spends in the SVDs the paper's algorithm takes of the same matrices, and their ratio (the issue's bound:
1.5x). The SVDs counted per matrix:

* ISO-C: the SVD of the summed task matrix;
* TSV-M: each task's SVD (its top ``r`` kept) and the two orthogonalisation SVDs;
* ISO-CTS: the SVD of the sum, each task's residual SVD, the two orthogonalisation SVDs.

Randomized variants (``svd="randomized"``) also print their relative error
``||Δ_randomized − Δ_exact||_F / ||Δ_exact||_F`` over the timed matrices (task vectors here are Gaussian:
a flat spectrum, the worst case for truncation). jmerge and NumPy runs alternate, best of ``--repeat``,
so a loaded machine slows both alike.

Leaves of one shape cost the same (same SVDs, same compiled program), so by default one leaf of each
distinct matrix shape is timed and the whole-tree figures are each shape's time times its number of
leaves (``--per-shape``); ``--no-per-shape --layers N`` times the first N layers as they are
(``--layers 0``: the whole tree, slow on 2 cores).

    python scripts/bench_svd.py                       # ~100M-param tree, one leaf per shape timed
    python scripts/bench_svd.py --no-per-shape --layers 0 --methods iso_c
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_methods import make_finetunes, make_tree  # noqa: E402  (the methods benchmark's tree and fine-tunes)

import jmerge  # noqa: E402
from jmerge.methods.spectral import iso_cts_sizes, tsv_rank  # noqa: E402


class SvdClock:
    """NumPy economy SVD that adds its wall time to ``seconds``."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, x):
        t = time.perf_counter()
        out = np.linalg.svd(x, full_matrices=False)
        self.seconds += time.perf_counter() - t
        return out


def polar(x, svd):
    p, _, qt = svd(x)
    return p @ qt


def np_iso_c(ts, svd, **_):
    u, s, vt = svd(sum(ts))
    return (u * s.mean()) @ vt


def np_tsv_m(ts, svd, **_):
    r = tsv_rank(min(ts[0].shape), len(ts))
    us, ss, vs = [], [], []
    for x in ts:
        u, s, vt = svd(x)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vt[:r])
    return (polar(np.concatenate(us, 1), svd) * np.concatenate(ss)) @ polar(np.concatenate(vs, 0), svd)


def np_iso_cts(ts, svd, common_fraction=0.8):
    kc, d = iso_cts_sizes(min(ts[0].shape), len(ts), common_fraction)
    u, s, vt = svd(sum(ts))
    uc = u[:, :kc]
    us, ss, vs = [], [], []
    for x in ts:
        ut, st, vtt = svd(x - uc @ (uc.T @ x))
        us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vtt[:d])
    s_iso = np.concatenate(ss + [s[:kc]]).mean()
    return s_iso * polar(np.concatenate(us + [uc], 1), svd) @ polar(np.concatenate(vs + [vt[:kc]], 0), svd)


REFERENCE = {"iso_c": np_iso_c, "tsv_m": np_tsv_m, "iso_cts": np_iso_cts}


def leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def np_svd_seconds(name, base, models, weights=None):
    """Seconds NumPy spends in the SVDs of ``name``'s algorithm over every matrix leaf (each leaf's time
    times its weight); its merged deltas."""
    bl, ml = dict(leaves(base)), [dict(leaves(m)) for m in models]
    out, total = {}, 0.0
    for p, b in bl.items():
        if b.ndim == 2:
            clock = SvdClock()
            ts = [np.asarray(m[p]) - np.asarray(b) for m in ml]  # float32 task matrices (not timed)
            out[p] = REFERENCE[name](ts, clock)
            total += clock.seconds * (weights[p] if weights else 1)
    return total, out


def jmerge_seconds(method, base, models, weights=None):
    """jmerge's merge time (each leaf merged on its own and weighted, when ``weights`` are given)."""
    if not weights:
        t = time.perf_counter()
        out = jax.block_until_ready(jmerge.merge(method, base, models))
        return time.perf_counter() - t, out
    total, out = 0.0, {}
    for p in base:
        t = time.perf_counter()
        out[p] = jax.block_until_ready(jmerge.merge(method, {p: base[p]}, [{p: m[p]} for m in models]))[p]
        total += (time.perf_counter() - t) * weights[p]
    return total, out


def rel_err(a, b, base):
    num = den = 0.0
    for p, x in leaves(base):
        if x.ndim == 2:
            da = np.asarray(dict(leaves(a))[p], np.float64) - np.asarray(x, np.float64)
            db = np.asarray(dict(leaves(b))[p], np.float64) - np.asarray(x, np.float64)
            num += np.sum((da - db) ** 2)
            den += np.sum(db ** 2)
    return float(np.sqrt(num / den))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--per-shape", action=argparse.BooleanOptionalAction, default=True,
                    help="time one leaf per distinct shape, weighted by its count in the tree")
    ap.add_argument("--layers", type=int, default=1, help="with --no-per-shape: layers timed (0: all)")
    ap.add_argument("--methods", nargs="*", default=["iso_c", "tsv_m", "iso_cts"])
    ap.add_argument("--randomized", action=argparse.BooleanOptionalAction, default=True,
                    help="also time svd='randomized' (TSV-M, ISO-CTS)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    full = make_tree(args.params)
    n_layers = len(full["layers"])
    n_full = sum(x.size for x in jax.tree.leaves(full))
    counts: dict = {}
    for _, x in leaves(full):
        counts[tuple(x.shape)] = counts.get(tuple(x.shape), 0) + 1
    if args.per_shape:  # one leaf per distinct matrix shape; weights = its count in the tree
        first = {}
        for p, x in leaves(full):
            if x.ndim == 2:
                first.setdefault(tuple(x.shape), (p, x))
        base = {f"m{i}": x for i, (p, x) in enumerate(first.values())}
        weights = {f"m{i}": counts[s] for i, s in enumerate(first)}
        what = "one leaf per shape, x its count: " + ", ".join(f"{s} x{counts[s]}" for s in first)
    else:
        timed_layers = n_layers if args.layers <= 0 else min(args.layers, n_layers)
        base = {"layers": {k: v for k, v in full["layers"].items() if int(k) < timed_layers}}
        weights = None
        what = f"{timed_layers} layer(s) as they are, x {n_layers / timed_layers:g}"
    del full
    models = make_finetunes(base, args.models, 0.01)
    jax.block_until_ready(models)
    print(f"jax {jax.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; tree {n_full / 1e6:.1f}M params, "
          f"{n_layers} layers, {args.models} task vectors (float32); timed: {what}")
    scale = 1 if weights else n_layers / timed_layers
    print(f"{'method':28s} {'jmerge s':>9s} {'numpy SVDs s':>13s} {'ratio':>6s}  (whole-tree seconds)  rel. error vs exact")
    registry = jmerge.available_methods()
    rows = []
    for name in args.methods:
        variants = [(name, registry[name]())]
        if args.randomized and name in ("tsv_m", "iso_cts"):
            variants.append((f"{name} (randomized)", registry[name](svd="randomized")))
        exact_out = None
        for label, method in variants:
            jmerge_seconds(method, base, models)  # compile + warm (per-shape: the same one-leaf merges)
            best_j = best_n = float("inf")
            for _ in range(args.repeat):  # alternate, so that load slows both alike
                tj, out = jmerge_seconds(method, base, models, weights)
                tn, np_out = np_svd_seconds(name, base, models, weights)
                best_j, best_n = min(best_j, tj), min(best_n, tn)
            err = ""
            if exact_out is None:
                exact_out = out
                bl = dict(leaves(base))
                num = sum(np.sum((np.asarray(dict(leaves(out))[p], np.float64) - bl[p] - d) ** 2) for p, d in np_out.items())
                den = sum(np.sum(np.asarray(d, np.float64) ** 2) for d in np_out.values())
                err = f"(exact; vs NumPy float32 {np.sqrt(num / den):.1e})"
            else:
                err = f"{rel_err(out, exact_out, base):.2e}"
            ratio = best_j / best_n
            rows.append((label, ratio))
            print(f"{label:28s} {best_j * scale:9.1f} {best_n * scale:13.1f} {ratio:6.2f}  {err}", flush=True)
    bad = [r for r in rows if r[1] > 1.5]
    print("\nall within 1.5x of their NumPy SVDs" if not bad else
          f"\nabove 1.5x: {', '.join(f'{l} {r:.2f}x' for l, r in bad)}")


if __name__ == "__main__":
    main()
