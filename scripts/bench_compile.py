"""Compile and run time of a merge as the number of same-shaped leaves grows (8, 32, 128).

Two ways a JAX user calls jmerge: inside their own ``jax.jit`` (leaves of one shape share one traced
body, ``lax.map`` over their stack) and eagerly (one executable per leaf shape, cached). Prints the
compile (first call) and run (later calls) times and the compile-time ratio 32/8 (target <= 1.5x).

    python3 scripts/bench_compile.py [--method ties] [--shape 256 512] [--models 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmerge


def trees(n, shape, T, seed=0):
    rng = np.random.default_rng(seed)
    base = {f"layer{i}": jnp.asarray(rng.normal(size=shape), jnp.float32) for i in range(n)}
    models = [{k: v + 0.01 * jnp.asarray(rng.normal(size=shape), jnp.float32) for k, v in base.items()}
              for _ in range(T)]
    return base, models


def timed(f, repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        runs.append(time.perf_counter() - t0)
    return first, min(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ties")
    ap.add_argument("--shape", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--leaves", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    factory = jmerge.available_methods()[a.method]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, method {a.method}, leaves {tuple(a.shape)} float32, "
          f"{a.models} models")
    print(f"{'leaves':>6}  {'user jit: compile':>17}  {'run':>8}  {'eager: first call':>17}  {'run':>8}")
    compile_times = {}
    for n in a.leaves:
        base, models = trees(n, tuple(a.shape), a.models)
        method = factory()
        f = jax.jit(lambda b, ms: jmerge.merge(method, b, ms))
        t0 = time.perf_counter()
        c = f.lower(base, models).compile()
        tc = time.perf_counter() - t0
        _, tr = timed(lambda: c(base, models), a.repeat)
        jax.clear_caches()
        method = factory()
        e_first, e_run = timed(lambda: jmerge.merge(method, base, models), a.repeat)
        jax.clear_caches()
        compile_times[n] = tc
        print(f"{n:>6}  {tc:>16.2f}s  {tr:>7.3f}s  {e_first:>16.2f}s  {e_run:>7.3f}s")
    if 8 in compile_times and 32 in compile_times:
        print(f"user-jit compile time 32 / 8 leaves: {compile_times[32] / compile_times[8]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
