"""Tests of SLERP, NuSLERP, multi-SLERP, Karcher, Model Stock and nearswap.

References: NumPy float64 implementations written from the formulas below (not calling jmerge), and
mergekit 0.1.5's own functions as an oracle on small torch tensors.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.methods.geometric import karcher, model_stock, multislerp, nearswap, nuslerp, slerp
from jmerge import MergeInputError

SHAPES = {"layers": {"0": {"w": (16, 12)}, "1": {"b": (7,)}}, "head": {"k": (3, 4, 5)}}
RTOL, ATOL = 2e-6, 1e-6          # float32 vs float64 reference
BF_RTOL, BF_ATOL = 1e-2, 1e-2     # one bfloat16 ulp is 2**-8 relative


def make(T, seed=0, spread=0.3, bf16_leaf=True):
    r = np.random.default_rng(seed)

    def tree(f):
        return {"layers": {"0": {"w": f((16, 12), np.float32)}, "1": {"b": f((7,), np.float32)}},
                "head": {"k": f((3, 4, 5), ml_dtypes.bfloat16 if bf16_leaf else np.float32)}}

    base = tree(lambda s, dt: r.normal(size=s).astype(dt))
    models = [tree(lambda s, dt: None) for _ in range(T)]
    for m in models:
        for k1, k2 in [("layers", "0"), ("layers", "1")]:
            for k3 in m[k1][k2]:
                b = base[k1][k2][k3]
                m[k1][k2][k3] = (b + spread * r.normal(size=b.shape)).astype(b.dtype)
        b = base["head"]["k"]
        m["head"]["k"] = (b.astype(np.float32) + spread * r.normal(size=b.shape)).astype(b.dtype)
    return base, models


def leaves(tree):
    return [tree["layers"]["0"]["w"], tree["layers"]["1"]["b"], tree["head"]["k"]]


def check(out, base, models, ref, **kw):
    """Compare each merged leaf with ``ref(base64, [model64...]) -> theta`` (float64)."""
    for i, (o, b) in enumerate(zip(leaves(out), leaves(base))):
        ms = [leaves(m)[i].astype(np.float64) for m in models]
        exp = ref(b.astype(np.float64), ms, **kw)
        assert o.dtype == b.dtype
        if b.dtype == np.float32:
            np.testing.assert_allclose(np.asarray(o), exp, rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_allclose(np.asarray(o, np.float32), exp.astype(b.dtype).astype(np.float32),
                                       rtol=BF_RTOL, atol=BF_ATOL)


# ------------------------------------------------------------------------------------------
# NumPy references, from the formulas

def ref_slerp(b, ms, t):
    a, c = b.reshape(-1), ms[0].reshape(-1)
    ua, uc = a / np.linalg.norm(a), c / np.linalg.norm(c)
    d = np.clip(ua @ uc, -1, 1)
    if abs(d) > 0.9995:
        r = (1 - t) * a + t * c
    else:
        th = np.arccos(d)
        r = (np.sin((1 - t) * th) * a + np.sin(t * th) * c) / np.sin(th)
    return r.reshape(b.shape)


def _np_nuslerp(t, v0, v1, axis):
    u0 = v0 / np.linalg.norm(v0, axis=axis, keepdims=True)
    u1 = v1 / np.linalg.norm(v1, axis=axis, keepdims=True)
    c = np.clip(np.sum(u0 * u1, axis=axis, keepdims=True), -1, 1)
    th = np.arccos(c)
    return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)


def ref_nuslerp(b, ms, w=(1.0, 1.0), flatten=True, row_wise=False, base_relative=False):
    t = w[1] / (w[0] + w[1])
    v0, v1 = ms
    if base_relative:
        v0, v1 = v0 - b, v1 - b
    if flatten or b.ndim <= 1:
        r = _np_nuslerp(t, v0.reshape(-1), v1.reshape(-1), -1).reshape(b.shape)
    else:
        r = _np_nuslerp(t, v0, v1, 0 if row_wise else -1)
    return r + b if base_relative else r


def ref_multislerp(b, ms, w=None, base_relative=False):
    x = np.stack([m - b if base_relative else m for m in ms]).reshape(len(ms), -1)
    w = np.ones(len(ms)) if w is None else np.asarray(w, np.float64)
    w = w / w.sum()
    n = np.linalg.norm(x, axis=1)
    u = x / n[:, None]
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    tang = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    tn = np.linalg.norm(tang)
    r = (np.cos(tn) * m + np.sin(tn) * tang / tn) * (w @ n)
    r = r.reshape(b.shape)
    return r + b if base_relative else r


def ref_karcher(b, ms, iters=200):
    x = np.stack(ms).reshape(len(ms), -1)
    n = np.linalg.norm(x, axis=1)
    u = x / n[:, None]
    a = np.full(len(ms), 1.0 / len(ms))
    m = (a[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    for _ in range(iters):  # Riemannian gradient descent to convergence
        c = np.clip(u @ m, -1, 1)
        th = np.arccos(c)
        v = (a * th / np.sin(th))[:, None] * (u - c[:, None] * m)
        g = v.sum(0)
        gn = np.linalg.norm(g)
        if gn < 1e-12:
            break
        m = np.cos(gn) * m + np.sin(gn) * g / gn
        m /= np.linalg.norm(m)
    return ((a @ n) * m).reshape(b.shape)


def ref_model_stock(b, ms, filter_wise=False):
    T = len(ms)
    taus = [m - b for m in ms]
    if filter_wise:
        cs = [np.sum(taus[i] * taus[j], -1) / (np.linalg.norm(taus[i], axis=-1) * np.linalg.norm(taus[j], axis=-1))
              for i in range(T) for j in range(i + 1, T)]
        c = np.mean(cs, axis=0)[..., None]
    else:
        f = [x.reshape(-1) for x in taus]
        c = np.mean([f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j]))
                     for i in range(T) for j in range(i + 1, T)])
    t = T * c / (1 + (T - 1) * c)
    return t * np.mean(ms, axis=0) + (1 - t) * b


def ref_nearswap(b, ms, t):
    d = np.abs(ms[0] - b)
    w = np.clip(t / np.maximum(d, 1e-6), 0, 1)
    return w * ms[0] + (1 - w) * b


# ------------------------------------------------------------------------------------------
# Against the references

@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(t):
    base, models = make(1, seed=1, spread=1.0)
    out = jmerge.merge(slerp(t), base, models)
    check(out, base, models, ref_slerp, t=t)


def test_slerp_endpoints_exact():
    base, models = make(1, seed=2, spread=1.0)
    out0 = jmerge.merge(slerp(0.0), base, models)
    out1 = jmerge.merge(slerp(1.0), base, models)
    for o, b in zip(leaves(out0), leaves(base)):
        np.testing.assert_array_equal(np.asarray(o), b)
    for o, m in zip(leaves(out1), leaves(models[0])):
        np.testing.assert_allclose(np.asarray(o, np.float32), m.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_slerp_linear_fallback_and_gradient():
    r = np.random.default_rng(3)
    b = r.normal(size=(64,)).astype(np.float32)
    perp = r.normal(size=64)
    perp -= (perp @ b) / (b @ b) * b
    perp /= np.linalg.norm(perp)
    for angle, linear in [(0.0245, True), (0.0330, False)]:  # cos 0.99970 (linear) / 0.99946 (spherical)
        c = (1.5 * b + 1.5 * angle * np.linalg.norm(b) * perp).astype(np.float32)
        cos = (b @ c) / np.linalg.norm(b) / np.linalg.norm(c)
        assert (cos > 0.9995) == linear
        out = np.asarray(jmerge.merge(slerp(0.25), {"x": b}, [{"x": c}])["x"])
        lin = 0.75 * b.astype(np.float64) + 0.25 * c
        np.testing.assert_allclose(out, ref_slerp(b.astype(np.float64), [c.astype(np.float64)], t=0.25),
                                   rtol=RTOL, atol=ATOL)
        assert np.allclose(out, lin, rtol=RTOL, atol=ATOL) == linear
    # per-layer t (mergekit gradient): layer 0 gets t=0 (base), layer 2 of 3 gets t=1 (model)
    base = {"layers": {str(i): r.normal(size=(5, 4)).astype(np.float32) for i in range(3)}}
    ft = {"layers": {k: v + r.normal(size=v.shape).astype(np.float32) for k, v in base["layers"].items()}}
    out = jmerge.merge(slerp(), base, [ft], hparams={"t": jmerge.Gradient([0.0, 1.0])})
    np.testing.assert_array_equal(np.asarray(out["layers"]["0"]), base["layers"]["0"])
    np.testing.assert_allclose(np.asarray(out["layers"]["1"]),
                               ref_slerp(base["layers"]["1"].astype(np.float64), [ft["layers"]["1"]], t=0.5),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["layers"]["2"]), ft["layers"]["2"], rtol=1e-6, atol=1e-6)


def test_slerp_model_count_errors():
    base, models = make(2)
    with pytest.raises(MergeInputError):
        jmerge.merge(slerp(), base, models)
    with pytest.raises(MergeInputError, match="SLERP needs two models"):
        jmerge.merge_leaf(slerp(), base["layers"]["1"]["b"], [m["layers"]["1"]["b"] for m in models],
                          hp={"slerp.t": 0.5}, path="x")


@pytest.mark.parametrize("kw", [dict(), dict(flatten=False), dict(flatten=False, row_wise=True),
                                dict(base_relative=True)])
def test_nuslerp_matches_reference(kw):
    base, models = make(2, seed=4, spread=1.0)
    out = jmerge.merge(nuslerp(**kw), base, models, hparams={"weight": jmerge.PerModel([0.3, 0.9])})
    check(out, base, models, ref_nuslerp, w=(0.3, 0.9), **kw)


@pytest.mark.parametrize("base_relative", [False, True])
def test_multislerp_matches_reference(base_relative):
    base, models = make(3, seed=5, spread=1.0)
    w = [0.2, 0.5, 0.9]
    out = jmerge.merge(multislerp(base_relative=base_relative), base, models,
                       hparams={"weight": jmerge.PerModel(w)})
    check(out, base, models, ref_multislerp, w=w, base_relative=base_relative)


def test_karcher_matches_reference_and_two_point_slerp():
    base, models = make(3, seed=6, spread=1.0, bf16_leaf=False)
    out = jmerge.merge(karcher(max_iter=50, tol=1e-7), base, models)
    check(out, base, models, ref_karcher)
    # Karcher mean of two points lies in the slerp(0.5) direction between them.
    base2, m2 = make(2, seed=7, spread=2.0, bf16_leaf=False)
    out2 = jmerge.merge(karcher(), base2, m2)
    for i, o in enumerate(leaves(out2)):
        a, c = leaves(m2[0])[i].reshape(-1).astype(np.float64), leaves(m2[1])[i].reshape(-1).astype(np.float64)
        ua, uc = a / np.linalg.norm(a), c / np.linalg.norm(c)
        mid = (ua + uc) / np.linalg.norm(ua + uc)  # slerp(0.5) of unit vectors
        o = np.asarray(o, np.float64).reshape(-1)
        np.testing.assert_allclose(o / np.linalg.norm(o), mid, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(o), (np.linalg.norm(a) + np.linalg.norm(c)) / 2, rtol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(filter_wise):
    base, models = make(3, seed=8, spread=0.5)
    out = jmerge.merge(model_stock(filter_wise=filter_wise), base, models)
    check(out, base, models, ref_model_stock, filter_wise=filter_wise)


def test_model_stock_identical_and_errors():
    base, models = make(1, seed=9, bf16_leaf=False)
    out = jmerge.merge(model_stock(), base, [models[0], models[0], models[0]])
    for o, m in zip(leaves(out), leaves(models[0])):
        np.testing.assert_allclose(np.asarray(o), m, rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeInputError):
        jmerge.merge(model_stock(), base, models)


@pytest.mark.parametrize("t", [1e-4, 0.05, 0.5])
def test_nearswap_matches_reference(t):
    base, models = make(1, seed=10, spread=0.3)
    out = jmerge.merge(nearswap(t), base, models)
    check(out, base, models, ref_nearswap, t=t)


def test_registered_and_no_recompile_on_new_t():
    for name in ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap"]:
        assert name in jmerge.available_methods()
    base, models = make(1, seed=11)
    jmerge.merge(slerp(0.2), base, models)
    n = jmerge.trace_count()
    jmerge.merge(slerp(0.7), base, models)
    assert jmerge.trace_count() == n


# ------------------------------------------------------------------------------------------
# mergekit as an oracle

def _torch_pair(seed, shape=(6, 5)):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(4)]


def _jm(method, base, models, **kw):
    out = jmerge.merge(method, {"x": base.numpy()}, [{"x": m.numpy()} for m in models], **kw)
    return np.asarray(out["x"])


def test_mergekit_slerp_nuslerp_nearswap():
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
    from mergekit.merge_methods.slerp import slerp as mk_slerp
    from mergekit.merge_methods.nearswap import nearswap_merge
    from mergekit.merge_methods.base import TensorGroup
    b, x, y, _ = _torch_pair(0)
    for t in [0.0, 0.3, 0.8]:
        exp = mk_slerp(torch.tensor([t]), b[None], x[None])[0].numpy()
        np.testing.assert_allclose(_jm(slerp(t), b, [x]), exp, rtol=1e-5, atol=1e-5)
    for kw, mk in [(dict(), dict(flatten=True)), (dict(flatten=False), dict()),
                   (dict(flatten=False, row_wise=True), dict(dim=0))]:
        t = 0.9 / 1.2
        exp = mk_nuslerp(t, x, y, **mk).numpy()
        got = _jm(nuslerp(**kw), b, [x, y], hparams={"weight": jmerge.PerModel([0.3, 0.9])})
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
        exp = (b + mk_nuslerp(t, x - b, y - b, **mk)).numpy()
        got = _jm(nuslerp(base_relative=True, **kw), b, [x, y], hparams={"weight": jmerge.PerModel([0.3, 0.9])})
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    for t in [0.1, 0.7]:
        exp = nearswap_merge.implementation(TensorGroup.from_tensors([b, x], base_index=0), t=t).numpy()
        np.testing.assert_allclose(_jm(nearswap(t), b, [x]), exp, rtol=1e-5, atol=1e-6)


def test_mergekit_multislerp_karcher_model_stock():
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.base import PerInputValues, TensorGroup
    from mergekit.merge_methods.karcher import karcher_merge_method
    from mergekit.merge_methods.model_stock import model_stock_merge_method
    from mergekit.merge_methods.multislerp import multislerp as mk_multislerp
    b, x, y, z = _torch_pair(1)
    w = [0.2, 0.5, 0.9]
    for base_relative in [False, True]:
        if base_relative:
            g = TensorGroup.from_tensors([b, x, y, z], base_index=0)
            ids = [1, 2, 3]
        else:
            g = TensorGroup.from_tensors([x, y, z])
            ids = [0, 1, 2]
        exp = mk_multislerp.implementation(g, weight=PerInputValues(list(zip(ids, w)))).numpy()
        got = _jm(multislerp(base_relative=base_relative), b, [x, y, z], hparams={"weight": jmerge.PerModel(w)})
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    exp = karcher_merge_method.implementation(TensorGroup.from_tensors([x, y, z]), max_iter=10, tol=1e-5).numpy()
    np.testing.assert_allclose(_jm(karcher(), b, [x, y, z]), exp, rtol=1e-5, atol=1e-5)
    zero = torch.zeros_like(y)  # a zero tensor does not steer the direction but counts in the norm
    exp = karcher_merge_method.implementation(TensorGroup.from_tensors([x, zero, z]), max_iter=10, tol=1e-5).numpy()
    np.testing.assert_allclose(_jm(karcher(), b, [x, zero, z]), exp, rtol=1e-5, atol=1e-5)
    for fw in [False, True]:
        exp = model_stock_merge_method.implementation(TensorGroup.from_tensors([b, x, y, z], base_index=0),
                                                      filter_wise=fw).numpy()
        np.testing.assert_allclose(_jm(model_stock(filter_wise=fw), b, [x, y, z]), exp, rtol=1e-5, atol=1e-5)


def test_inside_user_jit_with_traced_t():
    import jax
    base, models = make(1, seed=12, spread=1.0, bf16_leaf=False)
    f = jax.jit(lambda t: jmerge.merge(slerp(), base, models, hparams={"t": t}))
    out = f(jnp.float32(0.4))
    check(out, base, models, ref_slerp, t=0.4)
