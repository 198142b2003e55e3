"""Sparsifier steps (trim, DARE, breadcrumbs, DELLA) against NumPy references written from the papers."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge._basic import weighted_sum
from jmerge._core import chain
from jmerge._sparsify import breadcrumbs_drop, dare, della_drop, trim
from jmerge._tree import MergeInputError, leaves_with_paths

SHAPES = {"a": (7,), "b": {"c": (16, 12)}, "d": (3, 4, 5)}


def make_tree(seed, T=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = jax.tree.map(lambda s: rng.normal(size=s).astype(dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    models = [jax.tree.map(lambda b: (b.astype(np.float32) + rng.normal(size=b.shape)).astype(dtype), base)
              for _ in range(T)]
    return base, models


def np_taus(base, models):
    """Per-leaf (path, base f32, tau (T, ...) f32) from the actual (possibly bf16) values."""
    paths, bl, _ = leaves_with_paths(base)
    mls = [leaves_with_paths(m)[1] for m in models]
    out = []
    for i, p in enumerate(paths):
        b = np.asarray(bl[i]).astype(np.float32)
        tau = np.stack([np.asarray(ml[i]).astype(np.float32) for ml in mls]) - b[None]
        out.append((p, b, tau))
    return out


def np_topk(x, k):
    """Mask of the k largest entries of flat x, ties broken by lowest index."""
    order = np.argsort(-x, kind="stable")
    m = np.zeros(x.shape, bool)
    m[order[:k]] = True
    return m


def k_round(d, n):
    return int(np.clip(np.round(np.float32(d) * np.float32(n)), 0, n))


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


# --------------------------------------------------------------------------------------------
# trim

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("density", [0.2, 0.37, 1.0, 0.0])
def test_trim_tensor_scope(dtype, density):
    base, models = make_tree(1, dtype=dtype)
    out = jmerge.merge(chain(trim(density), weighted_sum()), base, models)
    refs = []
    for p, b, tau in np_taus(base, models):
        T, n = tau.shape[0], tau[0].size
        kept = np.stack([np.where(np_topk(np.abs(tau[t]).ravel(), k_round(density, n)).reshape(tau[t].shape),
                                  tau[t], 0) for t in range(T)])
        refs.append((p, b, kept.sum(0)))
    check_out(out, base, refs, dtype)


def test_trim_per_model_density_and_extras():
    base, models = make_tree(2)
    dens = [0.1, 0.5, 0.9]
    out, ex = jmerge.merge(chain(trim(), weighted_sum()), base, models,
                           hparams={"density": jmerge.PerModel(dens)}, return_extras=True)
    refs = []
    for (p, b, tau), m in zip(np_taus(base, models),
                              [ex["a"]["trim_mask"], ex["b"]["c"]["trim_mask"], ex["d"]["trim_mask"]]):
        n = tau[0].size
        masks = np.stack([np_topk(np.abs(tau[t]).ravel(), k_round(dens[t], n)).reshape(tau[t].shape)
                          for t in range(3)])
        np.testing.assert_array_equal(np.asarray(m), masks)
        assert [int(x.sum()) for x in masks] == [k_round(d, n) for d in dens]
        refs.append((p, b, np.where(masks, tau, 0).sum(0)))
    check_out(out, base, refs, np.float32)


@pytest.mark.parametrize("density", [0.2, 0.55])
def test_trim_global_scope(density):
    base, models = make_tree(3)
    out = jmerge.merge(chain(trim(density, scope="global"), weighted_sum()), base, models)
    taus = np_taus(base, models)
    T = 3
    flat = np.concatenate([np.abs(t).reshape(T, -1) for _, _, t in taus], axis=1)
    N = flat.shape[1]
    gmask = np.stack([np_topk(flat[t], k_round(density, N)) for t in range(T)])
    refs, off = [], 0
    for p, b, tau in taus:
        n = tau[0].size
        m = gmask[:, off:off + n].reshape(tau.shape)
        off += n
        refs.append((p, b, np.where(m, tau, 0).sum(0)))
    check_out(out, base, refs, np.float32)
    # global differs from per-tensor in general: per-leaf kept counts are not all round(density * n)
    per_leaf = [int(gmask[:, o:o + t[0].size].sum()) for o, t in
                zip(np.cumsum([0] + [t[0].size for _, _, t in taus])[:-1], [t for _, _, t in taus])]
    assert per_leaf != [T * k_round(density, t[0].size) for _, _, t in taus]


def test_trim_floor_rounding_matches_mergekit_rule():
    base, models = make_tree(4)
    out, ex = jmerge.merge(chain(trim(0.07, rounding="floor"), weighted_sum()), base, models, return_extras=True)
    # (7,): int(0.49) = 0 -> at least one kept; (16,12): int(13.44) = 13; (3,4,5): int(4.2) = 4
    assert np.asarray(ex["a"]["trim_mask"]).sum(axis=1).tolist() == [1, 1, 1]
    assert np.asarray(ex["b"]["c"]["trim_mask"]).reshape(3, -1).sum(axis=1).tolist() == [13] * 3
    assert np.asarray(ex["d"]["trim_mask"]).reshape(3, -1).sum(axis=1).tolist() == [4] * 3
    out = jmerge.merge(chain(trim(0.7, rounding="floor"), weighted_sum()), base, models, return_extras=True)[1]
    assert np.asarray(out["a"]["trim_mask"]).sum(axis=1).tolist() == [4] * 3  # int(0.7 * 7) = int(4.9)
    out = jmerge.merge(chain(trim(0.7, rounding="floor"), weighted_sum()), {"x": base["a"][:1].repeat(10)},
                       [{"x": m["a"][:1].repeat(10) + np.arange(10, dtype=np.float32)} for m in models],
                       return_extras=True)[1]
    assert np.asarray(out["x"]["trim_mask"]).sum(axis=1).tolist() == [7] * 3  # python: int(0.7 * 10) = 7


def test_trim_matches_mergekit_magnitude():
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify")
    base, models = make_tree(5)
    out = jmerge.merge(chain(trim(0.3, rounding="floor"), weighted_sum()), base, models)
    for (p, b, tau), o in zip(np_taus(base, models), leaves_with_paths(out)[1]):
        ref = sum(sp.magnitude(torch.from_numpy(tau[t].copy()), 0.3).numpy() for t in range(3))
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

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_formula_given_mask(dtype, rescale):
    base, models = make_tree(7, dtype=dtype)
    dens = [0.3, 0.6, 0.9]
    out, ex = jmerge.merge(chain(dare(rescale=rescale), weighted_sum()), base, models, seed=11,
                           hparams={"density": jmerge.PerModel(dens)}, return_extras=True)
    masks = [np.asarray(ex["a"]["dare_mask"]), np.asarray(ex["b"]["c"]["dare_mask"]), np.asarray(ex["d"]["dare_mask"])]
    refs = []
    for (p, b, tau), m in zip(np_taus(base, models), masks):
        assert m.dtype == bool and m.shape == tau.shape
        kept = np.where(m, tau, 0)
        if rescale == "inverse":
            kept = kept / np.asarray(dens, np.float32).reshape((3,) + (1,) * (tau.ndim - 1))
        elif rescale == "l1":
            f = np.abs(tau).reshape(3, -1).sum(1) / np.abs(kept).reshape(3, -1).sum(1)
            kept = kept * f.reshape((3,) + (1,) * (tau.ndim - 1))
        refs.append((p, b, kept.sum(0)))
    check_out(out, base, refs, dtype, atol=1e-5 if rescale == "l1" else 1e-6)  # rescaled sums of |x| ~ 10


def test_dare_l1_norms_match_exactly():
    base, models = make_tree(8)
    tv = jmerge.task_vectors(base, models)
    out = jmerge.merge(chain(dare(0.4, rescale="l1"), weighted_sum(jmerge.PerModel([1.0, 0.0, 0.0]))),
                       jax.tree.map(jnp.zeros_like, base), task_vectors=tv, seed=3)
    for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(tv)):
        np.testing.assert_allclose(np.abs(np.asarray(o)).sum(), np.abs(np.asarray(t[0])).sum(), rtol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.85])
def test_dare_drop_fraction_and_unbiased(density):
    n = 20000
    base = {"w": np.zeros((100, 200), np.float32)}
    models = [{"w": np.ones((100, 200), np.float32)}, {"w": np.full((100, 200), 2.0, np.float32)}]
    out, ex = jmerge.merge(chain(dare(density), weighted_sum(jmerge.PerModel([1.0, 0.0]))), base, models,
                           seed=5, return_extras=True)
    mask = np.asarray(ex["w"]["dare_mask"])
    sd = np.sqrt(n * density * (1 - density))
    for t in range(2):
        assert abs(mask[t].sum() - n * density) < 5 * sd
    assert not np.array_equal(mask[0], mask[1])  # tasks draw independently
    o = np.asarray(out["w"])
    assert set(np.unique(o).tolist()) <= {0.0, np.float32(1 / np.float32(density))}
    # E[kept / density] = tau = 1
    assert abs(o.mean() - 1.0) < 5 * np.sqrt((1 - density) / density / n)


def test_dare_same_seed_same_result_regardless_of_leaf_order():
    base, models = make_tree(9)
    m = chain(dare(0.5), weighted_sum())
    full = jmerge.merge(m, base, models, seed=42)
    again = jmerge.merge(m, base, models, seed=42)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # same leaf inside a tree with other leaves before it (different leaf index, same path)
    sub = {"b": base["b"], "aaa": np.ones((5,), np.float32), "0": np.ones((2, 2), np.float32)}
    sub_models = [{"b": mm["b"], "aaa": np.full((5,), 2.0, np.float32), "0": np.zeros((2, 2), np.float32)}
                  for mm in models]
    part = jmerge.merge(m, sub, sub_models, seed=42)
    np.testing.assert_array_equal(np.asarray(part["b"]["c"]), np.asarray(full["b"]["c"]))
    other = jmerge.merge(m, base, models, seed=43)
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


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.6, 0.1), (0.5, 0.0), (0.95, 0.2), (0.3, 0.05)])
def test_breadcrumbs(dtype, density, gamma):
    base, models = make_tree(10, dtype=dtype)
    out, ex = jmerge.merge(chain(breadcrumbs_drop(density, gamma), weighted_sum()), base, models, return_extras=True)
    masks = [ex["a"]["breadcrumbs_mask"], ex["b"]["c"]["breadcrumbs_mask"], ex["d"]["breadcrumbs_mask"]]
    refs = []
    for (p, b, tau), mm in zip(np_taus(base, models), masks):
        m = np.stack([np_breadcrumbs(tau[t], density, gamma) for t in range(3)])
        np.testing.assert_array_equal(np.asarray(mm), m)
        refs.append((p, b, np.where(m, tau, 0).sum(0)))
    check_out(out, base, refs, dtype)


def test_breadcrumbs_small_tensor_keeps_top_when_no_outlier():
    # (7,) leaf with gamma 0.01: int(0.07) = 0 outliers; the 6 largest (int(0.9 * 7)) are kept, not nothing.
    base, models = make_tree(11)
    _, ex = jmerge.merge(chain(breadcrumbs_drop(0.9, 0.01, rounding="floor"), weighted_sum()), base, models,
                         return_extras=True)
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
        out = jmerge.merge(chain(breadcrumbs_drop(d, g, rounding="floor"), weighted_sum()), base, models)
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
    return p.reshape(tau_t.shape)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_della_formula_given_mask(dtype, rescale):
    base, models = make_tree(13, dtype=dtype)
    dens, eps = [0.7, 0.5, 0.4], 0.15
    out, ex = jmerge.merge(chain(della_drop(rescale=rescale), weighted_sum()), base, models, seed=2,
                           hparams={"density": jmerge.PerModel(dens), "epsilon": eps}, return_extras=True)
    masks = [ex["a"]["della_mask"], ex["b"]["c"]["della_mask"], ex["d"]["della_mask"]]
    refs = []
    for (p, b, tau), mm in zip(np_taus(base, models), masks):
        m = np.asarray(mm)
        probs = np.stack([np_della_probs(tau[t], dens[t], eps) for t in range(3)])
        kept = np.where(m, tau, 0)
        if rescale == "inverse":
            kept = np.where(m, tau / probs, 0)
        elif rescale == "l1":
            f = np.abs(tau).reshape(3, -1).sum(1) / np.abs(kept).reshape(3, -1).sum(1)
            kept = kept * f.reshape((3,) + (1,) * (tau.ndim - 1))
        refs.append((p, b, kept.sum(0)))
    check_out(out, base, refs, dtype)


def test_della_keep_rates_follow_rank():
    # one row of 11 distinct magnitudes, many rows: keep rate of rank r ~ (d - e) + 2 e r / 10
    R, m, d, e = 4000, 11, 0.6, 0.3
    mags = np.arange(1, m + 1, dtype=np.float32)
    rng = np.random.default_rng(0)
    tau = np.stack([rng.permutation(mags) for _ in range(R)])
    base = {"w": np.zeros((R, m), np.float32)}
    _, ex = jmerge.merge(chain(della_drop(d, e), weighted_sum()), base, [{"w": tau}], seed=9, return_extras=True)
    mask = np.asarray(ex["w"]["della_mask"])[0]
    for r in range(m):
        rate = mask[tau == mags[r]].mean()
        p = d - e + 2 * e * r / (m - 1)
        assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / R) + 1e-9, (r, rate, p)
    # unbiased with inverse rescale: mean of kept/p ~ tau
    out = jmerge.merge(chain(della_drop(d, e), weighted_sum()), base, [{"w": tau}], seed=9)
    np.testing.assert_allclose(np.asarray(out["w"]).mean(axis=0).mean(), tau.mean(), rtol=0.02)


def test_della_same_seed_independent_of_leaf_order():
    base, models = make_tree(14)
    m = chain(della_drop(), weighted_sum())
    full = jmerge.merge(m, base, models, seed=7)
    part = jmerge.merge(m, {"d": base["d"], "0a": base["a"]}, [{"d": mm["d"], "0a": mm["a"]} for mm in models], seed=7)
    np.testing.assert_array_equal(np.asarray(part["d"]), np.asarray(full["d"]))
