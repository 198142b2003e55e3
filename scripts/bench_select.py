"""Time exact top-k masks against a task-arithmetic-like pass on (T, N) float32.

Usage: python3 scripts/bench_select.py [--n 30000000] [--t 3] [--density 0.2] [--repeat 3]
"""

from __future__ import annotations

import functools

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import best_time  # noqa: E402 - scripts/ is on sys.path when run as a script


_best = functools.partial(best_time, repeat=3)


def main(argv=None):
    from jmerge.core.select import density_to_k, topk_mask_rows

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=30_000_000, help="elements per task vector")
    p.add_argument("--t", type=int, default=3, help="number of task vectors")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dist", choices=["normal", "bf16", "ties"], default="normal")
    a = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.t, a.n), dtype=np.float32)
    if a.dist == "bf16":
        x = x.astype(jnp.bfloat16).astype(np.float32)
    elif a.dist == "ties":
        x = np.round(x * 8) / 8
    x = jax.device_put(x)

    ta = jax.jit(lambda tau: tau.sum(0) * 0.3)
    topk = jax.jit(lambda tau, k: topk_mask_rows(jnp.abs(tau), k))
    ties_like = jax.jit(lambda tau, k: _ties(tau, topk_mask_rows(jnp.abs(tau), k)))
    k = jnp.full((a.t,), density_to_k(a.density, a.n))

    t_ta = _best(ta, x, repeat=a.repeat)
    t_topk = _best(topk, x, k, repeat=a.repeat)
    t_ties = _best(ties_like, x, k, repeat=a.repeat)
    print(f"device={jax.devices()[0].platform} T={a.t} N={a.n} density={a.density} dist={a.dist}")
    print(f"task arithmetic pass : {t_ta:8.3f} s")
    print(f"topk_mask_rows       : {t_topk:8.3f} s   ratio {t_topk / t_ta:5.2f}x")
    print(f"TIES (trim+elect+mean): {t_ties:8.3f} s   ratio {t_ties / t_ta:5.2f}x")


def _ties(tau, keep):
    t = jnp.where(keep, tau, 0.0)
    sign = jnp.sign(t.sum(0))
    agree = (jnp.sign(t) == sign) & keep & (t != 0)
    cnt = agree.sum(0)
    return jnp.where(cnt > 0, jnp.where(agree, t, 0).sum(0) / jnp.maximum(cnt, 1), 0.0)


if __name__ == "__main__":
    main()
