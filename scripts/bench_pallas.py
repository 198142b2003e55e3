"""Time ``jmerge.kernels.disjoint_merge`` (election + disjoint mean over explicit masks, a front end of the
fused ``masked_merge`` kernel) against the jax.numpy version on the present device.

Usage: python3 scripts/bench_pallas.py [--n 30000000] [--t 3] [--block-rows 256] [--interpret]
(on CPU the kernel runs in the Pallas interpreter: use a small --n there.) The whole TIES final pass
(thresholds, election, mean, scale, ``base + delta``) with bandwidth as a fraction of the device's peak:
``python3 scripts/bench_kernels.py --fused``.
"""

from __future__ import annotations

import functools

import argparse

import jax
import jax.numpy as jnp
from _timing import best_time  # noqa: E402 - scripts/ is on sys.path when run as a script


_best = functools.partial(best_time, repeat=5)


def main(argv=None):
    from jmerge.kernels import disjoint_merge, disjoint_merge_reference

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=30_000_000)
    p.add_argument("--t", type=int, default=3)
    p.add_argument("--block-rows", type=int, default=256)
    p.add_argument("--interpret", action="store_true")
    a = p.parse_args(argv)
    interpret = True if a.interpret else None
    k1, k2 = jax.random.split(jax.random.key(0))
    tau = jax.random.normal(k1, (a.t, a.n), jnp.float32)
    keep = jax.random.uniform(k2, (a.t, a.n)) < 0.2
    w = jnp.ones((a.t,), jnp.float32)
    fk = jax.jit(lambda t, k, w: disjoint_merge(t, k, w, block_rows=a.block_rows, interpret=interpret))
    fr = jax.jit(disjoint_merge_reference)
    err = float(jnp.max(jnp.abs(fk(tau, keep, w) - fr(tau, keep, w))))
    tk, tr = _best(fk, tau, keep, w), _best(fr, tau, keep, w)
    gb = (a.t * a.n * 5 + a.n * 4) / 1e9
    print(f"device={jax.devices()[0]} T={a.t} N={a.n} max|diff|={err:.3g}")
    print(f"pallas kernel : {tk * 1e3:9.3f} ms  ({gb / tk:7.1f} GB/s)")
    print(f"jnp reference : {tr * 1e3:9.3f} ms  ({gb / tr:7.1f} GB/s)   speedup {tr / tk:5.2f}x")


if __name__ == "__main__":
    main()
