"""Sparsifier steps (trim, DARE, breadcrumbs, DELLA) against NumPy references written from the papers."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.methods.basic import weighted_sum
from jmerge import chain
from jmerge.methods.sparsify import breadcrumbs_drop, dare, della_drop, trim
from jmerge import MergeInputError, leaves_with_paths
from tests._trees import k_round, np_taus, np_topk, small_tree

SHAPES = {"a": (7,), "b": {"c": (16, 12)}, "d": (3, 4, 5)}


def make_tree(seed, T=3, dtype=np.float32):
    return small_tree(seed, T, dtype, SHAPES)


def check_out(out_tree, base, refs, dtype, atol=1e-6):
    for (p, b, merged), o in zip(refs, leaves_with_paths(out_tree)[1]):
        o = np.asarray(o)
        assert o.dtype == np.dtype(dtype), p
        want = b + merged
        if dtype == np.float32:
            np.testing.assert_allclose(o, want, rtol=1e-6, atol=atol, err_msg=p)
        else:
            np.testing.assert_allclose(o.astype(np.float32), want.astype(dtype).astype(np.float32),
                                       rtol=2 ** -7, atol=1e-2, err_msg=p)


def pm(v, T=3):
    """A per-model hyperparameter (always a (T,) vector: one compile serves all values)."""
    return jmerge.PerModel(list(v) if isinstance(v, (list, tuple)) else [v] * T)


def run(method, base, models, seed=0, **hp):
    """Merge with return_extras=True and per-model vectors, so tests share compiled code."""
    return jmerge.merge(method, base, models, seed=seed, return_extras=True,
                        hparams={k: pm(v) for k, v in hp.items()})


def masks_of(ex, name):
    return [np.asarray(ex["a"][name]), np.asarray(ex["b"]["c"][name]), np.asarray(ex["d"][name])]


TRIM = chain(trim(), weighted_sum())

# --------------------------------------------------------------------------------------------
# trim


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_trim_tensor_scope(dtype):
    base, models = make_tree(1, dtype=dtype)
    for dens in ([0.2] * 3, [0.37] * 3, [1.0] * 3, [0.0] * 3, [0.1, 0.5, 0.9]):
        out, ex = run(TRIM, base, models, density=dens)
        refs = []
        for (p, b, tau), m in zip(np_taus(base, models), masks_of(ex, "trim_mask")):
            n = tau[0].size
            masks = np.stack([np_topk(np.abs(tau[t]).ravel(), k_round(dens[t], n)).reshape(tau[t].shape)
                              for t in range(3)])
            np.testing.assert_array_equal(m, masks)
            assert m.reshape(3, -1).sum(1).tolist() == [k_round(d, n) for d in dens]
            refs.append((p, b, np.where(masks, tau, 0).sum(0)))
        check_out(out, base, refs, dtype)
        if dtype != np.float32:
            break


def test_trim_global_scope():
    base, models = make_tree(3)
    method = chain(trim(scope="global"), weighted_sum())
    taus = np_taus(base, models)
    T = 3
    flat = np.concatenate([np.abs(t).reshape(T, -1) for _, _, t in taus], axis=1)
    N = flat.shape[1]
    for density in (0.2, 0.55):
        out, _ = run(method, base, models, density=density)
        gmask = np.stack([np_topk(flat[t], k_round(density, N)) for t in range(T)])
        refs, off, per_leaf = [], 0, []
        for p, b, tau in taus:
            n = tau[0].size
            m = gmask[:, off:off + n].reshape(tau.shape)
            off += n
            per_leaf.append(int(m.sum()))
            refs.append((p, b, np.where(m, tau, 0).sum(0)))
        check_out(out, base, refs, np.float32)
        # the test can fail: global keeps differ from per-tensor counts round(density * n)
        assert per_leaf != [T * k_round(density, t[0].size) for _, _, t in taus]
        tensor_out, _ = run(TRIM, base, models, density=density)
        assert not np.allclose(np.asarray(tensor_out["b"]["c"]), np.asarray(out["b"]["c"]))


TRIM_FLOOR = chain(trim(rounding="floor"), weighted_sum())


def test_trim_floor_rounding_matches_mergekit_rule():
    base, models = make_tree(4)
    _, ex = run(TRIM_FLOOR, base, models, density=0.07)
    # (7,): int(0.49) = 0 -> at least one kept; (16,12): int(13.44) = 13; (3,4,5): int(4.2) = 4
    assert [m.reshape(3, -1).sum(1).tolist() for m in masks_of(ex, "trim_mask")] == [[1] * 3, [13] * 3, [4] * 3]
    _, ex = run(TRIM_FLOOR, base, models, density=0.7)
    # int(0.7 * 7) = 4, int(0.7 * 192) = 134, python int(0.7 * 60) = 42 (float32 0.7 * 60 = 41.99999...)
    assert [m.reshape(3, -1).sum(1).tolist() for m in masks_of(ex, "trim_mask")] == [[4] * 3, [134] * 3, [42] * 3]


def test_trim_matches_mergekit_magnitude():
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify")
    base, models = make_tree(5)
    for d in (0.3, 0.7):
        out, _ = run(TRIM_FLOOR, base, models, density=d)
        for (p, b, tau), o in zip(np_taus(base, models), leaves_with_paths(out)[1]):
            ref = sum(sp.magnitude(torch.from_numpy(tau[t].copy()), d).numpy() for t in range(3))
            np.testing.assert_allclose(np.asarray(o), b + ref, rtol=1e-6, atol=1e-6, err_msg=p)


def test_density_out_of_range_names_leaf():
    base, models = make_tree(6)
    for step in (trim(), dare(), della_drop(), breadcrumbs_drop()):
        with pytest.raises(MergeInputError, match=r"density.*'a'"):
            jmerge.merge(chain(step, weighted_sum()), base, models, hparams={"density": 1.2})
    with pytest.raises(MergeInputError, match="gamma"):
        jmerge.merge(chain(breadcrumbs_drop(), weighted_sum()), base, models, hparams={"gamma": -0.1})
    with pytest.raises(MergeInputError, match="epsilon"):
        jmerge.merge(chain(della_drop(), weighted_sum()), base, models, hparams={"epsilon": 0.6})
    with pytest.raises(MergeInputError, match="density"):
        jmerge.merge(chain(trim(), weighted_sum()), base, models,
                     hparams={"density": jmerge.PerModel([0.2, -0.5, 0.1])})
    with pytest.raises(MergeInputError, match="scope"):
        trim(scope="layer")
    with pytest.raises(MergeInputError, match="rescale"):
        dare(rescale="l3")


# --------------------------------------------------------------------------------------------
# DARE

def dare_method(rescale="inverse"):
    return chain(dare(rescale=rescale), weighted_sum())


@pytest.mark.parametrize("dtype,rescale", [(np.float32, "inverse"), (np.float32, "l1"), (np.float32, "none"),
                                           (ml_dtypes.bfloat16, "inverse")])
def test_dare_formula_given_mask(dtype, rescale):
    base, models = make_tree(7, dtype=dtype)
    dens = [0.3, 0.6, 0.9]
    out, ex = run(dare_method(rescale), base, models, seed=11, density=dens)
    refs = []
    for (p, b, tau), m in zip(np_taus(base, models), masks_of(ex, "dare_mask")):
        assert m.dtype == bool and m.shape == tau.shape
        kept = np.where(m, tau, 0)
        if rescale == "inverse":
            kept = kept / np.asarray(dens, np.float32).reshape((3,) + (1,) * (tau.ndim - 1))
        elif rescale == "l1":
            f = np.abs(tau).reshape(3, -1).sum(1) / np.abs(kept).reshape(3, -1).sum(1)
            kept = kept * f.reshape((3,) + (1,) * (tau.ndim - 1))
            for t in range(3):  # L1 norms match exactly
                np.testing.assert_allclose(np.abs(kept[t]).sum(), np.abs(tau[t]).sum(), rtol=1e-6)
        refs.append((p, b, kept.sum(0)))
    check_out(out, base, refs, dtype, atol=1e-5 if rescale == "l1" else 1e-6)  # sums of values ~ 10


def test_dare_l1_norms_match_exactly():
    base, models = make_tree(8)
    zeros = jax.tree.map(np.zeros_like, base)
    out, _ = run(dare_method("l1"), zeros, [jax.tree.map(lambda m, b: m - b, models[0], base), zeros, zeros],
                 seed=3, density=0.4)
    for o, (_, _, t) in zip(jax.tree.leaves(out), np_taus(base, models)):
        np.testing.assert_allclose(np.abs(np.asarray(o)).sum(), np.abs(t[0]).sum(), rtol=1e-6)
        assert (np.asarray(o) == 0).any()


def test_dare_drop_fraction_and_unbiased():
    n = 20000
    base = {"w": np.zeros((100, 200), np.float32)}
    models = [{"w": np.ones((100, 200), np.float32)}, {"w": np.zeros((100, 200), np.float32)}]
    for density in (0.1, 0.5, 0.85):
        out, ex = jmerge.merge(dare_method(), base, models, seed=5, return_extras=True,
                               hparams={"density": jmerge.PerModel([density, 1 - density])})
        mask = np.asarray(ex["w"]["dare_mask"])
        for t, d in enumerate((density, 1 - density)):
            assert abs(mask[t].sum() - n * d) < 5 * np.sqrt(n * d * (1 - d))
        o = np.asarray(out["w"])
        assert set(np.unique(o).tolist()) <= {0.0, float(np.float32(1) / np.float32(density))}
        # E[kept / density] = tau = 1
        assert abs(o.mean() - 1.0) < 5 * np.sqrt((1 - density) / density / n)
    assert not np.array_equal(mask[0], ~mask[1])  # tasks draw independently


def test_dare_same_seed_same_result_regardless_of_leaf_order():
    base, models = make_tree(9)
    full, _ = run(dare_method(), base, models, seed=42, density=0.5)
    again, _ = run(dare_method(), base, models, seed=42, density=0.5)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the same leaf in a tree with other leaves before it (different leaf index, same path)
    sub = {"b": base["b"], "0": base["a"], "aa": base["a"]}
    sub_models = [{"b": m["b"], "0": m["a"] * 2, "aa": m["a"] * 3} for m in models]
    part, _ = run(dare_method(), sub, sub_models, seed=42, density=0.5)
    np.testing.assert_array_equal(np.asarray(part["b"]["c"]), np.asarray(full["b"]["c"]))
    other, _ = run(dare_method(), base, models, seed=43, density=0.5)
    assert not np.array_equal(np.asarray(other["b"]["c"]), np.asarray(full["b"]["c"]))


# --------------------------------------------------------------------------------------------
# Breadcrumbs

def np_breadcrumbs(tau, d, g, rounding="round"):
    n = tau.size
    if rounding == "round":
        k_keep, k_top = k_round(d, n), k_round(g, n)
    else:
        k_keep, k_top = int(np.float64(d) * n), int(np.float64(g) * n)
    k_top = min(k_top, n - k_keep)
    order = np.argsort(-np.abs(tau).ravel(), kind="stable")
    m = np.zeros(n, bool)
    m[order[k_top:k_top + k_keep]] = True
    return m.reshape(tau.shape)


BREAD = chain(breadcrumbs_drop(), weighted_sum())
BREAD_FLOOR = chain(breadcrumbs_drop(rounding="floor"), weighted_sum())


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_breadcrumbs(dtype):
    base, models = make_tree(10, dtype=dtype)
    for density, gamma in [(0.9, 0.01), (0.6, 0.1), (0.5, 0.0), (0.95, 0.2), ([0.3, 0.5, 0.8], [0.05, 0.2, 0.0])]:
        out, ex = run(BREAD, base, models, density=density, gamma=gamma)
        d3 = density if isinstance(density, list) else [density] * 3
        g3 = gamma if isinstance(gamma, list) else [gamma] * 3
        refs = []
        for (p, b, tau), mm in zip(np_taus(base, models), masks_of(ex, "breadcrumbs_mask")):
            m = np.stack([np_breadcrumbs(tau[t], d3[t], g3[t]) for t in range(3)])
            np.testing.assert_array_equal(mm, m)
            refs.append((p, b, np.where(m, tau, 0).sum(0)))
        check_out(out, base, refs, dtype)
        if dtype != np.float32:
            break


def test_breadcrumbs_small_tensor_keeps_top_when_no_outlier():
    # (7,) leaf with gamma 0.01: int(0.07) = 0 outliers; the 6 largest (int(0.9 * 7)) are kept, not nothing.
    base, models = make_tree(11)
    _, ex = run(BREAD_FLOOR, base, models, density=0.9, gamma=0.01)
    _, _, tau = np_taus(base, models)[0]
    m = np.asarray(ex["a"]["breadcrumbs_mask"])
    assert m.sum(axis=1).tolist() == [6, 6, 6]
    for t in range(3):
        np.testing.assert_array_equal(m[t], np_topk(np.abs(tau[t]), 6))


def test_breadcrumbs_matches_mergekit():
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify")
    base, models = make_tree(12)
    for d, g in [(0.8, 0.05), (0.9, 0.01)]:
        out, _ = run(BREAD_FLOOR, base, models, density=d, gamma=g)
        for (p, b, tau), o in zip(np_taus(base, models), leaves_with_paths(out)[1]):
            ref = sum(sp.magnitude_outliers(torch.from_numpy(tau[t].copy()), d, gamma=g).numpy() for t in range(3))
            np.testing.assert_allclose(np.asarray(o), b + ref, rtol=1e-6, atol=1e-6, err_msg=p)


# --------------------------------------------------------------------------------------------
# DELLA

def np_della_probs(tau_t, d, e):
    x = np.abs(tau_t)
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    m = rows.shape[1]
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float32)
    rn = ranks / np.float32(m - 1) if m > 1 else np.full(rows.shape, 0.5, np.float32)
    p = np.clip(np.float32(d) - np.float32(e) + np.float32(2) * np.float32(e) * rn, 0, 1)
    if d >= 1 or d <= 0:  # density 1 keeps everything, 0 drops everything
        p = np.full(p.shape, 1.0 if d >= 1 else 0.0, np.float32)
    return p.reshape(tau_t.shape)


def della_method(rescale="inverse"):
    return chain(della_drop(rescale=rescale), weighted_sum())


@pytest.mark.parametrize("dtype,rescale", [(np.float32, "inverse"), (np.float32, "l1"), (np.float32, "none"),
                                           (ml_dtypes.bfloat16, "inverse")])
def test_della_formula_given_mask(dtype, rescale):
    base, models = make_tree(13, dtype=dtype)
    dens, eps = [0.7, 0.5, 0.4], 0.15
    out, ex = run(della_method(rescale), base, models, seed=2, density=dens, epsilon=eps)
    refs = []
    for (p, b, tau), m in zip(np_taus(base, models), masks_of(ex, "della_mask")):
        probs = np.stack([np_della_probs(tau[t], dens[t], eps) for t in range(3)])
        kept = np.where(m, tau, 0)
        if rescale == "inverse":
            kept = np.where(m, tau / probs, 0)
        elif rescale == "l1":
            f = np.abs(tau).reshape(3, -1).sum(1) / np.abs(kept).reshape(3, -1).sum(1)
            kept = kept * f.reshape((3,) + (1,) * (tau.ndim - 1))
        refs.append((p, b, kept.sum(0)))
    check_out(out, base, refs, dtype, atol=1e-5 if rescale != "none" else 1e-6)


def test_della_ranks_with_ties_match_numpy_stable_argsort():
    """Magnitude ranks (int32 key sorts) equal NumPy's stable double argsort of |x|, with heavy ties:
    values rounded to a few levels, both signs of equal magnitudes, +0 and -0, rows of 1 and 3001."""
    from jmerge.methods.sparsify import _magnitude_ranks, della_keep_probs
    rng = np.random.default_rng(21)
    for shape in ((2, 5, 3001), (3, 7, 1), (2, 40, 64)):
        x = np.round(rng.normal(size=shape) * 4) / 4
        x[..., ::5] = -x[..., ::5]
        x.flat[::7] = -0.0
        x = x.astype(np.float32)
        ref = np.argsort(np.argsort(np.abs(x), axis=-1, kind="stable"), axis=-1, kind="stable")
        np.testing.assert_array_equal(np.asarray(jax.jit(_magnitude_ranks)(jnp.asarray(x))), ref)
    tau = x.reshape(2, 40, 64)
    p = np.asarray(della_keep_probs(jnp.asarray(tau), jnp.array([0.6, 0.5]), jnp.array([0.2, 0.1])))
    ref = np.stack([np_della_probs(tau[t], [0.6, 0.5][t], [0.2, 0.1][t]) for t in range(2)])
    np.testing.assert_allclose(p, ref, rtol=1e-6)


def test_della_keep_rates_follow_rank():
    # rows of 11 distinct magnitudes: keep rate of rank r ~ (d - e) + 2 e r / 10
    R, m, d, e = 4000, 11, 0.6, 0.3
    mags = np.arange(1, m + 1, dtype=np.float32)
    rng = np.random.default_rng(0)
    tau = np.stack([rng.permutation(mags) for _ in range(R)])
    base = {"w": np.zeros((R, m), np.float32)}
    out, ex = jmerge.merge(della_method(), base, [{"w": tau}], seed=9, return_extras=True,
                           hparams={"density": d, "epsilon": e})
    mask = np.asarray(ex["w"]["della_mask"])[0]
    for r in range(m):
        rate = mask[tau == mags[r]].mean()
        p = d - e + 2 * e * r / (m - 1)
        assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / R), (r, rate, p)
    # unbiased with the inverse rescale: E[kept / p] = tau
    o = np.asarray(out["w"])
    for r in (0, 5, 10):
        sel = tau == mags[r]
        p = d - e + 2 * e * r / (m - 1)
        assert abs(o[sel].mean() - mags[r]) < 5 * mags[r] * np.sqrt((1 - p) / p / R)


def test_della_same_seed_independent_of_leaf_order():
    base, models = make_tree(14)
    dens, eps = [0.7, 0.5, 0.4], 0.15
    full, _ = run(della_method(), base, models, seed=7, density=dens, epsilon=eps)
    part, _ = run(della_method(), {"d": base["d"], "0a": base["a"], "a": base["a"]},
                  [{"d": mm["d"], "0a": mm["a"] * 2, "a": mm["a"]} for mm in models], seed=7, density=dens, epsilon=eps)
    np.testing.assert_array_equal(np.asarray(part["d"]), np.asarray(full["d"]))
    np.testing.assert_array_equal(np.asarray(part["a"]), np.asarray(full["a"]))


def test_della_density_one_keeps_all_and_zero_drops_all():
    base, models = make_tree(15)
    out, ex = run(della_method(), base, models, seed=1, density=[1.0, 0.0, 1.0], epsilon=0.15)
    for (p, b, tau), m in zip(np_taus(base, models), masks_of(ex, "della_mask")):
        assert m[0].all() and not m[1].any() and m[2].all()
        np.testing.assert_allclose(np.asarray(leaves_with_paths(out)[1][[q for q, _, _ in np_taus(base, models)].index(p)]),
                                   b + tau[0] + tau[2], rtol=1e-6, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("shape", [(3,), (3, 7, 5), (2, 64, 96), (1, 1), (5, 33, 17, 3)])
def test_fused_bernoulli_has_jax_random_bits(shape):
    """DARE/DELLA draw with jmerge.core.xla.bernoulli: the bits of jax.random.bernoulli (partitionable
    threefry), computed elementwise; its compiled program holds no loop (JAX's CPU lowering of
    threefry is a while loop over full-size arrays)."""
    from jmerge.core.xla import bernoulli
    for seed in (0, 12345):
        key = jax.random.fold_in(jax.random.key(seed), 77)
        u = jax.random.uniform(jax.random.key(seed + 9), shape)
        for p in (u, jnp.full(shape, 0.5, jnp.float32), jnp.zeros(shape), jnp.ones(shape), jnp.full(shape, 1e-7)):
            got = np.asarray(jax.jit(bernoulli)(key, p))
            want = np.asarray(jax.random.bernoulli(key, p))
            assert got.dtype == want.dtype == np.bool_ and np.array_equal(got, want), (shape, seed)
    hlo = jax.jit(bernoulli).lower(jax.random.key(0), jnp.full(shape, 0.5)).compile().as_text()
    assert " while(" not in hlo
    # a raw (legacy uint32) key or another dtype falls back to jax.random.bernoulli itself
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(bernoulli(raw, jnp.full(shape, 0.5)), jax.random.bernoulli(raw, jnp.full(shape, 0.5)))
