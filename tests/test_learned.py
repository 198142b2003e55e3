"""Tests of the learned merges (jmerge.learned) against independent NumPy references."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import jmerge
from jmerge import MergeInputError


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
    # minibatches are deterministic from the seed
    from jmerge.learned.common import Batcher
    b1, b2 = (Batcher(xs, None, [64, 64], 32, 3, None) for _ in range(2))
    np.testing.assert_array_equal(b1.get(7)[1][0], b2.get(7)[1][0])
    assert not np.array_equal(b1.get(7)[1][0], b1.get(8)[1][0])


def test_adamerging_supervised_ce_and_simplex_and_atlas():
    base, models, xs, ys, heads = two_task_problem(seed=4)
    fns = head_fns(heads)
    res = jmerge.adamerging(fns, base, models, batches=xs, labels=ys, loss="ce", steps=60,
                            optimizer=optax.adam(5e-2), granularity="task", simplex=True)
    lam = np.asarray(res.coefficients)
    np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-6)
    assert lam.min() >= 0
    assert res.losses[-1] <= res.losses[0] + 1e-5
    # a callable loss (here: cross-entropy written out) gives the same training run
    def my_ce(logits, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    res_c = jmerge.adamerging(fns, base, models, batches=xs, labels=ys, loss=my_ce, steps=60,
                              optimizer=optax.adam(5e-2), granularity="task", simplex=True)
    np.testing.assert_allclose(res_c.losses, res.losses, rtol=1e-5)
    np.testing.assert_allclose(res_c.coefficients, res.coefficients, rtol=1e-5, atol=1e-7)
    at = jmerge.atlas(fns, base, models, batches=xs, labels=ys, steps=60, optimizer=optax.adam(5e-2))
    assert at.losses[-1] < at.losses[0] - 0.5
    assert accuracy(at.params, fns, xs, ys) > 0.85
    # params are theta0 + sum_t lambda_t tau_t with the returned per-block coefficients
    again = jmerge.merge_with_coefficients(base, models, at.coefficients)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), at.params, again)


def test_project_simplex_matches_numpy():
    from jmerge.learned.common import project_simplex
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

    # finite loss at step 0, but a huge step makes the coefficients (and then the loss) non-finite
    with pytest.raises(jmerge.LearnedMergeError, match="step"):
        jmerge.adamerging(lambda p, x: x @ p["l1"]["w"], base, models, batches=[xs[0], xs[0]], steps=3,
                          clamp=None, optimizer=optax.sgd(1e38))


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


# ------------------------------------------------------------------------------------------------
# Concrete subspace masks


def test_concrete_mask_matches_numpy_and_training_runs():
    from jmerge.learned.concrete import concrete_mask
    key = jax.random.key(3)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    got = np.asarray(concrete_mask(logits, key, 0.5))
    u = np.asarray(jax.random.uniform(key, (4, 5), jnp.float32, minval=1e-6, maxval=1 - 1e-6), np.float64)
    m = 1 / (1 + np.exp(-(np.asarray(logits, np.float64) + np.log(u) - np.log(1 - u)) / 0.5))
    np.testing.assert_allclose(got, m / m.mean(), rtol=1e-5)

    base, models, xs, ys, heads = two_task_problem(seed=5)
    fns = head_fns(heads)
    # zero steps: logits 0 keep every entry -> exactly task arithmetic with lambda = scale
    r0 = jmerge.concrete_merge(fns, base, models, batches=xs, steps=0, scale=0.4)
    ref = np_merge(base, models, lambda p: [0.4, 0.4])
    np.testing.assert_allclose(r0.params["enc"]["w"], ref["enc"]["w"], rtol=1e-6, atol=1e-6)
    assert all(bool(np.all(m)) for m in jax.tree.leaves(r0.mask))
    for inner in ("task_arithmetic",):  # inner="adamerging" is checked below (with a refine stage)
        r = jmerge.concrete_merge(fns, base, models, batches=xs, steps=30, inner=inner,
                                  optimizer=optax.adam(5e-2), coef_optimizer=optax.adam(2e-2))
        assert np.mean(r.losses[-5:]) < np.mean(r.losses[:5])
        mask = np.asarray(r.mask["enc"]["w"])
        logits_w = np.asarray(r.info["mask_logits"]["enc"]["w"])
        np.testing.assert_array_equal(mask, logits_w >= 0)
        lam = np.asarray(r.coefficients if inner == "task_arithmetic" else r.coefficients["enc"]["w"])
        tau = sum(l * (np.asarray(m["enc"]["w"], np.float64) - base["enc"]["w"]) for l, m in zip(lam, models))
        hard = mask / mask.mean()
        np.testing.assert_allclose(r.params["enc"]["w"], base["enc"]["w"] + hard * tau, rtol=1e-5, atol=1e-6)
    # second stage: AdaMerging over the hard-masked task vectors with the mask fixed
    r2 = jmerge.concrete_merge(fns, base, models, batches=xs, steps=30, inner="adamerging", refine_steps=4,
                               optimizer=optax.adam(5e-2), coef_optimizer=optax.adam(2e-2))
    assert np.mean(r2.losses[-5:]) < np.mean(r2.losses[:5])
    np.testing.assert_array_equal(r2.mask["enc"]["w"], np.asarray(r2.info["mask_logits"]["enc"]["w"]) >= 0)
    lam = np.asarray(r2.coefficients["enc"]["w"])
    mask = np.asarray(r2.mask["enc"]["w"])
    tau = sum(l * (np.asarray(m["enc"]["w"], np.float64) - base["enc"]["w"]) for l, m in zip(lam, models))
    np.testing.assert_allclose(r2.params["enc"]["w"], base["enc"]["w"] + mask / mask.mean() * tau, rtol=1e-5, atol=1e-6)
    assert len(r2.info["refine_losses"]) == 4


def test_concrete_mask_init():
    """``mask_init`` (FusionBench's initial_logits): every logit starts there; hard mask 1[logit >= 0]."""
    base, models, xs, ys, heads = two_task_problem(seed=5)
    fns = head_fns(heads)
    # negative start, no training: nothing kept -> the base exactly
    r = jmerge.concrete_merge(fns, base, models, batches=xs, steps=0, scale=0.4, mask_init=-1.0)
    np.testing.assert_array_equal(np.asarray(r.params["enc"]["w"]), base["enc"]["w"])
    assert not any(bool(np.any(m)) for m in jax.tree.leaves(r.mask))
    np.testing.assert_array_equal(np.asarray(r.info["mask_logits"]["enc"]["w"]), -1.0)
    # positive start, one Adam step of lr 0.1: each logit moves by lr * g / (|g| + eps) <= 0.1 (Adam's first
    # step), stays >= 0, so every entry is kept -> task arithmetic with lambda = scale (NumPy reference)
    r1 = jmerge.concrete_merge(fns, base, models, batches=xs, steps=1, scale=0.4, mask_init=2.0,
                               optimizer=optax.adam(0.1))
    lg = np.asarray(r1.info["mask_logits"]["enc"]["w"])
    assert np.all(np.abs(lg - 2.0) <= 0.1 + 1e-6) and np.max(np.abs(lg - 2.0)) > 0.09
    ref = np_merge(base, models, lambda p: [0.4, 0.4])
    np.testing.assert_allclose(r1.params["enc"]["w"], ref["enc"]["w"], rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeInputError, match="mask_init"):
        jmerge.concrete_merge(fns, base, models, batches=xs, steps=0, mask_init=float("nan"))


# ------------------------------------------------------------------------------------------------
# Fisher merging


def test_fisher_equal_fisher_is_mean_and_weighting():
    rng = np.random.default_rng(9)
    models = [mlp_params(rng) for _ in range(3)]
    ones = [jax.tree.map(lambda a: np.full(a.shape, 2.0, np.float32), models[0])] * 3
    res = jmerge.fisher_merge(mlp_apply, models, fishers=ones)
    for path in (("l1", "w"), ("l2", "b")):
        want = np.mean([m[path[0]][path[1]] for m in models], axis=0)
        np.testing.assert_allclose(res.params[path[0]][path[1]], want, rtol=1e-6, atol=1e-7)
    # different Fisher: closed form sum F theta / sum F (with the floor added)
    fs = [jax.tree.map(lambda a: rng.uniform(0, 1, a.shape).astype(np.float32), models[0]) for _ in range(3)]
    res = jmerge.fisher_merge(mlp_apply, models, fishers=fs, fisher_floor=1e-3)
    F = np.stack([f["l1"]["w"] + 1e-3 for f in fs]).astype(np.float64)
    W = np.stack([m["l1"]["w"] for m in models]).astype(np.float64)
    np.testing.assert_allclose(res.params["l1"]["w"], (F * W).sum(0) / F.sum(0), rtol=1e-5)


def test_fisher_information_matches_numpy_linear_softmax():
    rng = np.random.default_rng(10)
    d, c, n = 4, 3, 12
    params = {"w": rng.normal(size=(d, c)).astype(np.float32), "b": rng.normal(size=(c,)).astype(np.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    f = jmerge.fisher_information(apply, params, x, labels=y, chunk_size=5)
    # d log softmax_y / d logits = onehot(y) - p; d/dW = x outer (onehot - p)
    z = x.astype(np.float64) @ params["w"] + params["b"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = np.eye(c)[y] - p
    fw = np.mean(np.einsum("ni,nj->nij", x, g) ** 2, axis=0)
    fb = np.mean(g**2, axis=0)
    np.testing.assert_allclose(f["w"], fw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["b"], fb, rtol=1e-5, atol=1e-7)
    # sampled (true) Fisher: finite, nonnegative, and merging runs end to end
    res = jmerge.fisher_merge(apply, [params, jax.tree.map(lambda a: a * 0.5, params)], [x, x], n_examples=8)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(res.params))
    assert all(np.all(np.asarray(v) >= 0) for fi in res.info["fishers"] for v in jax.tree.leaves(fi))


# ------------------------------------------------------------------------------------------------
# RegMean


def test_regmean_linear_equals_union_least_squares():
    rng = np.random.default_rng(11)
    d, o = 5, 3
    xs = [rng.normal(size=(n, d)) for n in (20, 30, 25)]
    ys = [x @ rng.normal(size=(d, o)) + 0.3 * rng.normal(size=(x.shape[0], o)) for x in xs]
    ws = [np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(xs, ys)]
    models = [{"lin": {"kernel": w.astype(np.float32)}, "other": np.full((2,), float(t), np.float32)}
              for t, w in enumerate(ws)]

    def features_fn(params, x):
        return {"lin.kernel": x}

    grams = [jmerge.gram_matrices(None, m, x.astype(np.float32), features_fn=features_fn)
             for m, x in zip(models, xs)]
    for g, x in zip(grams, xs):
        np.testing.assert_allclose(g["lin.kernel"], x.T @ x / len(x), rtol=1e-5)
    # G_t = X^T X / N_t; with N_t weighting removed by scaling the Gram by N_t it is the union LS fit
    grams_n = [{"lin.kernel": g["lin.kernel"] * len(x)} for g, x in zip(grams, xs)]
    res = jmerge.regmean_merge(models, grams_n, alpha=1.0)
    X = np.concatenate(xs)
    Y = np.concatenate(ys)
    want = np.linalg.solve(X.T @ X, X.T @ Y)
    np.testing.assert_allclose(res.params["lin"]["kernel"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.params["other"], np.full((2,), 1.0), rtol=1e-6)
    # alpha < 1: off-diagonals scaled, NumPy reference
    res = jmerge.regmean_merge(models, grams, alpha=0.5)
    gt = [0.5 * g["lin.kernel"] + 0.5 * np.diag(np.diag(g["lin.kernel"])) for g in grams]
    want = np.linalg.solve(sum(gt), sum(g @ w for g, w in zip(gt, ws)))
    np.testing.assert_allclose(res.params["lin"]["kernel"], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(MergeInputError, match="not leaf paths"):
        jmerge.regmean_merge(models, [{"nope": np.eye(d)}] * 3)


def test_gram_matrices_flax_linen_interception():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(4)(x))  # Dense_0
            return nn.Dense(3)(h)  # Dense_1

    net = Net()
    x = np.random.default_rng(12).normal(size=(7, 5)).astype(np.float32)
    variables = net.init(jax.random.key(0), x)
    grams = jmerge.gram_matrices(net.apply, variables, x)
    assert set(grams) == {"params.Dense_0.kernel", "params.Dense_1.kernel"}
    np.testing.assert_allclose(grams["params.Dense_0.kernel"], x.T @ x / 7, rtol=1e-5)
    h = np.tanh(x @ np.asarray(variables["params"]["Dense_0"]["kernel"]) + np.asarray(variables["params"]["Dense_0"]["bias"]))
    np.testing.assert_allclose(grams["params.Dense_1.kernel"], h.T @ h / 7, rtol=1e-4, atol=1e-6)
    res = jmerge.regmean_merge([variables, variables], [grams, grams])
    np.testing.assert_allclose(res.params["params"]["Dense_1"]["kernel"], variables["params"]["Dense_1"]["kernel"],
                               rtol=1e-4, atol=1e-5)
    assert sorted(res.info["regmean_paths"]) == sorted(grams)


# ------------------------------------------------------------------------------------------------
# Adaptive projective gradient descent


def test_adaptive_projective_gd():
    rng = np.random.default_rng(13)
    base = {"w": rng.normal(size=(8, 6)).astype(np.float32), "b": rng.normal(size=(6,)).astype(np.float32)}
    models = [jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), base) for _ in range(3)]
    frozen = rng.normal(size=(3, 2)).astype(np.float32)  # a leaf no fine-tuning changed (zero task vectors)
    base["frozen"] = frozen
    for m in models:
        m["frozen"] = frozen.copy()
    r0 = jmerge.adaptive_projective_gd(base, models, steps=0, scale=0.3)
    taus = [m["w"].astype(np.float64) - base["w"] for m in models]
    inv = np.array([1 / np.linalg.norm(t) for t in taus])
    lam0 = 0.3 * 3 * inv / inv.sum()
    np.testing.assert_allclose(r0.coefficients["w"], lam0, rtol=1e-5)
    np.testing.assert_allclose(r0.params["w"], base["w"] + sum(l * t for l, t in zip(lam0, taus)), rtol=1e-5, atol=1e-6)
    r = jmerge.adaptive_projective_gd(base, models, steps=60, optimizer=optax.adam(1e-2), rank_ratio=0.34)
    assert r.losses[-1] < 0.5 * r.losses[0]
    np.testing.assert_array_equal(r.params["frozen"], frozen)
    # the correction Delta lies in the orthogonal complement of the shared subspace
    lam = r.coefficients["w"]
    delta = np.asarray(r.params["w"], np.float64) - base["w"] - sum(l * t for l, t in zip(lam, taus))
    u = np.linalg.svd(np.concatenate(taus, axis=1), full_matrices=False)[0][:, :3]
    assert np.abs(delta).max() > 1e-3
    np.testing.assert_allclose(u.T @ delta, 0.0, atol=2e-4)
    # loss value at step 0 vs NumPy
    loss0 = 0.0
    for key in ("b", "w"):
        ts = [(m[key].astype(np.float64) - base[key]).reshape(m[key].shape[0], -1) for m in models]
        inv = np.array([1 / np.linalg.norm(t) for t in ts])
        lm = 0.3 * 3 * inv / inv.sum()
        tm = sum(l * t for l, t in zip(lm, ts))
        loss0 += sum(np.sum((t.T @ (tm - t)) ** 2) / np.linalg.norm(t) ** 4 for t in ts)
    np.testing.assert_allclose(r.losses[0], loss0, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Tangent space


def test_linearize_is_first_order_taylor():
    rng = np.random.default_rng(14)
    p0 = mlp_params(rng)
    p1 = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p0)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    lin = jmerge.linearize(mlp_apply, p0)
    got = np.asarray(jax.jit(lin)(p1, x), np.float64)
    # explicit Jacobian product by central finite differences in float64 NumPy
    d = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p1, p0)
    eps = 1e-6
    plus = jax.tree.map(lambda a, b: np.asarray(a, np.float64) + eps * b, p0, d)
    minus = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - eps * b, p0, d)
    jd = (np_mlp(plus, x) - np_mlp(minus, x)) / (2 * eps)
    np.testing.assert_allclose(got, np_mlp(p0, x) + jd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lin(p0, x)), np_mlp(p0, x), rtol=1e-5, atol=1e-6)
    # linear in params: task arithmetic in the tangent space adds output changes exactly
    p2 = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p0)
    merged = jax.tree.map(lambda a, b, c: a + b - c, p1, p2, p0)
    np.testing.assert_allclose(np.asarray(lin(merged, x)),
                               np.asarray(lin(p1, x)) + np.asarray(lin(p2, x)) - np_mlp(p0, x), rtol=1e-4, atol=1e-5)
    # usable for fine-tuning: gradients flow through apply_lin
    g = jax.grad(lambda p: jnp.sum(lin(p, x) ** 2))(p1)
    assert np.abs(np.asarray(g["l1"]["w"])).max() > 0


