"""Twin-Merging (jmerge.dynamic.twin) and the shared routers (jmerge.dynamic.router).

References are independent: the fine-tuned models' own outputs (one-hot routing at full rank must give
them back), NumPy SVDs of the exclusive matrices written out by hand per layout (Eckart–Young residuals),
a hand count of the stored entries, and separable clusters for the router.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.core.errors import MergeInputError
from jmerge.dynamic.router import (check_num_tasks, init_router, one_hot_weights, router_logits, softmax_weights,
                                   top_k_weights, train_router)
from jmerge.dynamic.twin import twin_apply, twin_forward, twin_merge

T = 3


class TinyViT(nn.Module):
    """Conv patch embedding, attention (DenseGeneral q/k/v/out kernels), MLP, LayerNorm, pooled head."""

    @nn.compact
    def __call__(self, x):  # (N, 4, 4, 1)
        h = nn.Conv(8, (2, 2), strides=(2, 2), name="patch")(x).reshape(x.shape[0], 4, 8)
        y = nn.LayerNorm(name="ln")(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(y, y)
        h = h + nn.Dense(8, name="fc2")(nn.gelu(nn.Dense(12, name="fc1")(h)))
        return nn.Dense(5, name="head")(h.mean(axis=1))


MODEL = TinyViT()


def apply_fn(p, x):
    return MODEL.apply({"params": p}, x)


@pytest.fixture(scope="module")
def setup():
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
    base = MODEL.init(key, x)["params"]
    models = []
    for t in range(T):
        k = jax.random.fold_in(jax.random.key(2), t)
        leaves, td = jax.tree.flatten(base)
        ks = jax.random.split(k, len(leaves))
        models.append(td.unflatten([a + 0.3 * jax.random.normal(kk, a.shape) for a, kk in zip(leaves, ks)]))
    return base, models, x


def _flat(tree):
    from flax.traverse_util import flatten_dict
    return {".".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


@pytest.mark.parametrize("shared", ["task_arithmetic", "ties"])
def test_full_rank_one_hot_reproduces_each_model(setup, shared):
    base, models, x = setup
    twin = twin_merge(base, models, shared=shared)
    for t in range(T):
        got = twin_apply(apply_fn, twin, x, one_hot_weights(t, T))
        want = apply_fn(models[t], x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
        # per input, each row routed to a different task
    rows = jnp.asarray([t % T for t in range(x.shape[0])])
    got = twin_apply(apply_fn, twin, x, jax.nn.one_hot(rows, T), per_input=True)
    for i in range(x.shape[0]):
        want = apply_fn(models[int(rows[i])], x[i:i + 1])[0]
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=2e-5, rtol=1e-5)


def _matrix(path, a):
    """The fan-in x fan-out matrix of a leaf, written out per Flax layout (independent of MatrixView)."""
    if path.endswith("patch.kernel"):  # (kh, kw, in, out)
        return [a.reshape(-1, a.shape[-1])]
    if path.endswith(("query.kernel", "key.kernel", "value.kernel")):  # (in, heads, head_dim)
        return [a.reshape(a.shape[0], -1)]
    if path.endswith("out.kernel"):  # (heads, head_dim, out)
        return [a.reshape(-1, a.shape[-1])]
    return [a]


def test_truncated_error_is_eckart_young(setup):
    base, models, _ = setup
    rank = 2
    twin = twin_merge(base, models, shared="task_arithmetic", rank=rank)
    fb = _flat(base)
    fms = [_flat(m) for m in models]
    shared = {p: fb[p] + sum(fm[p] - fb[p] for fm in fms) for p in fb}  # task arithmetic, scale 1
    residual = {inf.path: r for inf, r in zip(twin.info, twin.residual)}
    checked = 0
    for t in range(T):
        got = _flat(twin.params(one_hot_weights(t, T)))
        for p in fb:
            if p.endswith("kernel"):
                v = _matrix(p, fms[t][p] - shared[p])[0]
                s = np.linalg.svd(v.astype(np.float64), compute_uv=False)
                bound = float(np.sqrt(np.sum(s[rank:] ** 2)))
                err = float(np.linalg.norm(_matrix(p, got[p] - fms[t][p])[0]))
                assert bound > 1e-2, p  # truncation really drops something
                np.testing.assert_allclose(err, bound, rtol=1e-3, atol=1e-4, err_msg=p)
                np.testing.assert_allclose(float(np.asarray(residual[p])[t, 0]), bound, rtol=1e-3, err_msg=p)
                checked += 1
            else:  # biases, norm scales: kept dense, exact
                np.testing.assert_allclose(got[p], fms[t][p], atol=2e-6, err_msg=p)
    assert checked == T * 8  # patch, query, key, value, out, fc1, fc2, head


def test_energy_rank_keeps_fraction(setup):
    base, models, _ = setup
    twin = twin_merge(base, models, energy=0.9)
    for inf, ex in zip(twin.info, twin.exclusive):
        if inf.kind != "lowrank":
            continue
        u, s, vt = (np.asarray(a) for a in ex)
        kept = (s ** 2).sum(-1)
        r = (s > 0).sum(-1)
        assert np.all(r >= 1)
        # every matrix keeps >= 90% of its energy: kept / (kept + dropped^2)
        dropped = np.asarray(twin.residual[twin.info.index(inf)]) ** 2
        assert np.all(kept / (kept + dropped) >= 0.9 - 1e-6), inf.path
        # and one fewer singular value would not: the smallest kept sigma matters
        smallest = np.take_along_axis(s, (r - 1)[..., None], -1)[..., 0] ** 2
        assert np.all((kept - smallest) / (kept + dropped) < 0.9 + 1e-6), inf.path


def test_storage_hand_count(setup):
    base, models, _ = setup
    r = 2
    twin = twin_merge(base, models, rank=r)
    st = twin.storage()
    fb = _flat(base)
    n_model = sum(a.size for a in fb.values())
    fac = dense = 0
    for p, a in fb.items():
        if p.endswith("kernel"):
            m, n = _matrix(p, a)[0].shape
            fac += T * (m * r + r + r * n)
        else:
            dense += T * a.size
    assert st["model_params"] == n_model
    assert st["factor_params"] == fac
    assert st["dense_params"] == dense
    assert st["total_params"] == n_model + fac + dense
    assert st["full_models_params"] == T * n_model
    assert st["ratio"] == pytest.approx(T * n_model / (n_model + fac + dense))
    assert st["total_bytes"] == 4 * (n_model + fac + dense)
    shared_only = twin_merge(base, models, rank=r, vectors="shared").storage()
    assert shared_only["dense_params"] == 0 and shared_only["total_params"] == n_model + fac


def test_jit_traced_weights_and_vectors_shared(setup):
    base, models, x = setup
    twin = twin_merge(base, models, rank=3)
    w = jnp.asarray([0.2, 0.5, 0.3])
    eager = twin_apply(apply_fn, twin, x, w)
    jitted = jax.jit(lambda tw, w: twin_apply(apply_fn, tw, x, w))(twin, w)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
    # batch mode averages per-input weights
    wb = jax.nn.softmax(jax.random.normal(jax.random.key(3), (x.shape[0], T)))
    np.testing.assert_allclose(np.asarray(twin_apply(apply_fn, twin, x, wb)),
                               np.asarray(twin_apply(apply_fn, twin, x, wb.mean(0))), atol=1e-6)
    # vectors="shared": non-matrix leaves are the shared model's
    tw2 = twin_merge(base, models, rank=3, vectors="shared")
    got = _flat(tw2.params(one_hot_weights(0, T)))
    sh = _flat(tw2.shared)
    for p in got:
        if not p.endswith("kernel"):
            np.testing.assert_array_equal(got[p], sh[p])


def _clusters(n_per, T, F=6, seed=0):
    centers = np.random.default_rng(seed).normal(size=(T, F)) * 4.0
    y = np.repeat(np.arange(T), n_per)
    x = centers[y] + np.random.default_rng(seed + 100).normal(size=(len(y), F))
    return x.astype(np.float32), y


def test_router_trains_on_separable_inputs():
    x, y = _clusters(40, T)
    centers = np.random.default_rng(0).normal(size=(T, 6)) * 4.0  # the same centers as _clusters(seed=0)
    yv = np.repeat(np.arange(T), 20)
    xv = (centers[yv] + np.random.default_rng(5).normal(size=(len(yv), 6))).astype(np.float32)
    fit = train_router(x, y, T, steps=200, lr=1e-2, seed=0, val_features=xv, val_labels=yv)
    assert fit.losses[-1] < 0.2 * fit.losses[0]
    assert fit.losses[0] == pytest.approx(np.log(T), rel=1e-3)  # zero last layer: uniform start
    assert fit.train_accuracy == 1.0 and fit.val_accuracy == 1.0
    w = softmax_weights(router_logits(fit.params, xv))
    assert np.all(np.argmax(np.asarray(w), -1) == yv)


def test_twin_forward_routes_to_the_right_model(setup):
    base, models, x = setup
    twin = twin_merge(base, models)
    # features: which task's "signature" the input carries; inputs of task t are x + 3*t
    xs = jnp.concatenate([x + 3.0 * t for t in range(T)])
    labels = np.repeat(np.arange(T), x.shape[0])
    feats_fn = lambda shared, xb: xb.reshape(xb.shape[0], -1).mean(-1, keepdims=True)  # noqa: E731
    fit = train_router(feats_fn(twin.shared, xs), labels, T, hidden=(16,), steps=300, lr=3e-2)
    assert fit.train_accuracy == 1.0
    f = jax.jit(twin_forward(apply_fn, feats_fn, per_input=True))
    out = f(twin, fit.params, xs, 0.05)  # sharp softmax: close to one-hot
    for t in range(T):
        want = apply_fn(models[t], xs[t * x.shape[0]:(t + 1) * x.shape[0]])
        np.testing.assert_allclose(np.asarray(out[t * x.shape[0]:(t + 1) * x.shape[0]]), np.asarray(want),
                                   atol=1e-3)


def test_top_k_weights():
    lg = jnp.asarray([[1.0, 3.0, 2.0, 0.0]])
    w = np.asarray(top_k_weights(lg, 2))
    p = np.exp([1.0, 3.0, 2.0, 0.0])
    want = np.array([0, p[1], p[2], 0]) / (p[1] + p[2])
    np.testing.assert_allclose(w[0], want, rtol=1e-6)
    with pytest.raises(MergeInputError, match="top_k"):
        top_k_weights(lg, 5)


def test_bad_inputs(setup):
    base, models, _ = setup
    with pytest.raises(MergeInputError, match="at least one task"):
        check_num_tasks(0)
    with pytest.raises(MergeInputError, match="at least one task"):
        init_router(jax.random.key(0), 4, 0)
    with pytest.raises(MergeInputError, match="at least one task"):
        train_router(np.zeros((3, 2), np.float32), np.zeros(3, np.int32), 0)
    with pytest.raises(MergeInputError, match="at least one task"):
        twin_merge(base, [])
    with pytest.raises(MergeInputError, match=r"\[0, 3\)"):
        train_router(np.zeros((3, 2), np.float32), np.array([0, 1, 3]), 3)
    with pytest.raises(MergeInputError, match=r"leaf 'patch\.kernel'.*rank 5 is larger than the matrix allows \(min\(fan_in, fan_out\) = 4"
                       ):
        twin_merge(base, models, rank=5)
    bad = dict(models[1])
    bad["extra"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(MergeInputError, match=r"extra\.kernel"):
        twin_merge(base, [models[0], bad])
    wrong = jax.tree.map(lambda a: a, models[1])
    wrong["fc1"] = {"kernel": jnp.zeros((9, 12)), "bias": wrong["fc1"]["bias"]}
    with pytest.raises(MergeInputError, match=r"fc1\.kernel"):
        twin_merge(base, [models[0], wrong])
    with pytest.raises(MergeInputError, match="rank or energy"):
        twin_merge(base, models, rank=2, energy=0.5)
    twin = twin_merge(base, models, rank=2)
    with pytest.raises(MergeInputError, match=r"\(T,\) or \(N, T\) with T = 3"):
        twin_apply(apply_fn, twin, jnp.zeros((1, 4, 4, 1)), jnp.ones((2,)))


def test_whole_twin_merge_jits_with_traced_shared_hparams(setup):
    base, models, x = setup
    w = jnp.asarray([0.6, 0.1, 0.3])

    def run(scale):
        tw = twin_merge(base, models, shared_hparams={"scale": scale}, rank=2)
        return twin_apply(apply_fn, tw, x, w)

    got = jax.jit(run)(jnp.float32(0.4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(run(0.4)), atol=1e-4)
    # the shared scale changes the shared model and, through v_t = θ_t − θ*, the truncated parts
    assert not np.allclose(np.asarray(jax.jit(run)(jnp.float32(0.9))), np.asarray(got), atol=1e-4)
