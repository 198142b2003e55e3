"""Pallas kernel benchmarks.

Default mode, MoE dispatch throughput (tokens/s): the path ``moe_dispatch`` chooses, ``jax.lax.ragged_dot``
and the dense one-hot einsum, in one run, for a few (tokens, hidden, ffn, experts, top_k) sizes.

``--fused``: the TIES family's fused masked merge (``jmerge.kernels.masked_merge``: read T models and the
base once, apply per-model top-k thresholds, elect signs, disjoint mean, scale, write ``base + delta``).
Reports the achieved bandwidth (bytes read + written / time) and its fraction of the device's peak memory
bandwidth (table ``PEAK_GBS``, or ``--peak-gbs``; target >= 0.8 on GPU), for the Pallas kernel and for the
same arithmetic as one XLA fusion, whether the two agree bit for bit, and the end-to-end ``jmerge.merge``
of one leaf with the backend forced to ``xla`` and to ``pallas`` (top-k counting passes included; with
``pallas`` the single-pass route of ``jmerge.methods.ties_fused``: thresholds by XLA, then one kernel), its
bandwidth as the kernel's minimal bytes over the route's time. On CPU the route's bit-for-bit equality and
its one ``pallas_call`` per leaf are checked (not timed).

Usage: python3 scripts/bench_kernels.py [--dtype bfloat16] [--sizes small|all] [--repeat 5]
       python3 scripts/bench_kernels.py --fused [--n 67108864] [--models 2,4,8] [--block-rows 16,32,64]
On CPU the Pallas path runs only in the interpreter, which is not a throughput: it is not timed there
(``--fused`` checks the kernel against XLA on a small leaf and says that bandwidth figures need a GPU/TPU);
on GPU/TPU the compiled Pallas grouped matmul is timed beside them (``auto`` is ``ragged`` everywhere).
"""

from __future__ import annotations

import functools

import argparse

import jax
import jax.numpy as jnp
from _timing import best_time  # noqa: E402 - scripts/ is on sys.path when run as a script

# (tokens, hidden, ffn, experts, top_k)
SIZES = {
    "small": [(512, 256, 512, 8, 2), (2048, 256, 512, 8, 1), (1024, 512, 1024, 16, 2)],
    "all": [(512, 256, 512, 8, 2), (2048, 256, 512, 8, 1), (1024, 512, 1024, 16, 2),
            (4096, 1024, 3584, 8, 2), (8192, 2048, 1408, 60, 4), (16384, 4096, 14336, 8, 2)],
}


_best = functools.partial(best_time, repeat=5)


# Peak HBM bandwidth (GB/s, vendor figures) by a lower-case substring of ``device_kind``; first match wins.
PEAK_GBS = [
    ("h200", 4800.0),                # H200 SXM / NVL: 4.8 TB/s HBM3e
    ("h100 nvl", 3900.0),
    ("h100 pcie", 2000.0),
    ("h100", 3350.0),                # H100 SXM5 80GB HBM3
    ("a100-sxm4-80gb", 2039.0),
    ("a100 80gb pcie", 1935.0),
    ("a100-pcie-80gb", 1935.0),
    ("a100", 1555.0),                # A100 40GB (SXM4 and PCIe)
    ("tpu v4", 1228.0),
    ("tpu v5 lite", 819.0),          # v5e
    ("tpu v5e", 819.0),
    ("tpu v5p", 2765.0),
    ("tpu v5", 2765.0),
    ("tpu v6 lite", 1640.0),         # v6e (Trillium)
    ("tpu v6e", 1640.0),
]


def peak_gbs(device_kind: str) -> float | None:
    """The table's peak bandwidth of a device kind (GB/s), or None when it is not listed."""
    kind = device_kind.lower()
    return next((gbs for key, gbs in PEAK_GBS if key in kind), None)


