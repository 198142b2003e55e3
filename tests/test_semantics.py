"""Semantics chosen to follow the papers and the authors' code, each against a NumPy reference:
EMR's whole-model rescaler, the Consensus authors' TIES, DARE-TIES with a trim, TIES' int(k*n)+1,
ISO-CTS, MagMax's tie rule, Model Stock's two angle averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError
from tests._trees import np_taus, random_trees

SHAPES = {"layers.0.attn.w": (16, 12), "layers.0.norm": (7,), "layers.1.attn.w": (16, 12), "layers.1.mlp.w": (3, 4, 5)}


def _flat(tree):
    paths, leaves, _ = jmerge.leaves_with_paths(tree)
    return dict(zip(paths, [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in leaves]))


def _ex(extras, key):
    get = jax.tree.map(lambda e: e[key], extras, is_leaf=lambda x: isinstance(x, dict) and key in x)
    paths, leaves, _ = jmerge.leaves_with_paths(get)
    return dict(zip(paths, [np.asarray(x) for x in leaves]))


def _topk_flat(x, k):
    m = np.zeros(x.shape, bool)
    m[np.argsort(-np.abs(x), kind="stable")[:k]] = True
    return m


# ------------------------------------------------------------------ EMR


def _emr_parts(tau):
    gamma = np.sign(tau.sum(0))
    masks = tau * gamma[None] > 0
    uni = gamma * np.where(masks, np.abs(tau), 0).max(0)
    ax = tuple(range(1, tau.ndim))
    return uni, masks, np.abs(tau).sum(ax), np.where(masks, np.abs(uni)[None], 0).sum(ax)


@pytest.mark.parametrize("scope", ["model", "model_sum"])
def test_emr_whole_model_rescalers(scope):
    base, models = random_trees(T=3, seed=1, shapes=SHAPES)
    default = jmerge.emr_merge()
    assert dict(default.steps[0][1].static)["scope"] == "model"  # the paper's and authors' whole-model ratio
    out, ex = jmerge.merge(jmerge.emr_merge(scope), base, models, return_extras=True)
    parts = {p: _emr_parts(t.astype(np.float64)) for p, _, t in np_taus(base, models)}
    sizes = {p: t[0].size for p, _, t in np_taus(base, models)}
    d = (lambda p: sizes[p]) if scope == "model" else (lambda p: 1)
    s = sum(parts[p][2] / d(p) for p in parts) / sum(parts[p][3] / d(p) for p in parts)
    for p, r in _ex(ex, "emr_rescalers").items():
        np.testing.assert_allclose(r, s, rtol=1e-5)
    per_task = jmerge.emr_task_models(base, models, scope=scope)
    fb = _flat(base)
    for i in range(3):
        for p in fb:
            ref = fb[p] + s[i] * parts[p][1][i] * parts[p][0]
            np.testing.assert_allclose(_flat(per_task[i])[p], ref, rtol=1e-5, atol=1e-6)
    if scope == "model_sum":
        s_mean = sum(parts[p][2] / sizes[p] for p in parts) / sum(parts[p][3] / sizes[p] for p in parts)
        assert not np.allclose(s, s_mean)  # the two whole-model ratios are different numbers


# ------------------------------------------------------------------ Consensus TIES, authors' version


def _ref_consensus_ties_authors(taus, k_min, lam, density):
    """The Consensus authors' code on the flattened model: TIES (global top-k keeping int(d*N)+1,
    sign of the sum, disjoint sum), TALL masks |tau_t| > lam |merged - tau_t|, count >= k."""
    flat = np.concatenate([t.reshape(t.shape[0], -1) for t in taus], axis=1)
    T, N = flat.shape
    kk = int(density * N) + 1
    trimmed = np.stack([np.where(_topk_flat(flat[t], kk), flat[t], 0) for t in range(T)])
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = np.where(agree, trimmed, 0).sum(0)
    masks = np.abs(flat) > lam * np.abs(merged[None] - flat)
    return np.where(masks.sum(0) >= k_min, merged, 0.0)


def test_consensus_ties_authors_variant_matches_numpy():
    base, models = random_trees(T=3, seed=2, shapes=SHAPES)
    out = jmerge.merge(jmerge.consensus_ties(k=2, lambda_=0.4, density=0.2, scale=0.7, variant="authors"), base, models)
    got = _flat(out)
    fb = _flat(base)
    ts = [t.astype(np.float64) for _, _, t in np_taus(base, models)]
    paths = [p for p, _, _ in np_taus(base, models)]
    ref = _ref_consensus_ties_authors(ts, 2, 0.4, 0.2)
    off = 0
    for p, t in zip(paths, ts):
        n = t[0].size
        np.testing.assert_allclose(got[p].reshape(-1), fb[p].reshape(-1) + 0.7 * ref[off:off + n], rtol=1e-5, atol=1e-6,
                                   err_msg=p)
        off += n
    # and it differs from jmerge's default variant on the same inputs
    dflt = _flat(jmerge.merge(jmerge.consensus_ties(k=2, lambda_=0.4, density=0.2, scale=0.7), base, models))
    assert any(not np.allclose(dflt[p], got[p]) for p in paths)


def test_consensus_ties_options_are_checked():
    with pytest.raises(MergeInputError, match="variant must be"):
        jmerge.consensus_ties(variant="paper")
    m = jmerge.consensus_ties(variant="authors", scope="tensor")
    assert dict(m.step("trim").static)["scope"] == "tensor" and dict(m.step("trim").static)["rounding"] == "authors"


# ------------------------------------------------------------------ DARE-TIES with a trim


def test_dare_ties_trims_after_the_drop():
    base, models = random_trees(T=3, seed=3, shapes={"w": (20, 30)})
    m = jmerge.dare_ties(density=0.5, trim_density=0.2)
    assert [n for n, _ in m.steps] == ["dare", "trim", "elect_sign", "disjoint_merge", "scale"]
    out, ex = jmerge.merge(m, base, models, return_extras=True, seed=4)
    (_, b, tau), = np_taus(base, models)
    dm = np.asarray(ex["w"]["dare_mask"])
    dropped = np.where(dm, tau / 0.5, 0.0).reshape(3, -1)
    k = int(np.round(0.2 * dropped.shape[1]))
    trimmed = np.stack([np.where(_topk_flat(dropped[t], k), dropped[t], 0) for t in range(3)])
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    ref = np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(np.asarray(out["w"]).reshape(-1), b.reshape(-1) + ref, rtol=1e-5, atol=1e-6)
    assert np.asarray(ex["w"]["trim_mask"]).reshape(3, -1).sum(1).tolist() == [k] * 3


# ------------------------------------------------------------------ TIES: the authors' int(k*n)+1


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_authors_rounding_keeps_one_more(scope):
    base, models = random_trees(T=3, seed=5, shapes=SHAPES)
    _, ex = jmerge.merge(jmerge.ties(density=0.2, rounding="authors", scope=scope), base, models, return_extras=True)
    masks = _ex(ex, "trim_mask")
    taus = dict((p, t) for p, _, t in np_taus(base, models))
    if scope == "tensor":
        for p, m in masks.items():
            n = m[0].size
            assert m.reshape(3, -1).sum(1).tolist() == [int(0.2 * n) + 1] * 3, p
            for t in range(3):
                np.testing.assert_array_equal(m[t].reshape(-1), _topk_flat(taus[p][t].reshape(-1), int(0.2 * n) + 1))
    else:
        N = sum(m[0].size for m in masks.values())
        total = sum(m.reshape(3, -1).sum(1) for m in masks.values())
        assert total.tolist() == [int(0.2 * N) + 1] * 3
        flat = np.concatenate([taus[p].reshape(3, -1) for p in masks], axis=1)
        got = np.concatenate([masks[p].reshape(3, -1) for p in masks], axis=1)
        for t in range(3):
            np.testing.assert_array_equal(got[t], _topk_flat(flat[t], int(0.2 * N) + 1))


# ------------------------------------------------------------------ ISO-CTS


def _polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def _ref_iso_cts(ts, frac):
    """ISO-CTS from the paper, float64 (common subspace of the sum + per-task residual subspaces)."""
    T = len(ts)
    r = min(ts[0].shape)
    kc = int(r * frac)
    total = round((r - kc) / T) * T
    if total > r:
        total -= T
    kc, d = r - total, total // T
    u, s, vt = np.linalg.svd(sum(ts), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vt[:kc]
    us, ss, vs = [], [], []
    for x in ts:
        ut, st, vtt = np.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
        us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vtt[:d])
    U = _polar(np.concatenate(us + [uc], axis=1))
    V = _polar(np.concatenate(vs + [vc], axis=0))
    S = np.concatenate(ss + [sc]).mean()
    return S * U @ V


@pytest.mark.parametrize("T,frac", [(3, 0.8), (2, 0.5), (4, 0.0)])
def test_iso_cts_matches_numpy(T, frac):
    base, models = random_trees(T=T, seed=6, shapes={"w": (16, 12), "v": (7,)})
    out = _flat(jmerge.merge(jmerge.iso_cts(scale=1.5, common_fraction=frac), base, models))
    for p, b, t in np_taus(base, models):
        t = t.astype(np.float64)
        if t.ndim == 2:  # a vector leaf: mean
            ref = b + 1.5 * t.mean(0)
        else:
            ref = b + 1.5 * _ref_iso_cts(list(t), frac)
        np.testing.assert_allclose(out[p], ref, rtol=1e-5, atol=1e-5, err_msg=p)


def test_iso_cts_sizes_follow_the_authors():
    assert jmerge.iso_cts_sizes(12, 3, 0.8) == (9, 1)  # int(9.6)=9, round(3/3)*3 = 3 -> k = 9
    assert jmerge.iso_cts_sizes(768, 8, 0.8) == (616, 19)
    assert jmerge.iso_cts_sizes(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 per task would exceed: one less


# ------------------------------------------------------------------ MagMax ties, Model Stock averages


def test_magmax_tie_rule():
    base = {"w": jnp.zeros(4)}
    models = [{"w": jnp.array([1.0, -2.0, 3.0, 0.5])}, {"w": jnp.array([-1.0, 2.0, 1.0, -0.5])}]
    last = jmerge.merge(jmerge.magmax(scale=1.0), base, models)["w"]
    first = jmerge.merge(jmerge.magmax(scale=1.0, tie="first"), base, models)["w"]
    np.testing.assert_array_equal(np.asarray(last), [-1.0, 2.0, 3.0, -0.5])  # authors: the latest task wins
    np.testing.assert_array_equal(np.asarray(first), [1.0, -2.0, 3.0, 0.5])


def test_model_stock_angle_and_cosine_averages():
    base, models = random_trees(T=3, seed=7, shapes={"w": (9, 8)})
    (_, b, tau), = np_taus(base, models)
    x = tau.reshape(3, -1).astype(np.float64)
    cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    for average, c in (("cosine", np.mean(cos)), ("angle", np.cos(np.mean(np.arccos(cos))))):
        t = 3 * c / (1 + 2 * c)
        out = jmerge.merge(jmerge.model_stock(average=average), base, models)["w"]
        np.testing.assert_allclose(np.asarray(out), b + t * tau.mean(0), rtol=1e-5, atol=1e-6, err_msg=average)
    two = [jmerge.merge(jmerge.model_stock(average=a), base, models[:2])["w"] for a in ("cosine", "angle")]
    np.testing.assert_allclose(np.asarray(two[0]), np.asarray(two[1]), rtol=1e-6, atol=1e-6)
