"""Tests of the learned merges (jmerge._learned) against independent NumPy references."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import jmerge
from jmerge._tree import MergeInputError


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny two-layer MLP and a two-task linear-softmax problem


def mlp_apply(params, x):
    h = jnp.tanh(x @ params["l1"]["w"].astype(jnp.float32) + params["l1"]["b"].astype(jnp.float32))
    return h @ params["l2"]["w"].astype(jnp.float32) + params["l2"]["b"].astype(jnp.float32)


def mlp_params(rng, d=6, h=5, c=3, dtype=np.float32, scale=1.0):
    return {"l1": {"w": (scale * rng.normal(size=(d, h))).astype(dtype), "b": (scale * rng.normal(size=(h,))).astype(dtype)},
            "l2": {"w": (scale * rng.normal(size=(h, c))).astype(dtype), "b": (scale * rng.normal(size=(c,))).astype(dtype)}}


def np_mlp(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


def np_entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return float(np.mean(-(p * np.log(p)).sum(-1)))


def np_merge(base, models, lam_of_leaf):
    """theta0 + sum_t lam_t tau_t in float64, lam_of_leaf(path) -> (T,)"""
    out = {}
    for k1 in base:
        out[k1] = {}
        for k2 in base[k1]:
            b = np.asarray(base[k1][k2], np.float64)
            lam = lam_of_leaf(f"{k1}.{k2}")
            out[k1][k2] = b + sum(l * (np.asarray(m[k1][k2], np.float64) - b) for l, m in zip(lam, models))
    return out


def two_task_problem(seed=0, n=64, d=8, k=6, c=4):
    """Shared encoder W (d, k) + bias, a fixed head per task (as in the CLIP benchmarks).

    Task t's inputs live in its own 4 input dimensions; its task vector is a classifier for them
    plus interference (noise) on the other task's rows. The base encoder is noise.
    """
    rng = np.random.default_rng(seed)
    base = {"enc": {"w": (0.2 * rng.normal(size=(d, k))).astype(np.float32), "b": np.zeros((k,), np.float32)}}
    heads = [rng.normal(size=(k, c)).astype(np.float32) for _ in range(2)]
    models, xs, ys = [], [], []
    for t in range(2):
        rows = np.arange(4 * t, 4 * t + 4)
        means = np.zeros((c, d))
        means[:, rows] = 3.0 * rng.normal(size=(c, 4))
        y = rng.integers(0, c, size=n)
        x = means[y] + 0.4 * rng.normal(size=(n, d))
        x[:, np.setdiff1d(np.arange(d), rows)] = 0.0
        target = 8.0 * np.eye(c)[y] - 2.0
        w_ideal = np.linalg.pinv(x) @ target @ np.linalg.pinv(heads[t])
        tau = np.zeros((d, k))
        tau[rows] = w_ideal[rows]
        other = np.setdiff1d(np.arange(d), rows)
        tau[other] = 0.1 * rng.normal(size=(len(other), k))
        models.append({"enc": {"w": (base["enc"]["w"] + tau).astype(np.float32),
                               "b": (0.02 * rng.normal(size=(k,))).astype(np.float32)}})
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.int32))
    return base, models, xs, ys, heads


def head_fns(heads):
    return [lambda p, x, h=h: (x @ p["enc"]["w"] + p["enc"]["b"]) @ h for h in heads]


def accuracy(params, fns, xs, ys):
    return float(np.mean([np.mean(np.argmax(np.asarray(f(params, x)), -1) == y) for f, x, y in zip(fns, xs, ys)]))


# ------------------------------------------------------------------------------------------------
# AdaMerging


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_adamerging_zero_steps_is_task_arithmetic(dtype):
    rng = np.random.default_rng(1)
    base = mlp_params(rng, dtype=dtype)
    models = [mlp_params(rng, dtype=dtype) for _ in range(3)]
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3)]
    init = np.array([0.2, 0.5, 0.7], np.float32)
    res = jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=0, init=init, granularity="task")
    ref = np_merge(base, models, lambda p: init)
    for k1 in ref:
        for k2 in ref[k1]:
            got = res.params[k1][k2]
            assert got.dtype == jnp.dtype(dtype)
            want = np.asarray(jnp.asarray(ref[k1][k2].astype(np.float32)).astype(dtype), np.float32)
            np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-6 if dtype == np.float32 else 1e-2,
                                       atol=1e-6 if dtype == np.float32 else 1e-2)
    np.testing.assert_allclose(res.coefficients, init)
    assert res.losses.shape == (0,)


def test_adamerging_gradient_matches_finite_differences():
    """One SGD step of size lr moves lambda by -lr * d(entropy)/d(lambda); compare with central FD in NumPy."""
    rng = np.random.default_rng(2)
    base = mlp_params(rng)
    models = [mlp_params(rng) for _ in range(2)]
    xs = [rng.normal(size=(5, 6)).astype(np.float32) for _ in range(2)]
    init = rng.uniform(0.2, 0.8, size=(2, 4)).astype(np.float32)
    lr = 1e-3
    res = jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=1, init=init, granularity="layer",
                            optimizer=optax.sgd(lr), clamp=None)
    paths = ["l1.b", "l1.w", "l2.b", "l2.w"]  # canonical (sorted) leaf order

    def loss(lam):
        p = np_merge(base, models, lambda path: lam[:, paths.index(path)])
        return sum(np_entropy(np_mlp(p, x)) for x in xs)

    eps = 1e-5
    fd = np.zeros_like(init, dtype=np.float64)
    for i in range(2):
        for j in range(4):
            e = np.zeros((2, 4))
            e[i, j] = eps
            fd[i, j] = (loss(init + e) - loss(init - e)) / (2 * eps)
    got = np.stack([np.asarray(res.coefficients[p.split(".")[0]][p.split(".")[1]]) for p in paths], axis=1)
    grad = (init - got) / lr
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(res.losses[0], loss(init.astype(np.float64)), rtol=1e-5)
    assert np.abs(fd).max() > 1e-3  # the check is not vacuous


def test_adamerging_layerwise_lowers_entropy_and_raises_accuracy():
    base, models, xs, ys, heads = two_task_problem()
    fns = head_fns(heads)
    init_params = jmerge.adamerging(fns, base, models, batches=xs, steps=0).params
    res = jmerge.adamerging(fns, base, models, batches=xs, steps=150, optimizer=optax.adam(2e-2),
                            batch_size=32, seed=3)
    ent0 = sum(np_entropy(np.asarray(f(init_params, x), np.float64)) for f, x in zip(fns, xs))
    ent1 = sum(np_entropy(np.asarray(f(res.params, x), np.float64)) for f, x in zip(fns, xs))
    assert ent1 < ent0 - 0.5
    assert accuracy(res.params, fns, xs, ys) > accuracy(init_params, fns, xs, ys) + 0.1
    lam = np.concatenate([np.asarray(v) for v in jax.tree.leaves(res.coefficients)])
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert len(res.losses) == 150
    # deterministic from the seed
    res2 = jmerge.adamerging(fns, base, models, batches=xs, steps=150, optimizer=optax.adam(2e-2),
                             batch_size=32, seed=3)
    np.testing.assert_array_equal(res.losses, res2.losses)


def test_adamerging_supervised_ce_and_simplex_and_atlas():
    base, models, xs, ys, heads = two_task_problem(seed=4)
    fns = head_fns(heads)
    res = jmerge.adamerging(fns, base, models, batches=xs, labels=ys, loss="ce", steps=60,
                            optimizer=optax.adam(5e-2), granularity="task", simplex=True)
    lam = np.asarray(res.coefficients)
    np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-6)
    assert lam.min() >= 0
    assert res.losses[-1] <= res.losses[0] + 1e-5
    at = jmerge.atlas(fns, base, models, batches=xs, labels=ys, steps=60, optimizer=optax.adam(5e-2))
    assert at.losses[-1] < at.losses[0] - 0.5
    assert accuracy(at.params, fns, xs, ys) > 0.85
    # params are theta0 + sum_t lambda_t tau_t with the returned per-block coefficients
    again = jmerge.merge_with_coefficients(base, models, at.coefficients)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), at.params, again)


def test_project_simplex_matches_numpy():
    from jmerge._learned._common import project_simplex
    rng = np.random.default_rng(5)
    v = rng.normal(size=(4, 7)).astype(np.float32)

    def ref(y):  # Duchi et al. 2008, sort-based
        u = np.sort(y)[::-1]
        css = np.cumsum(u)
        rho = np.nonzero(u * np.arange(1, len(y) + 1) > (css - 1))[0][-1]
        theta = (css[rho] - 1) / (rho + 1.0)
        return np.maximum(y - theta, 0)

    want = np.stack([ref(v[:, j]) for j in range(7)], axis=1)
    np.testing.assert_allclose(np.asarray(project_simplex(jnp.asarray(v))), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs():
    rng = np.random.default_rng(6)
    base = mlp_params(rng)
    models = [mlp_params(rng) for _ in range(2)]
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    bad = mlp_params(rng)
    bad["l1"]["w"] = bad["l1"]["w"][:, :4]
    with pytest.raises(MergeInputError, match="l1.w"):
        jmerge.adamerging(mlp_apply, base, [models[0], bad], batches=xs, steps=1)
    with pytest.raises(MergeInputError, match="2 tasks"):
        jmerge.adamerging(mlp_apply, base, models, batches=xs[:1], steps=1)
    with pytest.raises(MergeInputError, match="0 examples"):
        jmerge.adamerging(mlp_apply, base, models, batches=[xs[0], xs[1][:0]], steps=1)
    with pytest.raises(MergeInputError, match="logits"):
        jmerge.adamerging(lambda p, x: mlp_apply(p, x).sum(-1), base, models, batches=xs, steps=1)
    with pytest.raises(MergeInputError, match="rows"):
        jmerge.adamerging(lambda p, x: mlp_apply(p, x)[:2], base, models, batches=xs, steps=1)
    with pytest.raises(MergeInputError, match="labels"):
        jmerge.adamerging(mlp_apply, base, models, batches=xs, loss="ce", steps=1)
    with pytest.raises(MergeInputError, match="granularity"):
        jmerge.adamerging(mlp_apply, base, models, batches=xs, granularity="row", steps=1)


def test_nan_loss_stops_with_error_naming_the_step():
    rng = np.random.default_rng(7)
    base = mlp_params(rng)
    models = [mlp_params(rng) for _ in range(2)]
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    xs[1][2, 3] = np.nan  # NaN input appears only in the minibatches that contain example 2
    with pytest.raises(jmerge.LearnedMergeError, match="step 0") as ei:
        jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=5)
    assert isinstance(ei.value, MergeInputError)

    def blow_up(p, x):  # finite at the start, NaN once coefficients move
        lam_sig = p["l2"]["b"][0]
        return mlp_apply(p, x) + jnp.where(jnp.abs(lam_sig - base["l2"]["b"][0]) > 1e-9, jnp.nan, 0.0) * 0 + \
            jnp.log(jnp.abs(p["l2"]["b"][0] - 0.0 * base["l2"]["b"][0]) - jnp.abs(base["l2"]["b"][0]) * 10)
    with pytest.raises(jmerge.LearnedMergeError, match="step"):
        jmerge.adamerging(blow_up, base, models, batches=xs, steps=3)


# ------------------------------------------------------------------------------------------------
# Flax NNX


def test_adamerging_nnx_linear_stack():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 6, rngs=rngs)
            self.b = nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graphdef, base = nnx.split(Net(nnx.Rngs(0)))
    models = [nnx.split(Net(nnx.Rngs(s)))[1] for s in (1, 2)]
    rng = np.random.default_rng(8)
    xs = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2)]

    def apply_fn(state, x):
        return nnx.merge(graphdef, state)(x)

    res = jmerge.adamerging(apply_fn, base, models, batches=xs, steps=5, optimizer=optax.adam(1e-2))
    assert isinstance(res.params, nnx.State)
    assert res.losses[-1] < res.losses[0]
    # the merged state equals theta0 + sum_t lambda_t tau_t with the returned coefficients
    lam_leaves = jax.tree.leaves(res.coefficients)
    for lam, b, m0, m1, got in zip(lam_leaves, jax.tree.leaves(base), jax.tree.leaves(models[0]),
                                   jax.tree.leaves(models[1]), jax.tree.leaves(res.params)):
        b, m0, m1 = (np.asarray(v, np.float64) for v in (b, m0, m1))
        want = b + lam[0] * (m0 - b) + lam[1] * (m1 - b)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    model = nnx.merge(graphdef, res.params)
    assert model(xs[0]).shape == (16, 4)
