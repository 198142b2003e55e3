"""MoE dispatch throughput (tokens/s): the path ``moe_dispatch`` chooses, ``jax.lax.ragged_dot`` and the
dense one-hot einsum, in one run, for a few (tokens, hidden, ffn, experts, top_k) sizes.

Usage: python3 scripts/bench_kernels.py [--dtype bfloat16] [--sizes small|all] [--repeat 5]
On CPU the Pallas path runs only in the interpreter, which is not a throughput: it is not timed there
(``auto`` is then ``ragged``); on GPU/TPU ``auto`` is the Pallas grouped matmul.
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


def main(argv=None):
    from jmerge.kernels import moe_dispatch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sizes", default=None, choices=sorted(SIZES), help="default: small on CPU, all elsewhere")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--block-rows", type=int, default=128)
    p.add_argument("--block-cols", type=int, default=128)
    a = p.parse_args(argv)
    backend = jax.default_backend()
    sizes = SIZES[a.sizes or ("small" if backend == "cpu" else "all")]
    dtype = jnp.dtype(a.dtype)
    on_cpu = backend == "cpu"
    auto = "ragged" if on_cpu else "pallas"
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
    main()
