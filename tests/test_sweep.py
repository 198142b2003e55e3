"""Sweeps (jmerge.sweep, `jmerge sweep`): batched results equal one-by-one merges, one compile for all
settings, 8 devices equal one, resume equals uninterrupted, best.yml merges to the scored model, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
import jmerge.sweep as sw
from jmerge import MergeInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trees(T=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {"enc": {"w": rng.normal(size=(12, 6)).astype(np.float32)}, "b": rng.normal(size=(6,)).astype(np.float32)}
    models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)]
    target = jax.tree.map(lambda x: x + 0.25, base)
    return base, models, target


def _sq(merged, target):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(target)))


def _np_sq(merged, target):
    return float(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                     for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(target))))


def test_task_arithmetic_sweep_equals_closed_form():
    base, models, target = _trees()
    settings = sw.grid({"scale": [0.1, 0.4, 0.8]})
    res = sw.run_sweep(jmerge.task_arithmetic(), base, models, settings, lambda m: _sq(m, target), progress=False)
    for rec, s in zip(res.records, settings):
        ref = jax.tree.map(lambda b, *ms: b + s["scale"] * sum(np.float64(m) - b for m in ms), base, *models)
        assert rec["status"] == "ok"
        np.testing.assert_allclose(rec["metrics"]["metric"], _np_sq(ref, target), rtol=1e-5)
    vals = [r["metrics"]["metric"] for r in res.records]
    assert res.best["index"] == int(np.argmin(vals)) and len(set(vals)) == 3


def test_ties_sweep_equals_one_by_one_and_compiles_once():
    base, models, target = _trees(seed=1)
    calls = {"n": 0}

    def ev(m):
        calls["n"] += 1  # runs once per trace
        return {"sq": _sq(m, target), "norm": sum(jnp.sum(x ** 2) for x in jax.tree.leaves(m))}
    settings = sw.grid({"density": [0.2, 0.5, 0.9], "scale": [0.5, 1.0]})
    res = sw.run_sweep(jmerge.ties(), base, models, settings, ev, metric="sq", batch_size=2, progress=False)
    assert calls["n"] == 1  # 3 calls of 2 settings: one trace, one compile
    for rec, s in zip(res.records, settings):
        one = jmerge.merge(jmerge.ties(), base, models, hparams=s)
        np.testing.assert_allclose(rec["metrics"]["sq"], _np_sq(one, target), rtol=1e-5)
    assert len({round(r["metrics"]["sq"], 3) for r in res.records}) == 6


def test_per_model_values_and_data_batches():
    base, models, target = _trees(T=2, seed=2)
    data = {"shift": np.array([0.0, 0.5, 1.0], np.float32)}
    settings = [{"weight": jmerge.PerModel([1.0, 0.0])}, {"weight": jmerge.PerModel([0.3, 0.7])}]

    def ev(m, b):
        return _sq(m, jax.tree.map(lambda t: t + b["shift"], target))
    res = sw.run_sweep(jmerge.task_arithmetic(), base, models, settings, ev, data=data, progress=False)
    for rec, s in zip(res.records, settings):
        one = jmerge.merge(jmerge.task_arithmetic(), base, models, hparams=s)
        ref = np.mean([_np_sq(one, jax.tree.map(lambda t: t + sh, target)) for sh in (0.0, 0.5, 1.0)])
        np.testing.assert_allclose(rec["metrics"]["metric"], ref, rtol=1e-5)
        assert rec["params"]["weight"] == {"per_model": list(s["weight"].specs)}


def test_successive_halving_keeps_the_best():
    base, models, target = _trees(seed=3)
    data = {"shift": np.linspace(0, 0.2, 8).astype(np.float32)}
    settings = sw.grid({"scale": [0.05, 0.2, 0.4, 0.6, 0.8, 1.0]})

    def ev(m, b):
        return _sq(m, jax.tree.map(lambda t: t + b["shift"], target))
    full = sw.run_sweep(jmerge.task_arithmetic(), base, models, settings, ev, data=data, progress=False)
    sh = sw.run_sweep(jmerge.task_arithmetic(), base, models, sw.SuccessiveHalving(settings, eta=2, min_budget=2),
                      ev, data=data, progress=False)
    assert [r["budget"] for r in sh.all_records if r["index"] == sh.best["index"]] == [2, 4, 8]
    assert sh.best["index"] == full.best["index"]
    assert sum(r["budget"] == 8 for r in sh.all_records) == 2  # 6 -> 3 -> 2 survivors
    np.testing.assert_allclose(sh.best["metrics"]["metric"], full.best["metrics"]["metric"], rtol=1e-6)


def test_resumed_equals_uninterrupted_and_other_config_refused(tmp_path):
    base, models, target = _trees(seed=4)
    settings = sw.grid({"density": [0.3, 0.6], "scale": [0.5, 0.8, 1.0]})
    ev = lambda m: _sq(m, target)  # noqa: E731
    ref = sw.run_sweep(jmerge.ties(), base, models, settings, ev, out_dir=str(tmp_path / "a"), progress=False)
    d = tmp_path / "b"
    sw.run_sweep(jmerge.ties(), base, models, settings, ev, out_dir=str(d), progress=False)
    lines = (d / "results.jsonl").read_text().splitlines()
    (d / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed mid-write
    res = sw.run_sweep(jmerge.ties(), base, models, settings, ev, out_dir=str(d), progress=False)
    assert res.evaluated == 4
    assert [r["metrics"] for r in res.records] == [r["metrics"] for r in ref.records]
    again = sw.run_sweep(jmerge.ties(), base, models, settings, ev, out_dir=str(d), progress=False)
    assert again.evaluated == 0
    for f in ("results.csv", "results.json", "best.json"):
        assert (d / f).exists()
    with pytest.raises(sw.SweepDirError, match="another config"):
        sw.run_sweep(jmerge.ties(), base, models, settings[:3], ev, out_dir=str(d), progress=False)
    body = json.loads((d / "results.json").read_text())
    assert body["best"] == ref.best["index"] and len(body["results"]) == 6


def test_out_of_range_fails_before_start_and_nan_marks_failed():
    base, models, target = _trees(seed=5)
    calls = {"n": 0}

    def ev(m):
        calls["n"] += 1
        return _sq(m, target)
    with pytest.raises(MergeInputError, match=r"setting 1 .*'density'.*outside"):
        sw.run_sweep(jmerge.ties(), base, models, sw.grid({"density": [0.5, 1.5]}), ev, progress=False)
    with pytest.raises(MergeInputError, match="no hyperparameter 'densty'"):
        sw.run_sweep(jmerge.ties(), base, models, sw.grid({"densty": [0.5]}), ev, progress=False)
    assert calls["n"] == 0

    def nan_ev(m):
        v = _sq(m, target)
        return jnp.where(jnp.sum(m["b"]) > -1e9, v, 0.0) * jnp.where(jnp.abs(m["b"][0] - base["b"][0]) > 1e-3 * 0,
                                                                     1.0, 1.0) + 0.0
    res = sw.run_sweep(jmerge.task_arithmetic(), base, models, sw.grid({"scale": [0.0, 0.5, 1.0]}),
                       lambda m: jnp.where(jnp.allclose(m["b"], base["b"]), jnp.nan, _sq(m, target)), progress=False)
    assert [r["status"] for r in res.records] == ["failed", "ok", "ok"]
    assert "non-finite" in res.records[0]["error"] and res.best["index"] in (1, 2)


_SHARDED = r"""
import os, json, numpy as np, jax, jax.numpy as jnp, jmerge, jmerge.sweep as sw
assert len(jax.devices()) == int(os.environ["NDEV"]), jax.devices()
rng = np.random.default_rng(7)
base = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=(8,)).astype(np.float32)}
models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(3)]
ev = lambda m: sum(jnp.sum((x - 0.1) ** 2) for x in jax.tree.leaves(m))
res = sw.run_sweep(jmerge.ties(), base, models, sw.random_search({"density": sw.uniform(0.1, 0.9),
                   "scale": sw.log_uniform(0.3, 1.0)}, n=10, seed=1), ev, progress=False)
