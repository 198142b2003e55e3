"""The quality benchmark's dynamic rows (Twin-Merging, SMILE, WEMoE): stored bytes, merging rows into results."""

import copy
import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")
pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jmerge.demo import dynamic as D  # noqa: E402
from jmerge.demo import model as M  # noqa: E402
from jmerge.demo.bench import merge_results, storage_entry  # noqa: E402

W, T = 8, 3
MC = M.ModelConfig(width=W, depth=1, heads=2)
# Matrices of the width-8 backbone (fan-in x fan-out), written out by hand from the module definition
KERNELS = {"embed": (4, W), "query": (W, W), "key": (W, W), "value": (W, W), "out": (W, W), "fc1": (W, 2 * W),
           "fc2": (2 * W, W)}
BIASES = {"embed": W, "query": W, "key": W, "value": W, "out": W, "fc1": 2 * W, "fc2": W}
OTHER = {"pos": 16 * W, "ln": 6 * W}  # ln1, ln2, final_ln: scale + bias each
MODEL_ENTRIES = sum(m * n for m, n in KERNELS.values()) + sum(BIASES.values()) + sum(OTHER.values())


def _models():
    keys = jax.random.split(jax.random.key(0), T + 1)
    base = M.init_backbone(MC, keys[0])
    models = [jax.tree.map(lambda a, k=k: a + 0.05 * jax.random.normal(k, a.shape), base) for k in keys[1:]]
    return base, models


def test_model_entry_count_matches_the_module():
    base, _ = _models()
    assert sum(int(np.size(x)) for x in jax.tree.leaves(base)) == MODEL_ENTRIES
    assert D.tree_nbytes(base) == 4 * MODEL_ENTRIES


@pytest.mark.parametrize("rank", [2, 5])
def test_twin_bytes_equal_the_count_of_stored_floats(rank):
    from jmerge.dynamic import twin_merge
    base, models = _models()
    tw = twin_merge(base, models, rank=rank, clamp_rank=True)
    mats = dict(KERNELS, pos=(16, W))  # the position table is a matrix too
    lowrank = sum(T * (m * min(rank, m, n) + min(rank, m, n) + min(rank, m, n) * n) for m, n in mats.values())
    dense = T * (sum(BIASES.values()) + OTHER["ln"])
    assert tw.storage()["total_bytes"] == 4 * (MODEL_ENTRIES + lowrank + dense)


def test_smile_bytes_equal_the_count_of_stored_floats():
    from jmerge.dynamic import smile_upscale
    base, models = _models()
    k, gk = 3, 2
    sm = smile_upscale(base, models, k=k, gate_k=gk, clamp_rank=True)
    extra = sum(T * (m * min(gk, m, n) + m * min(k, m, n) + min(k, m, n) * n + BIASES[name])
                for name, (m, n) in KERNELS.items())
    st = sm.storage()
    assert st["total_bytes"] == 4 * (MODEL_ENTRIES + extra) == 4 * st["total_params"]
    assert st["full_models_bytes"] == 4 * T * MODEL_ENTRIES
    assert st["ratio_bytes"] == pytest.approx(T * MODEL_ENTRIES / (MODEL_ENTRIES + extra))


def test_wemoe_bytes_equal_the_count_of_stored_floats():
    from jmerge.dynamic.wemoe import build_wemoe, vit_mlp_groups
    base, models = _models()
    spec, state = build_wemoe(base, models, vit_mlp_groups(base), scaling=0.3)
    mlp = W * 2 * W + 2 * W + 2 * W * W + W  # fc1 + fc2 with biases
    router = (W * W + W) + (W * T + T)  # hidden + output layer
    from jmerge.dynamic import wemoe_storage
    st = wemoe_storage(spec, state)
    assert st["wemoe_bytes"] == 4 * (MODEL_ENTRIES + T * mlp + router) == 4 * st["wemoe"]
    assert st["full_models_bytes"] == 4 * T * MODEL_ENTRIES


def _row(method, kind, acc, **kw):
    return {"method": method, "kind": kind, "acc": acc, "avg": float(np.mean(acc)), "val": 0.5, "seconds": 1.0,
            "hparams": {}, "settings": None, "normalized": None, **kw}


