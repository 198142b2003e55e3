"""Tests of the digits demo benchmark: task definitions, a tiny end-to-end run, the model cache."""

import csv
import os
import time

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")

from jmerge.demo import DemoConfig, TASKS, run_demo  # noqa: E402
from jmerge.demo import model as M  # noqa: E402
from jmerge.demo.tasks import load_images, split_indices, task_data  # noqa: E402

BY_NAME = {t.name: t for t in TASKS}
DIGITS = np.arange(10)


def _one_pixel(r, c):
    x = np.zeros((1, 8, 8), np.float32)
    x[0, r, c] = 1.0
    return x


def _where(x):
    return tuple(int(i) for i in np.argwhere(x[0] == 1.0)[0])


@pytest.mark.parametrize("name,labels", [
    ("rot90-digit", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ("flip-parity", [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]),
    ("invert-gt4", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("noise-mod3", [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
    ("shift-digit", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ("transpose-prime", [0, 0, 1, 1, 0, 1, 0, 1, 0, 0]),
    ("rot180-quarter", [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),
    ("dim-mod5", [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]),
])
def test_label_functions(name, labels):
    t = BY_NAME[name]
    got = t.label(DIGITS)
    np.testing.assert_array_equal(got, labels)
    assert got.max() < t.num_classes == len(set(labels))


def test_geometric_transforms_move_a_pixel_as_computed_by_hand():
    x = _one_pixel(0, 1)  # row 0, column 1
    assert _where(BY_NAME["rot90-digit"].transform(x)) == (6, 0)  # counter-clockwise quarter turn
    assert _where(BY_NAME["flip-parity"].transform(x)) == (0, 6)
    assert _where(BY_NAME["transpose-prime"].transform(x)) == (1, 0)
    assert _where(BY_NAME["rot180-quarter"].transform(x)) == (7, 6)
    assert _where(BY_NAME["shift-digit"].transform(x)) == (0, 3)
    assert BY_NAME["shift-digit"].transform(_one_pixel(2, 7)).sum() == 0  # shifted out of the image
    for name in ("rot90-digit", "flip-parity", "transpose-prime", "rot180-quarter", "shift-digit"):
        assert BY_NAME[name].transform(x).sum() == 1.0 or name == "shift-digit"


def test_intensity_transforms():
    x = np.random.default_rng(0).uniform(size=(300, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(BY_NAME["invert-gt4"].transform(x), 1.0 - x, rtol=1e-6)
    np.testing.assert_allclose(BY_NAME["dim-mod5"].transform(x), 0.25 + 0.5 * x, rtol=1e-6)
    n1, n2 = BY_NAME["noise-mod3"].transform(x), BY_NAME["noise-mod3"].transform(x)
    np.testing.assert_array_equal(n1, n2)  # deterministic
    assert abs(np.std(n1 - x) - 0.3) < 0.01 and abs(np.mean(n1 - x)) < 0.01


def test_data_and_split():
    images, digits = load_images()
    assert images.shape == (1797, 8, 8) and images.min() == 0.0 and images.max() == 1.0
    tr, te = split_indices(len(images), 0.3, seed=0)
    assert len(te) == 539 and len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    x, y = task_data(BY_NAME["flip-parity"], images[:5], digits[:5])
    assert x.shape == (5, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x.reshape(5, 8, 8), images[:5, :, ::-1])
    np.testing.assert_array_equal(y, digits[:5] % 2)


def test_class_mask():
    m = M.class_mask(3)
    assert m.shape == (M.MAX_CLASSES,) and (m[:3] == 0).all() and (m[3:] < -1e8).all()


TINY = DemoConfig(model=M.ModelConfig(width=16, depth=1, heads=2, temperature=30.0),
                  tasks=("rot90-digit", "noise-mod3"), pretrain_steps=40, pretrain_batch=32, finetune_steps=60,
                  finetune_batch=32, finetune_lr=3e-3, multitask_steps=20, multitask_batch=16, adamerging_steps=5,
                  chunks=1)
ZS = "zero-shot (pretrained backbone, frozen heads)"


def test_tiny_end_to_end_and_cache(tmp_path):
    import jax
    import jmerge
    from jmerge.demo import load_benchmark, task_evaluator
    from jmerge.demo.bench import DEMO_SWEEPS

    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    t0 = time.perf_counter()
    r1 = run_demo(config=TINY, out_dir=out, cache_dir=cache, methods=["task_arithmetic", "linear"], quiet=True)
    t1 = time.perf_counter() - t0
    assert not r1["from_cache"]
    assert len(os.listdir(cache)) == 1
    rows = {r["method"]: r for r in r1["rows"]}
    assert {"task_arithmetic", "linear", "individual fine-tuned", "multi-task trained", ZS} <= set(rows)
    zs, ind = rows[ZS], rows["individual fine-tuned"]
    assert all(i > z for i, z in zip(ind["acc"], zs["acc"])), (ind["acc"], zs["acc"])
    assert ind["normalized"] == pytest.approx(1.0)
    for r in r1["rows"]:
        assert len(r["acc"]) == 2 and 0.0 <= r["avg"] <= 1.0
        assert r["avg"] == pytest.approx(np.mean(r["acc"]))
        if r["normalized"] is not None:
            assert r["normalized"] == pytest.approx(np.mean(np.asarray(r["acc"]) / np.asarray(ind["acc"])))
    # the public loader gives the same models; the chosen task-arithmetic scale is the validation argmax of
    # merges done one by one, and its test row is that merge's test accuracy
    base, finetuned, heads, splits = load_benchmark(TINY, cache_dir=cache)
    assert len(finetuned) == 2 and splits["tasks"] == TINY.tasks and splits["val"][0].shape[:2] == (2, 270)
    val_ev, test_ev = task_evaluator(heads, splits, "val"), task_evaluator(heads, splits, "test")
    assert float(test_ev(base)["accuracy"]) == pytest.approx(zs["avg"], abs=1e-6)
    scales = DEMO_SWEEPS["task_arithmetic"]["scale"]
    vals = [float(val_ev(jmerge.merge(jmerge.task_arithmetic(scale=s), base, finetuned))["accuracy"]) for s in scales]
    ta = rows["task_arithmetic"]
    assert ta["settings"] == len(scales) and ta["val"] == pytest.approx(max(vals), abs=1e-6)
    assert vals[scales.index(ta["hparams"]["scale"])] == pytest.approx(max(vals), abs=1e-6)
    best = jmerge.merge(jmerge.task_arithmetic(scale=ta["hparams"]["scale"]), base, finetuned)
    assert ta["avg"] == pytest.approx(float(test_ev(best)["accuracy"]), abs=1e-6)
    # outputs: CSV rows match the results, Markdown has the table with validation and chosen values
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [row["method"] for row in table] == [r["method"] for r in r1["rows"]]
    assert float(table[1]["rot90-digit"]) == pytest.approx(ind["acc"][0], abs=1e-4)
    md = open(os.path.join(out, "results.md")).read()
    assert "| task_arithmetic | data-free |" in md and "noise-mod3" in md and f"scale={ta['hparams']['scale']:g}" in md
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
    # second run: models come from the cache (no training), same reference accuracies; per-task EMR rows
    t0 = time.perf_counter()
    r2 = run_demo(config=TINY, out_dir=None, cache_dir=cache, methods=["emr"], quiet=True)
    t2 = time.perf_counter() - t0
    assert r2["from_cache"] and t2 < t1
    assert r2["rows"][1]["acc"] == pytest.approx(ind["acc"])
    emr = next(r for r in r2["rows"] if r["kind"] == "per-task")
    per = jmerge.emr_task_models(base, finetuned)  # task t read with its own EMR model
    out_per = task_evaluator(heads, splits, "test", per_task_models=True)(jax.tree.map(lambda *a: np.stack(a), *per))
    assert emr["acc"] == pytest.approx([float(out_per[f"acc_{n}"]) for n in splits["tasks"]], abs=1e-6)
    # unknown method names are reported, not fatal
    r3 = run_demo(config=TINY, out_dir=None, cache_dir=cache, methods=["no_such_method"], quiet=True)
    assert "no_such_method" in r3["skipped"]


def test_cli_hooks():
    import argparse
    from jmerge.demo import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--methods", "ties,task_arithmetic", "--cache-dir", "/x", "--quiet"])
    assert a.methods == "ties,task_arithmetic" and a.cache_dir == "/x" and a.quiet and not a.full
    assert a.out_dir == "jmerge-demo" and a.seed == 0


def test_run_demo_accepts_cli_argv(monkeypatch):
    from jmerge.demo import bench
    seen = {}
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg, **kw: seen.update(cfg=cfg, **kw) or (_ for _ in ()).throw(
        RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        bench.run_demo(["--methods", "ties", "--seed", "3", "--quiet", "--cache-dir", "/c"])
    assert seen["methods"] == ["ties"] and seen["seed"] == 3 and seen["cache_dir"] == "/c"
    assert seen["cfg"] == bench.REDUCED
