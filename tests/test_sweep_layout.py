"""The settings-axis layouts of a sweep (jmerge.sweep.SettingsProgram ``vmap_width``): one vmap over the batch,
a lax.map over groups of vmapped settings, one setting at a time, vmapped merges with one-at-a-time evaluations
— each equals one-by-one merges; the program is traced and compiled once and reports its trace/compile/run
seconds; the ``"merge"`` layout sorts each leaf's task-vector magnitudes once per call, outside the loop."""

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


@pytest.mark.parametrize("width", [None, 1, 3, "merge"])
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


def _sorts(jaxpr, in_loop=False, out=None):
    """(in a loop?) for every sort in a jaxpr, nested jaxprs included (scan/while bodies count as loops)."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sort":
            out.append(in_loop)
        loop = in_loop or eqn.primitive.name in ("scan", "while")
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _sorts(inner, loop, out)
    return out


@pytest.mark.parametrize("width,looped", [("merge", False), (1, True)])
def test_merge_layout_sorts_once(width, looped):
    # TIES thresholds index one sort of each leaf's magnitudes (rows up to the sweep's whole-sort limit): the
    # density only picks the index. With the merges vmapped the sorts are unbatched, outside the settings loop;
    # one setting at a time sorts inside it (once per setting).
    from jmerge.sweep.execute import SettingsProgram, stack_settings
    base, models = _trees()
    st = stack_settings(sw.grid({"density": [0.2, 0.5, 0.8], "scale": [0.5, 1.0]}))
    prog = SettingsProgram(jmerge.ties(), lambda m: m["a"][0, 0], vmap_width=width)
    jaxpr = jax.make_jaxpr(prog._fn(st, False))(jnp.asarray(st.values), base, models, None)
    where = _sorts(jaxpr.jaxpr)
    assert where and all(w == looped for w in where), where


def test_auto_falls_back_over_budget(monkeypatch):
    import jmerge.sweep.execute as ex
    base, models = _trees()
    settings = sw.grid({"density": [0.3, 0.7], "scale": [0.6, 1.2]})
    monkeypatch.setattr(ex, "MERGE_BATCH_BYTES", 0)  # nothing fits: one setting at a time
    st = ex.stack_settings(settings)
    prog = ex.SettingsProgram(jmerge.ties(), lambda m: m["a"][0, 0])
    where = _sorts(jax.make_jaxpr(prog._fn(st, False))(jnp.asarray(st.values), base, models, None).jaxpr)
    assert where and all(where), where
    res = sw.run_sweep(jmerge.ties(), base, models, settings, lambda m: jnp.sum(jnp.abs(m["a"])), progress=False)
    for rec, s in zip(res.records, settings):
        ref = float(np.abs(np.asarray(jmerge.merge(jmerge.ties(), base, models, hparams=s)["a"], np.float64)).sum())
        np.testing.assert_allclose(rec["metrics"]["metric"], ref, rtol=1e-5)