def test_task_vectors_input_and_init_forms():
    rng = np.random.default_rng(15)
    base = mlp_params(rng)
    models = [mlp_params(rng) for _ in range(2)]
    tvs = [jax.tree.map(lambda m, b: m - b, m, base) for m in models]
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    init = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32)  # (T, L), leaves in path order
    a = jmerge.adamerging(mlp_apply, base, task_vectors=tvs, batches=xs, steps=0, init=init)
    b = jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=0, init=a.coefficients)
    np.testing.assert_allclose(a.coefficients["l2"]["b"], [0.3, 0.7])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), a.params, b.params)
    ref = np_merge(base, models, lambda p: init[:, ["l1.b", "l1.w", "l2.b", "l2.w"].index(p)])
    np.testing.assert_allclose(a.params["l1"]["w"], ref["l1"]["w"], rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeInputError, match="broadcast"):
        jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=0, init=np.ones((3,)))
    with pytest.raises(MergeInputError, match="exactly one"):
        jmerge.adamerging(mlp_apply, base, models, task_vectors=tvs, batches=xs, steps=0)
    with pytest.raises(MergeInputError, match="callables"):
        jmerge.adamerging([mlp_apply], base, models, batches=xs, steps=0)
    # simplex layer-wise: every leaf's coefficients sum to one
    s = jmerge.adamerging(mlp_apply, base, models, batches=xs, steps=0, simplex=True, init=init)
    for v in jax.tree.leaves(s.coefficients):
        np.testing.assert_allclose(np.sum(v), 1.0, rtol=1e-6)


