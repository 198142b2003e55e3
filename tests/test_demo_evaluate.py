"""The digits benchmark's evaluator, frozen heads, splits and the public loader, against NumPy/loop references."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")
pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jmerge  # noqa: E402
from jmerge.demo import model as M  # noqa: E402
from jmerge.demo import per_task_accuracy, task_evaluator  # noqa: E402
from jmerge.demo.tasks import split_indices, split_train_val_test  # noqa: E402

MC = M.ModelConfig(width=16, depth=1, heads=2, temperature=30.0)
T, N = 3, 40
NUM_CLASSES = (10, 2, 3)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    base = M.init_backbone(MC, jax.random.key(seed))
    models = [jax.tree.map(lambda a, t=t: a + 0.05 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), base)
              for t in range(T)]
    x = rng.uniform(size=(T, N, 64)).astype(np.float32)
    y = np.stack([rng.integers(0, c, N) for c in NUM_CLASSES]).astype(np.int32)
    w = rng.standard_normal((T, MC.width, M.MAX_CLASSES)).astype(np.float32)
    heads = {"w": jnp.asarray(w), "b": jnp.asarray(0.1 * rng.standard_normal((T, M.MAX_CLASSES)), jnp.float32)}
    masks = np.stack([M.class_mask(c) for c in NUM_CLASSES])
    splits = {"val": (x, y), "test": (x[:, :20], y[:, :20]), "masks": masks, "tasks": ("a", "b", "c"),
              "num_classes": NUM_CLASSES, "model_config": MC}
    return base, models, heads, splits


def _numpy_accuracy(backbone_for_task, heads, x, y, masks):
    """Per example: features from the model, then the cosine head by its formula in NumPy, arg-max, mean."""
    out = []
    for t in range(x.shape[0]):
        hits = 0
        for i in range(x.shape[1]):
            f = np.asarray(M.features(MC, backbone_for_task(t), jnp.asarray(x[t, i:i + 1])), np.float64)[0]
            f = f / np.sqrt((f * f).sum() + 1e-12)
            lg = MC.temperature * f @ np.asarray(heads["w"][t], np.float64) + np.asarray(heads["b"][t]) + masks[t]
            hits += int(np.argmax(lg) == y[t, i])
        out.append(hits / x.shape[1])
    return np.asarray(out)


def test_evaluator_equals_numpy_loop():
    base, models, heads, splits = _setup()
    x, y = splits["val"]
    ref = _numpy_accuracy(lambda t: models[1], heads, x, y, splits["masks"])
    out = jax.jit(task_evaluator(heads, splits, "val"))(models[1])
    got = np.asarray([out[f"acc_{n}"] for n in splits["tasks"]])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert float(out["accuracy"]) == pytest.approx(ref.mean(), abs=1e-6)
    assert 0.0 < ref.mean() < 1.0  # a real mixture of hits and misses, so the comparison can fail
    # masked classes are never predicted: every prediction of task 1 is 0 or 1
    xt = jnp.asarray(x[1])
    pred = np.argmax(np.asarray(M.logits(MC, base, jax.tree.map(lambda a: a[1], heads), xt, splits["masks"][1])), -1)
    assert set(pred.tolist()) <= {0, 1}


def test_per_task_models_evaluator_reads_task_t_with_model_t():
    base, models, heads, splits = _setup(1)
    x, y = splits["test"]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *models)
    ref = _numpy_accuracy(lambda t: models[t], heads, x, y, splits["masks"])
    out = task_evaluator(heads, splits, "test", per_task_models=True)(stacked)
    np.testing.assert_allclose([float(out[f"acc_{n}"]) for n in splits["tasks"]], ref, atol=1e-6)
    np.testing.assert_allclose(per_task_accuracy(MC, stacked, heads, x, y, splits["masks"], per_task_models=True),
                               ref, atol=1e-6)


def test_sweep_with_the_evaluator_equals_merges_one_by_one():
    from jmerge.sweep import grid, run_sweep
    base, models, heads, splits = _setup(2)
    ev = task_evaluator(heads, splits, "val")
    settings = grid({"scale": [0.2, 0.6, 1.0]})
    res = run_sweep(jmerge.task_arithmetic(), base, models, settings, ev, metric="accuracy", mode="max",
                    progress=False)
    one = [float(ev(jmerge.merge(jmerge.task_arithmetic(scale=s["scale"]), base, models))["accuracy"])
           for s in settings]
    np.testing.assert_allclose([r["metrics"]["accuracy"] for r in res.records], one, atol=1e-6)
    assert res.best["metrics"]["accuracy"] == pytest.approx(max(one), abs=1e-6)


def test_prototype_heads_are_normalised_class_means_of_pretrained_features():
    base, _, _, splits = _setup(3)
    x, y = splits["val"]
    heads = M.prototype_heads(MC, base, x, y, NUM_CLASSES)
    for t, c in [(0, 3), (1, 1), (2, 2)]:
        f = np.asarray(M.features(MC, base, jnp.asarray(x[t][y[t] == c])), np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        mu = f.mean(0)
        np.testing.assert_allclose(np.asarray(heads["w"][t, :, c]), mu / np.linalg.norm(mu), atol=1e-5)
    assert np.all(np.asarray(heads["w"][1, :, 2:]) == 0) and np.all(np.asarray(heads["b"]) == 0)


def test_frozen_head_stays_fixed_while_the_backbone_trains():
    base, _, heads, splits = _setup(4)
    x, y = splits["val"]
    h0 = jax.tree.map(lambda a: a[0], heads)
    p = {"backbone": base, "head": h0}
    out, losses = M.train_loop(MC, p, jnp.asarray(x[0]), jnp.asarray(y[0]), jnp.asarray(splits["masks"][0]),
                               steps=20, batch=8, lr=1e-2, key=jax.random.key(0), train_head=False)
    np.testing.assert_array_equal(np.asarray(out["head"]["w"]), np.asarray(h0["w"]))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["backbone"]), jax.tree.leaves(base)))
    assert moved > 1e-3 and losses[-5:].mean() < losses[:5].mean()


def test_train_val_test_split():
    tr, va, te = split_train_val_test(1797, 0.3, 0.15, seed=0)
    _, te_old = split_indices(1797, 0.3, seed=0)
    np.testing.assert_array_equal(te, te_old)  # the test set did not change
    assert len(va) == 270 and len(tr) + len(va) + len(te) == 1797
    assert not set(tr) & set(va) and not set(tr) & set(te) and not set(va) & set(te)