def test_merge_results_replaces_inserts_and_fills_storage():
    mb = 1000
    old = {"tasks": ["a", "b"], "seed": 0, "from_cache": False, "skipped": {"smile": "old failure", "x": "y"},
           "timings": {"total_s": 100.0, "build_s": 1.0},
           "rows": [_row("zero-shot", "reference", [0.1, 0.2]), _row("individual fine-tuned", "reference", [0.9, 0.9]),
                    _row("ta", "data-free", [0.5, 0.5]), _row("tall", "per-task", [0.8, 0.8]),
                    _row("ada", "learned", [0.6, 0.6])]}
    before = copy.deepcopy(old)
    new = {"tasks": ["a", "b"], "seed": 0, "from_cache": True, "skipped": {"wemoe": "new failure"},
           "timings": {"total_s": 7.0}, "model_bytes": mb,
           "rows": [_row("zero-shot", "reference", [0.1, 0.2], storage=storage_entry(mb, mb, 2)),
                    _row("smile", "dynamic", [0.7, 0.7], storage=storage_entry(3 * mb, mb, 2)),
                    _row("ta", "data-free", [0.55, 0.55], storage=storage_entry(mb, mb, 2))]}
    out = merge_results(old, new)
    assert old == before  # inputs untouched
    assert [r["method"] for r in out["rows"]] == ["zero-shot", "individual fine-tuned", "ta", "tall", "ada", "smile"]
    by = {r["method"]: r for r in out["rows"]}
    assert by["ta"]["acc"] == [0.55, 0.55] and by["ada"]["acc"] == [0.6, 0.6]
    assert by["smile"]["storage"] == {"bytes": 3000, "x_model": 3.0, "x_full": 1.5}
    assert by["individual fine-tuned"]["storage"]["bytes"] == 2 * mb and by["tall"]["storage"]["x_full"] == 1.0
    assert by["ada"]["storage"]["bytes"] == mb
    assert out["skipped"] == {"x": "y", "wemoe": "new failure"}
    assert out["timings"]["total_s"] == 100.0 and out["timings"]["updates"][0]["methods"] == ["smile", "ta"]
    with pytest.raises(ValueError, match="tasks"):
        merge_results(old, {**new, "tasks": ["a", "c"]})
    # rows computed on other models (a reference row scores differently) are refused, nothing merged
    other = copy.deepcopy(new)
    other["rows"][0]["acc"] = [0.1, 0.25]
    with pytest.raises(ValueError, match="models differ.*zero-shot"):
        merge_results(old, other)
    assert old == before


def test_update_merges_dynamic_rows_into_written_results(tmp_path, monkeypatch):
    """Run a static method, then only Twin-Merging with ``update=True``: the static rows are kept, the Twin
    row is added, its storage is the byte count of the chosen model, and its test accuracy is that model's
    (router retrained independently here)."""
    from jmerge.demo import load_benchmark, run_demo
    from jmerge.dynamic import train_router, twin_apply, twin_merge
    from jmerge.dynamic.router import router_logits, softmax_weights
    from tests.test_demo import TINY

    monkeypatch.setattr(D, "TWIN_SHARED", [("ta 0.3", "task_arithmetic", {"scale": 0.3})])
    monkeypatch.setattr(D, "TWIN_RANKS", [1, 3])
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    r1 = run_demo(config=TINY, out_dir=out, cache_dir=cache, methods=["task_arithmetic"], quiet=True)
    r2 = run_demo(config=TINY, out_dir=out, cache_dir=cache, methods=["twin"], quiet=True, update=True)
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    names = [r["method"] for r in saved["rows"]]
    assert names == [r["method"] for r in r1["rows"]] + ["twin_merging"] == [r["method"] for r in r2["rows"]]
    ta_old = next(r for r in r1["rows"] if r["method"] == "task_arithmetic")
    ta_new = next(r for r in saved["rows"] if r["method"] == "task_arithmetic")
    assert ta_new["acc"] == ta_old["acc"] and ta_new["storage"]["x_model"] == 1.0
    ind = next(r for r in saved["rows"] if r["method"] == "individual fine-tuned")
    assert ind["storage"]["x_full"] == 1.0 and ind["storage"]["x_model"] == len(TINY.tasks)
    twin = next(r for r in saved["rows"] if r["method"] == "twin_merging")
    assert twin["kind"] == "dynamic" and twin["settings"] == 2 and twin["hparams"]["rank"] in (1, 3)

    base, finetuned, heads, splits = load_benchmark(TINY, cache_dir=cache)
    nt = len(finetuned)
    tw = twin_merge(base, finetuned, shared="task_arithmetic", shared_hparams={"scale": 0.3},
                    rank=twin["hparams"]["rank"])
    model_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(base))
    stored = model_bytes + sum(np.asarray(a).nbytes for ex in tw.exclusive if ex is not None
                               for a in (ex if isinstance(ex, tuple) else (ex,)))
    assert twin["storage"] == {"bytes": stored, "x_model": stored / model_bytes,
                               "x_full": stored / (nt * model_bytes)}
    mc, masks = splits["model_config"], splits["masks"]
    xtr = np.asarray(splits["train"][0])
    fit = train_router(M.features(mc, tw.shared, jnp.asarray(xtr.reshape(-1, 64))),
                       np.repeat(np.arange(nt), xtr.shape[1]), nt, seed=0, **D.TWIN_ROUTER)
    accs = []
    for t in range(nt):
        x, y = jnp.asarray(splits["test"][0][t]), np.asarray(splits["test"][1][t])
        h = jax.tree.map(lambda a, t=t: a[t], heads)
        w = softmax_weights(router_logits(fit.params, M.features(mc, tw.shared, x)))
        lg = twin_apply(lambda p, xb: M.logits(mc, p, h, xb, masks[t]), tw, x, w, per_input=True)
        accs.append(float(np.mean(np.argmax(np.asarray(lg), -1) == y)))
    assert twin["acc"] == pytest.approx(accs, abs=1.5 / len(y))  # at most one input flips (float order)
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [row["method"] for row in table] == names
    assert int(table[-1]["storage_bytes"]) == stored
    md = open(os.path.join(out, "results.md")).read()
    assert "| twin_merging | dynamic |" in md and "storage (x 1 model)" in md and "merged in from a later run" in md