def test_gram_matrices_nnx_and_regmean_on_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(5, 4, rngs=rngs)
            self.b = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    rng = np.random.default_rng(16)
    nets = [Net(nnx.Rngs(s)) for s in (0, 1)]
    xs = [rng.normal(size=(9, 5)).astype(np.float32) for _ in range(2)]
    grams = [jmerge.gram_matrices(None, n, x) for n, x in zip(nets, xs)]
    assert set(grams[0]) == {"a.kernel.value", "b.kernel.value"}
    np.testing.assert_allclose(grams[0]["a.kernel.value"], xs[0].T @ xs[0] / 9, rtol=1e-5)
    h = np.tanh(xs[1] @ np.asarray(nets[1].a.kernel[...]) + np.asarray(nets[1].a.bias[...]))
    np.testing.assert_allclose(grams[1]["b.kernel.value"], h.T @ h / 9, rtol=1e-4, atol=1e-6)
    states = [nnx.split(n)[1] for n in nets]
    res = jmerge.regmean_merge(states, grams, alpha=0.9)
    g = [0.9 * gr["b.kernel.value"] + 0.1 * np.diag(np.diag(gr["b.kernel.value"])) for gr in grams]
    ws = [np.asarray(n.b.kernel[...], np.float64) for n in nets]
    want = np.linalg.solve(sum(g), sum(gi @ w for gi, w in zip(g, ws)))
    np.testing.assert_allclose(np.asarray(res.params["b"]["kernel"][...]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.params["a"]["bias"][...]),
                               (np.asarray(nets[0].a.bias[...]) + np.asarray(nets[1].a.bias[...])) / 2, rtol=1e-6)
