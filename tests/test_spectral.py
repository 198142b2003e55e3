"""Tests of TSV-M, ISO-C and ISO-CTS against NumPy float64 references written from the papers' algorithms.

Tolerances are rtol/atol 1e-5: jmerge runs float32 SVDs, the reference float64 ones.
"""

import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.methods.spectral import iso_c, iso_cts, oversampled_rank, tsv_m, tsv_rank

TOL = dict(rtol=1e-5, atol=1e-5)


def make(T, seed=0):
    r = np.random.default_rng(seed)
    shapes = {"w": ((16, 12), np.float32), "b": ((7,), np.float32), "k": ((3, 4, 5), np.float32),
              "e": ((10, 6), ml_dtypes.bfloat16)}
    base = {k: r.normal(size=s).astype(dt) for k, (s, dt) in shapes.items()}
    models = [{k: (v.astype(np.float32) + 0.5 * r.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()}
              for _ in range(T)]
    return base, models


def taus(base, models, k):
    return [m[k].astype(np.float64) - base[k].astype(np.float64) for m in models]


def polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def ref_tsv_matrix(ts, frac=None):
    T = len(ts)
    m, n = ts[0].shape
    r = max(1, int(min(m, n) * (1.0 / T if frac is None else frac)))
    us, ss, vs = [], [], []
    for x in ts:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vt[:r])
    U, S, V = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    return polar(U) @ np.diag(S) @ polar(V.T).T


def ref_tsv(ts, frac=None):
    x = np.stack(ts)
    if x.ndim < 3:
        return x.mean(0)
    lead = x.shape[1:-2]
    flat = x.reshape((len(ts), -1) + x.shape[-2:])
    out = np.stack([ref_tsv_matrix(list(flat[:, i]), frac) for i in range(flat.shape[1])])
    return out.reshape(lead + x.shape[-2:])


def ref_iso(ts):
    x = np.stack(ts)
    if x.ndim < 3:
        return x.mean(0)
    M = x.sum(0)
    flat = M.reshape((-1,) + M.shape[-2:])
    outs = []
    for m in flat:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        outs.append(u @ np.diag(np.full_like(s, s.mean())) @ vt)
    return np.stack(outs).reshape(M.shape)


def compare(out, base, models, ref, scale):
    for k in base:
        exp = base[k].astype(np.float64) + scale * ref(taus(base, models, k))
        o = np.asarray(out[k])
        assert o.dtype == base[k].dtype
        if base[k].dtype == np.float32:
            np.testing.assert_allclose(o, exp, **TOL)
        else:
            np.testing.assert_allclose(o.astype(np.float32), exp.astype(base[k].dtype).astype(np.float32),
                                       rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T,scale", [(2, 1.0), (3, 0.7)])
def test_tsv_m_matches_reference(T, scale):
    base, models = make(T, seed=T)
    out = jmerge.merge(tsv_m(scale), base, models)
    compare(out, base, models, ref_tsv, scale)


def test_tsv_m_rank_fraction_and_rank_rule():
    base, models = make(2, seed=5)
    out = jmerge.merge(tsv_m(rank_fraction=0.25), base, models)
    compare(out, base, models, lambda ts: ref_tsv(ts, 0.25), 1.0)
    assert tsv_rank(12, 3) == 4 and tsv_rank(4, 8) == 1 and tsv_rank(10, 2, 1.0) == 10
    # one task with its full rank kept: the task vector is reproduced exactly
    out = jmerge.merge(tsv_m(rank_fraction=1.0), base, models[:1])
    for k in ["w", "k"]:
        np.testing.assert_allclose(np.asarray(out[k]), models[0][k], **TOL)


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_iso_c_matches_reference(scale):
    base, models = make(3, seed=11)
    out = jmerge.merge(iso_c(scale), base, models)
    compare(out, base, models, ref_iso, scale)


def test_iso_c_spectrum_is_flat():
    base, models = make(4, seed=12)
    out = jmerge.merge(iso_c(), base, models)
    delta = np.asarray(out["w"], np.float64) - base["w"]
    s = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-4)
    total = sum(taus(base, models, "w"))
    np.testing.assert_allclose(s.mean(), np.linalg.svd(total, compute_uv=False).mean(), rtol=1e-5)


def test_registered():
    for name in ["tsv_m", "iso_c"]:
        assert name in jmerge.available_methods()
        jmerge.available_methods()[name]()


# ------------------------------------------------------------------ ISO-CTS shapes, randomized SVD


def ref_iso_cts_matrix(ts, frac):
    """ISO-CTS as the paper writes it (float64): residual SVDs of τ_t − U_k U_kᵀ τ_t taken directly."""
    T, r = len(ts), min(ts[0].shape)
    kc = int(r * frac)
    total = round((r - kc) / T) * T
    total = total - T if total > r else total
    kc, d = r - total, total // T
    u, s, vt = np.linalg.svd(sum(ts), full_matrices=False)
    uc = u[:, :kc]
    us, ss, vs = [uc], [s[:kc]], [vt[:kc]]
    for x in ts:
        ut, st, vtt = np.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
        us.insert(-1, ut[:, :d]), ss.insert(-1, st[:d]), vs.insert(-1, vtt[:d])
    return np.concatenate(ss).mean() * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 0))