print("RESULT" + json.dumps([r["metrics"]["metric"] for r in res.records]))
"""


def _run_devices(n):
    env = dict(os.environ, NDEV=str(n), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if n > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    r = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[6:])


def test_eight_devices_equal_one():
    one, eight = _run_devices(1), _run_devices(8)
    np.testing.assert_allclose(eight, one, rtol=1e-6)
    assert len(set(one)) == 10


# ---------------------------------------------------------------- jmerge sweep CONFIG

_LLAMA = os.path.join(ROOT, "tests", "data", "arch", "llama")
_DOCS = os.path.join(ROOT, "tests", "data", "eval", "docs.txt")


def _config(tmp_path, sweep_block: str, name="s.yml"):
    p = tmp_path / name
    p.write_text(f"""models:
- model: {_LLAMA}/ft1
  parameters: {{density: 0.5, weight: 1.0}}
- model: {_LLAMA}/ft2
  parameters: {{density: 0.5, weight: 0.7}}
merge_method: ties
base_model: {_LLAMA}/base
dtype: float32
{sweep_block}""")
    return str(p)


def test_cli_sweep_best_yml_merges_to_the_scored_model(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from jmerge.cli import main
    from jmerge.models import load_model, perplexity
    from jmerge.models.text import encode_texts, load_tokenizer, make_batches, read_lines
    cfg = _config(tmp_path, f"""sweep:
  parameters: {{density: [0.3, 0.9], weight: [{{per_model: [1.0, 0.2]}}, {{per_model: [0.2, 1.0]}}]}}
  eval: {{text: {_DOCS}, batch_size: 4, max_length: 64}}