def _fused(a, dtype_name: str) -> int:
    import numpy as np

    import jmerge
    from jmerge.kernels import masked_merge, masked_merge_bytes, merge_backend

    backend = jax.default_backend()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = a.peak_gbs or peak_gbs(kind)
    dtype = jnp.dtype(dtype_name)
    print(f"device={dev} kind={kind!r} backend={backend} dtype={dtype.name} "
          f"peak={'unknown' if peak is None else f'{peak:.0f} GB/s'}")
    on_cpu = backend == "cpu"
    n = a.n or (1 << 14 if on_cpu else 1 << 26)
    if on_cpu:
        print("GPU/TPU figures need a GPU or TPU: on CPU the Pallas kernel runs only in the interpreter (a "
              "correctness tool, not a kernel). Checking it against XLA on a small leaf instead; run "
              "`python scripts/bench_kernels.py --fused` on a GPU/TPU machine for the bandwidth table.")
    blocks = [int(b) for b in a.block_rows_list.split(",")] if not on_cpu else [8]
    print(f"{'T':>2} {'entries':>11} {'MB moved':>9} {'impl':>14} {'ms':>9} {'GB/s':>8} {'of peak':>8}  bitwise")
    ok = True
    for T in [int(t) for t in a.models.split(",")]:
        key = jax.random.key(T)
        kb, km = jax.random.split(key)
        rows = n // 128
        base = jax.random.normal(kb, (rows, 128), jnp.float32).astype(dtype)
        models = [(base.astype(jnp.float32) + 0.01 * jax.random.normal(k, (rows, 128))).astype(dtype)
                  for k in jax.random.split(km, T)]
        # thresholds keeping about 20% of each task vector (any threshold costs the same; no top-k timed here)
        tau0 = np.asarray(models[0][:64].astype(jnp.float32) - base[:64].astype(jnp.float32)).reshape(-1)
        v0 = np.quantile(np.abs(tau0), 0.8).astype(np.float32).view(np.int32)
        thr = (jnp.full((T,), v0, jnp.int32), jnp.full((T,), n // 2, jnp.int32))
        w = jnp.linspace(0.5, 1.5, T, dtype=jnp.float32)
        nbytes = masked_merge_bytes([((rows, 128), dtype)] * T, dtype)
        common = dict(thresholds=thr, weights=w, scale=jnp.float32(0.9), normalize_by="weight")
        ref = jax.jit(lambda ms, b: masked_merge(ms, b, reference=True, **common))
        outs = {"xla fusion": ref(models, base)}
        runs = [("xla fusion", ref)]
        for br in blocks:
            f = jax.jit(lambda ms, b, br=br: masked_merge(ms, b, block_rows=br, **common))
            name = f"pallas br={br}"
            try:
                outs[name] = f(models, base)
                runs.append((name, f))
            except Exception as err:  # noqa: BLE001 - a block size that does not lower is reported, not fatal
                ok = False
                print(f"   {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        want = np.asarray(outs["xla fusion"]).view(np.uint16 if dtype.itemsize == 2 else np.uint32)
        for name, f in runs:
            same = np.asarray(outs[name]).view(want.dtype)
            bad = int(np.sum(same != want))
            ok = ok and bad == 0
            if on_cpu and name != "xla fusion":
                print(f"{T:2d} {n:11d} {nbytes / 1e6:9.1f} {name:>14} {'-':>9} {'-':>8} {'-':>8}  "
                      f"{'yes' if bad == 0 else f'NO ({bad} differ)'}")
                continue
            t = best_time(f, models, base, repeat=a.repeat)
            gbs = nbytes / t / 1e9
            frac = f"{gbs / peak:8.2f}" if peak else f"{'-':>8}"
            print(f"{T:2d} {n:11d} {nbytes / 1e6:9.1f} {name:>14} {t * 1e3:9.3f} {gbs:8.1f} {frac}  "
                  f"{'yes' if bad == 0 else f'NO ({bad} differ)'}")
        # The library route end to end: jmerge.merge(ties) with the backend forced to xla and to pallas. With
        # pallas it is the single-pass route (jmerge.methods.ties_fused): exact top-k thresholds by XLA's
        # counting passes, then ONE kernel reading the models and the base once and writing base + delta.
        # Its bandwidth below is the kernel's minimal bytes over the whole route's time (passes included).
        res = {}
        for mode in ("xla", "pallas"):
            with merge_backend(mode):
                method = jmerge.methods.ties(density=0.2, normalize_by="weight")
            g = jax.jit(lambda b, ms, method=method: jmerge.merge(method, b, ms))
            res[mode] = g(base, models)
            if mode == "pallas":
                calls = str(jax.make_jaxpr(lambda b, ms, method=method: jmerge.merge(method, b, ms))(base, models)
                            ).count("pallas_call")
                print(f"   single-pass route: {calls} pallas_call per leaf (models + base read once by it)")
            if on_cpu:
                continue
            t = best_time(g, base, models, repeat=a.repeat)
            gbs = nbytes / t / 1e9
            frac = f"{gbs / peak:8.2f}" if peak else f"{'-':>8}"
            print(f"{T:2d} {n:11d} {nbytes / 1e6:9.1f} {'merge ' + mode:>14} {t * 1e3:9.3f} {gbs:8.1f} {frac}  "
                  "(jmerge.merge(ties): top-k passes + final pass)")
        same = bool(np.array_equal(np.asarray(res["xla"]).view(want.dtype), np.asarray(res["pallas"]).view(want.dtype)))
        ok = ok and same
        print(f"   merge pallas == merge xla bit for bit: {same}")
    print("all bitwise equal" if ok else "MISMATCH or failure above")
    return 0 if ok else 1


def main(argv=None):
    from jmerge.kernels import moe_dispatch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fused", action="store_true", help="benchmark the fused masked merge (TIES family)")
    p.add_argument("--n", type=int, default=None, help="--fused: entries per leaf (a multiple of 128)")
    p.add_argument("--models", default="2,4,8", help="--fused: numbers of models T")
    p.add_argument("--block-rows-list", default="16,32,64,128", help="--fused: Pallas block rows tried")
    p.add_argument("--peak-gbs", type=float, default=None, help="--fused: the device's peak bandwidth, GB/s")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 (MoE); --fused: bfloat16 then float32")
    p.add_argument("--sizes", default=None, choices=sorted(SIZES), help="default: small on CPU, all elsewhere")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--block-rows", type=int, default=128)
    p.add_argument("--block-cols", type=int, default=128)
    a = p.parse_args(argv)
    if a.fused:
        rc = 0
        for dt in ([a.dtype] if a.dtype else ["bfloat16", "float32"]):
            rc |= _fused(a, dt)
        return rc
    a.dtype = a.dtype or "float32"
    backend = jax.default_backend()
    sizes = SIZES[a.sizes or ("small" if backend == "cpu" else "all")]
    dtype = jnp.dtype(a.dtype)
    on_cpu = backend == "cpu"
    from jmerge.kernels.moe import _AUTO as auto  # what moe_dispatch's "auto" runs (on every backend)
    print(f"device={jax.devices()[0]} backend={backend} dtype={dtype.name} auto={auto}")
    if on_cpu:
        print("pallas: not timed without a GPU/TPU (the CPU interpreter is a correctness tool, not a kernel)")
    impls = ["ragged", "dense"] if on_cpu else ["pallas", "ragged", "dense"]
    head = "".join(f"{n:>16}" for n in impls)
    print(f"{'tokens':>7} {'hidden':>6} {'ffn':>6} {'E':>3} {'k':>2} {head}   (tokens/s)  max|diff| vs dense")
    for N, H, F, E, k in sizes:
        keys = jax.random.split(jax.random.key(N + H + F + E + k), 5)
        x = jax.random.normal(keys[0], (N, H), dtype)
        lg = jax.random.normal(keys[1], (N, E), jnp.float32)
        wg = (jax.random.normal(keys[2], (E, H, F)) / H ** 0.5).astype(dtype)
        wu = (jax.random.normal(keys[3], (E, H, F)) / H ** 0.5).astype(dtype)
        wd = (jax.random.normal(keys[4], (E, F, H)) / F ** 0.5).astype(dtype)
        row, outs = [], {}
        for impl in impls:
            f = jax.jit(lambda *args, impl=impl: moe_dispatch(*args, k, impl=impl, block_rows=a.block_rows,
                                                               block_cols=a.block_cols))
            try:
                outs[impl] = f(x, lg, wg, wu, wd)
                t = _best(f, x, lg, wg, wu, wd, repeat=a.repeat)
                row.append(f"{N / t:16.4g}")
            except Exception as err:  # noqa: BLE001 - a size that does not fit is reported, not fatal
                row.append(f"{'failed':>16}")
                print(f"  {impl}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        diff = max((float(jnp.max(jnp.abs(outs[i].astype(jnp.float32) - outs["dense"].astype(jnp.float32))))
                    for i in outs if i != "dense"), default=float("nan")) if "dense" in outs else float("nan")
        print(f"{N:7d} {H:6d} {F:6d} {E:3d} {k:2d} {''.join(row)}   {diff:.3g}")


if __name__ == "__main__":
    raise SystemExit(main())
