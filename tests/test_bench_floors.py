"""The floors of ``scripts/bench_methods.py --floors`` time the work the methods need: DELLA's sort keys, sorted,
give jmerge's own DELLA ranks (ties by position included), so the sort timed there is the one exact ranks need."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.core.rank import difference_ranks

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_methods.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_methods", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_della_sort_floor_sorts_the_keys_of_dellas_ranks():
    bench = _bench()
    k = jax.random.key(3)
    base = {"w": jax.random.normal(k, (70, 1000)), "b": jax.random.normal(jax.random.fold_in(k, 1), (9,))}
    # ties at equal magnitudes (a bfloat16-like lattice), opposite signs, exact zeros and a NaN
    models = []
    for t in range(2):
        m = jax.tree.map(lambda x: jnp.round((x + 0.05 * jax.random.normal(jax.random.fold_in(k, 10 + t), x.shape))
                                             * 64) / 64, base)
        models.append(m)
    models[1]["w"] = models[1]["w"].at[3, 5].set(jnp.nan).at[4].set(base["w"][4])
    blocks = bench.packed_blocks(base, models)
    got = []
    for b in blocks:
        s = np.sort(b, axis=-1)
        pos = (s & 0xFFFFFFFF).astype(np.int64)
        r = np.empty_like(pos)
        np.put_along_axis(r, pos, np.arange(b.shape[1])[None], axis=1)
        got.append(r)
    # blocks are ordered leaf by leaf (the tree's leaf order), model by model, rows in order
    want = []
    for name in sorted(base):  # jax.tree.leaves order of a dict: sorted keys
        ranks = np.asarray(difference_ranks(base[name], [m[name] for m in models], impl="xla"))
        want += [ranks[t].reshape(ranks.shape[1], -1) for t in range(len(models))]
    assert np.array_equal(np.concatenate([g.reshape(-1) for g in got]),
                          np.concatenate([w.reshape(-1) for w in want]))
    assert bench.sort_floor(base, models, 1) > 0