""")
    out = tmp_path / "sw"
    assert main(["sweep", cfg, "--out", str(out)]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert (out / "sweep.png").exists() or "matplotlib" in capsys.readouterr().err
    assert len(rows) == 5 and all(",ok," in r for r in rows[1:])
    best = json.loads((out / "best.json").read_text())
    assert main(["merge", str(out / "best.yml"), str(tmp_path / "merged")]) == 0
    tok = load_tokenizer(f"{_LLAMA}/base")
    batches = make_batches(encode_texts(tok, read_lines(_DOCS), max_length=64), 4, max_length=64)
    r = perplexity(load_model(str(tmp_path / "merged")), batches)
    np.testing.assert_allclose(r.nll, best["metrics"]["loss"], rtol=1e-5)
    assert r.tokens == best["metrics"]["tokens"]
    losses = [json.loads(x)["metrics"]["loss"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(set(np.round(losses, 6))) == 4 and best["metrics"]["loss"] == min(losses)
    assert main(["sweep", cfg, "--out", str(out)]) == 0  # resumed: nothing left to run
    capsys.readouterr()
    other = _config(tmp_path, f"""sweep:
  parameters: {{density: [0.4]}}
  eval: {{text: {_DOCS}}}
""", name="o.yml")
    assert main(["sweep", other, "--out", str(out)]) == 1
    assert "another config" in capsys.readouterr().err


@pytest.mark.parametrize("block, match", [
    ("sweep:\n  parameters: {density: [0.5, 1.5]}\n  eval: {text: DOCS}\n", r"s\.yml:\d+:\d+: sweep: setting 1 .*density.*outside"),
    ("sweep:\n  method: random\n  parameters: {density: {uniform: [0.1, 0.5]}}\n  eval: {text: DOCS}\n", r"s\.yml:10:3: sweep: missing field 'n'"),
    ("sweep:\n  method: grdi\n  parameters: {density: [0.5]}\n  eval: {text: DOCS}\n", r"s\.yml:10:11: sweep\.method: unknown sweep method 'grdi'"),
    ("sweep:\n  parameters: {density: [0.5]}\n  eval: {text: nope.txt}\n", r"s\.yml:11:16: sweep\.eval\.text: no such file"),
    ("sweep:\n  parameters: {density: [0.5]}\n  eval: {text: DOCS}\n  colour: red\n", r"s\.yml:12:3: sweep\.colour: unknown field"),
])
def test_cli_sweep_bad_config_is_located(tmp_path, capsys, block, match):
    from jmerge.cli import main
    cfg = _config(tmp_path, block.replace("DOCS", _DOCS))
    assert main(["sweep", cfg, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()