@pytest.mark.parametrize("shape", [(12, 20), (14, 14), (20, 12), (2, 9, 13)])
@pytest.mark.parametrize("frac", [0.8, 0.5, 1.0])
def test_iso_cts_wide_square_tall_and_stacked(shape, frac):
    # wide and square matrices take the small projected residual SVD; tall ones the direct one
    r = np.random.default_rng(len(shape) * 100 + shape[-1])
    base = {"w": r.normal(size=shape).astype(np.float32)}
    models = [{"w": (base["w"] + 0.5 * r.normal(size=shape)).astype(np.float32)} for _ in range(3)]
    out = np.asarray(jmerge.merge(iso_cts(1.5, common_fraction=frac), base, models)["w"], np.float64)
    ts = taus(base, models, "w")
    flat = [t.reshape((-1,) + shape[-2:]) for t in ts]
    ref = np.stack([ref_iso_cts_matrix([f[i] for f in flat], frac) for i in range(flat[0].shape[0])])
    # 1e-4: float32 SVDs truncated at d where the residual's singular values are close
    np.testing.assert_allclose(out, base["w"] + 1.5 * ref.reshape(shape), rtol=1e-4, atol=1e-4)


def low_rank_models(shape, T, rank, seed, noise=1e-4):
    r = np.random.default_rng(seed)
    base = {"w": r.normal(size=shape).astype(np.float32), "b": r.normal(size=(5,)).astype(np.float32)}
    models = []
    for _ in range(T):
        tau = r.normal(size=(shape[0], rank)) @ np.diag(np.linspace(3, 1, rank)) @ r.normal(size=(rank, shape[1]))
        tau = tau / np.sqrt(shape[0]) + noise * r.normal(size=shape)
        models.append({"w": (base["w"] + tau).astype(np.float32), "b": (base["b"] + r.normal(size=5)).astype(np.float32)})
    return base, models


def test_tsv_m_randomized_close_to_exact_on_low_rank_tasks():
    # each task's top-8 subspace is separated from the rest (noise 1e-4): the range finder finds it
    base, models = low_rank_models((64, 96), 3, 8, seed=1)
    exact = jmerge.merge(tsv_m(rank_fraction=0.125), base, models)
    rand = jmerge.merge(tsv_m(rank_fraction=0.125, svd="randomized", power_iters=1), base, models)
    d_e = np.asarray(exact["w"], np.float64) - base["w"]
    d_r = np.asarray(rand["w"], np.float64) - base["w"]
    assert np.linalg.norm(d_r - d_e) / np.linalg.norm(d_e) < 1e-3
    np.testing.assert_array_equal(np.asarray(rand["b"]), np.asarray(exact["b"]))
    compare(exact, base, models, lambda ts: ref_tsv(ts, 0.125), 1.0)
    # a flat spectrum (Gaussian task vectors) is where randomized truncation is worst: it differs
    r = np.random.default_rng(3)
    base = {"w": r.normal(size=(40, 60)).astype(np.float32)}
    models = [{"w": base["w"] + r.normal(size=(40, 60)).astype(np.float32)} for _ in range(3)]
    far = jmerge.merge(tsv_m(svd="randomized", power_iters=0), base, models)["w"]
    near = jmerge.merge(tsv_m(), base, models)["w"]
    assert np.abs(np.asarray(far) - np.asarray(near)).max() > 1e-2


def test_iso_cts_randomized_close_to_exact_on_tall_low_rank_tasks():
    # tall: the residual's top d = 12 from the range finder (22 columns of 40); tasks of rank 12
    base, models = low_rank_models((96, 40), 3, 12, seed=2)
    exact = jmerge.merge(iso_cts(common_fraction=0.1), base, models)
    rand = jmerge.merge(iso_cts(common_fraction=0.1, svd="randomized"), base, models)
    d_e = np.asarray(exact["w"], np.float64) - base["w"]
    d_r = np.asarray(rand["w"], np.float64) - base["w"]
    assert 0 < np.linalg.norm(d_r - d_e) / np.linalg.norm(d_e) < 1e-2


def test_svd_option_errors_and_static_key():
    for bad in [dict(svd="lanczos"), dict(power_iters=-1), dict(power_iters=1.5)]:
        with pytest.raises(jmerge.MergeInputError, match="svd|power_iters"):
            tsv_m(**bad)
        with pytest.raises(jmerge.MergeInputError, match="svd|power_iters"):
            iso_cts(**bad)
    # the exact path's step (its compile key) is what it was before the option existed
    assert dict(tsv_m().steps[0][1].static) == {"rank_fraction": None}
    assert dict(iso_cts().steps[0][1].static) == {"common_fraction": 0.8}
    assert oversampled_rank(8, 64) == 18 and oversampled_rank(100, 110) == 110
