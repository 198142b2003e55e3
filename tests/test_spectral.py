"""Tests of TSV-M and ISO-C against NumPy float64 references written from the papers' algorithms.

Tolerances are rtol/atol 1e-5: jmerge runs float32 SVDs, the reference float64 ones.
"""

import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.methods.spectral import iso_c, tsv_m, tsv_rank

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
