"""The settings-axis layouts of a sweep (jmerge.sweep.SettingsProgram ``vmap_width``): one vmap over the batch,
a lax.map over groups of vmapped settings, one setting at a time — each equals one-by-one merges; the program
is traced and compiled once and reports its trace/compile/run seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
import jmerge.sweep as sw
from jmerge import MergeInputError


def _trees(T=3, seed=21):
    rng = np.random.default_rng(seed)
    base = {"a": rng.normal(size=(40, 24)).astype(np.float32), "b": rng.normal(size=(24,)).astype(np.float32),
            "c": rng.normal(size=(3, 7, 5)).astype(np.float32)}
    models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)]
    return base, models


def _np_norms(merged):  # the evaluation, recomputed in float64 NumPy on one-by-one merges
    return {"l1": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(merged))),
            "first": float(np.asarray(merged["a"], np.float64)[0, 0])}


@pytest.mark.parametrize("width", [None, 1, 3])
def test_layouts_equal_one_by_one(width):
    base, models = _trees()
    settings = sw.grid({"density": [0.15, 0.5, 0.85], "scale": [0.4, 1.1]})
    traces = {"n": 0}

    def ev(m):
        traces["n"] += 1
        return {"l1": sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(m)), "first": m["a"][0, 0]}
    res = sw.run_sweep(jmerge.ties(), base, models, settings, ev, metric="l1", vmap_width=width, batch_size=4,
                       progress=False)
    assert traces["n"] == 1  # 2 calls of 4 (padded) settings: one trace
    assert set(res.timings) == {"trace_s", "compile_s", "run_s"} and res.timings["compile_s"] > 0
    for rec, s in zip(res.records, settings):
        ref = _np_norms(jmerge.merge(jmerge.ties(), base, models, hparams=s))
        np.testing.assert_allclose(rec["metrics"]["l1"], ref["l1"], rtol=1e-5)
        np.testing.assert_allclose(rec["metrics"]["first"], ref["first"], rtol=1e-5, atol=1e-6)
    assert len({round(r["metrics"]["l1"], 2) for r in res.records}) == 6


def test_bad_vmap_width():
    base, models = _trees()
    with pytest.raises(MergeInputError, match="vmap_width"):
        sw.run_sweep(jmerge.ties(), base, models, sw.grid({"density": [0.5]}), lambda m: m["b"][0], vmap_width=0,
                     progress=False)
