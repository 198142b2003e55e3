"""Tests of Arcee Fusion (``arcee_fusion``), RAM (``ram``) and tensor-local RAM+ (``ramplus_tl``).

References: NumPy float64 implementations written from the formulas (below; they do not call jmerge),
random tensors of several shapes; mergekit 0.1.5's registry for parameter names and defaults (the
numeric comparison with mergekit is in ``tests/test_mergekit_parity.py``).

Formulas (``τ_t = θ_t − θ_0``):
* Arcee Fusion: ``s = |τ| · KL(p ‖ q)`` with ``p``, ``q`` the softmax of ``θ_1``, ``θ_0`` over the last
  axis plus 1e-8; ``thr = Q2 + k (Q3 − Q1)``, ``Q`` the sorted ``s`` at ``floor(q (n − 1))``;
  ``θ = θ_0 + τ [s ≥ thr]``.
* RAM: ``c = Σ_t [|τ_t| > ε]``; ``θ = θ_0 + Σ_t [|τ_t| > ε] τ_t λ_t`` where ``c = 1`` and
  ``θ_0 + Σ_t [|τ_t| > ε] τ_t / c`` where ``c > 1`` (``λ_t = 1``).
* RAM+: ``λ_t = 1 + r clip(shared_t / max(unique_t, ε), 0, α)``, counts of model ``t``'s changed
  entries with ``c > 1`` / ``c = 1`` in the tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError, arcee_fusion, fusion_importance, ram, ramplus_tl
from jmerge.mergekit import MERGEKIT_METHODS, parse_config

SHAPES = {"w": (16, 12), "b": (7,), "k": (3, 4, 5), "big": (64, 100), "col": (5, 1), "one": (1,)}
RTOL, ATOL = 1e-6, 1e-7


def make(T, seed=0, shapes=SHAPES, scale=1.0, spread=0.3, density=None, floor=0.0):
    """Float32 base and T models; with ``density`` each model changes that fraction of entries by
    ``spread`` noise and the rest by ``floor`` noise."""
    r = np.random.default_rng(seed)
    base = {k: (scale * r.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    models = []
    for t in range(T):
        m = {}
        for k, b in base.items():
            d = spread * r.normal(size=b.shape)
            if density is not None:
                dens = density[t] if isinstance(density, (list, tuple)) else density
                d = np.where(r.random(b.shape) < dens, d, floor * r.normal(size=b.shape))
            m[k] = (b + d).astype(np.float32)
        models.append(m)
    return base, models


# ------------------------------------------------------------------------------------------
# NumPy references (float64), from the formulas

def _softmax64(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_importance(b, m):
    b, m = np.asarray(b, np.float64), np.asarray(m, np.float64)
    if b.ndim == 0 or b.shape[-1] == 1:
        return np.zeros(b.shape)
    p, q = _softmax64(m) + 1e-8, _softmax64(b) + 1e-8
    return np.abs(m - b) * np.sum(p * np.log(p / q), -1, keepdims=True)


def _quartiles(v):
    s = np.sort(v.ravel())
    return [s[int(q * (s.size - 1))] for q in (0.25, 0.5, 0.75)]


def ref_fusion(b, m, k):
    """(mask, ambiguous): the float64 mask, and entries a 1e-5 relative error of the importances could flip."""
    s = ref_importance(b, m)
    q1, q2, q3 = _quartiles(s)
    mask = s >= q2 + k * (q3 - q1)
    err = 1e-5 * np.abs(s)
    lo, hi = _quartiles(s - err), _quartiles(s + err)
    t_lo, t_hi = lo[1] + k * (lo[2] - hi[0]), hi[1] + k * (hi[2] - lo[0])
    return mask, (s + err >= t_lo) & (s - err <= t_hi)


def ref_ram(b, ms, eps, r=None, alpha=None):
    """(theta, lambda): RAM (``r is None``) or RAM+; contributions tested on the float32 task vectors."""
    tau32 = np.stack([m - b for m in ms])  # float32, as the merge builds them
    nz = np.abs(tau32) > np.float32(eps)
    tau = tau32.astype(np.float64)
    c = nz.sum(0)
    T = len(ms)
    lam = np.ones(T)
    if r is not None:
        for t in range(T):
            shared, unique = np.sum(nz[t] & (c > 1)), np.sum(nz[t] & (c == 1))
            lam[t] = 1 + r * np.clip(shared / max(unique, eps), 0, alpha)
    lam_b = lam.reshape((T,) + (1,) * b.ndim)
    uniq = np.sum(np.where(nz, tau * lam_b, 0), 0)
    avg = np.sum(np.where(nz, tau, 0), 0) / np.maximum(c, 1)
    merged = np.where(c == 1, uniq, np.where(c > 1, avg, 0.0))
    return b.astype(np.float64) + merged, lam


# ------------------------------------------------------------------------------------------
# Arcee Fusion

@pytest.mark.parametrize("scale,spread", [(1.0, 0.3), (0.02, 1e-3), (3.0, 2.0)])
def test_fusion_importance_matches_reference(scale, spread):
    base, (model,) = make(1, seed=1, scale=scale, spread=spread)
    for k in base:
        got = np.asarray(jax.jit(fusion_importance)(model[k], base[k]))
        np.testing.assert_allclose(got, ref_importance(base[k], model[k]), rtol=2e-5, atol=1e-30, err_msg=k)


def test_fusion_importance_near_identical_rows_is_accurate():
    """KL of nearly equal rows (~1e-9) far below float32's rounding of a plain ``sum p log(p / q)``."""
    r = np.random.default_rng(2)
    b = (0.02 * r.normal(size=(8, 4096))).astype(np.float32)
    m = (b + 1e-4 * r.normal(size=b.shape)).astype(np.float32)
    ref = ref_importance(b, m)
    assert np.median(ref / np.maximum(np.abs(m - b), 1e-30)) < 1e-8
    np.testing.assert_allclose(np.asarray(fusion_importance(m, b)), ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("k", [0.0, 0.7, 1.5, 3.0])
@pytest.mark.parametrize("scale,spread", [(1.0, 0.3), (0.02, 1e-3)])
def test_arcee_fusion_matches_reference(k, scale, spread):
    base, models = make(1, seed=3, scale=scale, spread=spread)
    out, extras = jmerge.merge(arcee_fusion(k), base, models, return_extras=True)
    n_amb = n_all = 0
    for name, b in base.items():
        m = models[0][name]
        mask, amb = ref_fusion(b, m, k)
        got_mask = np.asarray(extras[name]["fusion_mask"])
        np.testing.assert_array_equal(got_mask[~amb], mask[~amb], err_msg=name)
        expect = np.where(got_mask, b + (m - b), b)  # float32, as the merge adds the kept task vector
        np.testing.assert_array_equal(np.asarray(out[name]), expect, err_msg=name)
        n_amb += int(amb.sum())
        n_all += b.size
    assert n_amb <= 0.01 * n_all  # the comparison is meaningful: few entries sit on the threshold


def test_arcee_fusion_keeps_outliers_only():
    """The default fence selects a minority; a larger fence a subset of it; one-entry rows all (KL 0)."""
    base, models = make(1, seed=4)
    _, ex15 = jmerge.merge(arcee_fusion(), base, models, return_extras=True)
    _, ex30 = jmerge.merge(arcee_fusion(3.0), base, models, return_extras=True)
    for name in ("w", "big", "k"):
        m15, m30 = np.asarray(ex15[name]["fusion_mask"]), np.asarray(ex30[name]["fusion_mask"])
        assert 0 < m15.mean() < 0.5 and not np.any(m30 & ~m15), name
    assert np.all(np.asarray(ex15["col"]["fusion_mask"])) and np.all(np.asarray(ex15["one"]["fusion_mask"]))


def test_arcee_fusion_scalar_leaf_and_identical_model():
    base = {"s": np.float32(0.5), "w": np.ones((4, 6), np.float32)}
    out = jmerge.merge(arcee_fusion(), base, [{"s": np.float32(0.75), "w": base["w"]}])
    assert float(out["s"]) == 0.75  # one-entry distribution: KL 0 = threshold, kept
    np.testing.assert_array_equal(np.asarray(out["w"]), base["w"])


def test_arcee_fusion_needs_exactly_one_model():
    base, models = make(2, seed=5, shapes={"w": (4, 6)})
    with pytest.raises(MergeInputError, match="at most"):
        jmerge.merge(arcee_fusion(), base, models)


def test_arcee_fusion_traced_factor_compiles_once():
    base, models = make(1, seed=6, shapes={"w": (16, 12), "big": (64, 100)})
    traces = []

    def run(k):
        traces.append(1)
        return jmerge.merge(arcee_fusion(), base, models, hparams={"iqr_factor": k})

    f = jax.jit(run)
    for k in (0.5, 2.0):
        out = f(jnp.float32(k))
        for name, b in base.items():
            mask, amb = ref_fusion(b, models[0][name], k)
            got = np.asarray(out[name]) != b
            np.testing.assert_array_equal(got[~amb], mask[~amb] & (models[0][name] != b)[~amb], err_msg=name)
    assert len(traces) == 1


# Half-precision compute (mergekit's `dtype: bfloat16`): the reference is the formula run by torch in
# that dtype (written here from the formula; torch rounds after each operation).

def _torch_fusion(b, m, dtype, k=1.5):
    """(importance as float32, mask): ``|m − b| Σ p log(p / q)`` and the fence, all in torch ``dtype``;
    quartiles = the sorted importances (NaN last) at ``floor(q (n − 1))``."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    m, b = torch.from_numpy(m).to(dt), torch.from_numpy(b).to(dt)
    p, q = torch.softmax(m, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    s = (m - b).abs() * torch.sum(p * torch.log(p / q), -1, keepdim=True)
    srt = torch.sort(s.reshape(-1)).values
    q1, q2, q3 = (srt[int(f * (srt.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return s.float().numpy(), (s >= q2 + k * (q3 - q1)).numpy()


def _half_cases(seed):
    r = np.random.default_rng(seed)
    for shape, scale, spread in (((64, 100), 0.5, 0.1), ((48, 64), 0.02, 1e-3), ((8, 4096), 0.02, 1e-3),
                                 ((3, 4, 37), 1.0, 0.3), ((40, 7), 0.5, 0.1)):
        b = (scale * r.normal(size=shape)).astype(np.float32)
        yield b, (b + spread * r.normal(size=shape)).astype(np.float32)
    # float16: rows of spread-out logits underflow the softmax (0/0 = NaN importances, sorted last);
    # in 1/5 of the rows the fence is finite, in 1/3 it is NaN (Q3 is a NaN) and nothing is kept
    for every in (5, 3):
        b = r.normal(size=(40, 50)).astype(np.float32)
        b[::every] *= 12.0
        yield b, (b + 0.5 * r.normal(size=b.shape)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fusion_importance_half_precision_matches_torch(dtype):
    """Bit-exact but for rare rows where torch's SIMD exp (or, on another CPU, its summation order) and
    XLA's differ in the last float32 bit and move a probability across a rounding boundary of ``dtype``
    (float16's finer one is crossed more often): few rows, each within two ulps of ``dtype``."""
    f = jax.jit(fusion_importance, static_argnames="precision")
    n_bad = n_rows = 0
    for b, m in _half_cases(40):
        want, _ = _torch_fusion(b, m, dtype)
        got = np.asarray(f(m, b, precision=dtype))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        same = (got == want) | np.isnan(want)
        bad = ~same.reshape(-1, b.shape[-1]).all(-1)
        n_bad, n_rows = n_bad + int(bad.sum()), n_rows + bad.size
        ulp, tiny = (2.0 ** -7, 2.0 ** -133) if dtype == "bfloat16" else (2.0 ** -10, 2.0 ** -24)
        np.testing.assert_allclose(got[~same], want[~same], rtol=2 * ulp, atol=2 * tiny)
    assert n_bad <= (0.01 if dtype == "bfloat16" else 0.05) * n_rows, (n_bad, n_rows)
    # the emulation is not the float32 formula: bf16 rounding changes the importances of nearly every row
    b, m = next(_half_cases(40))
    assert np.mean(np.asarray(f(m, b, precision=dtype)) != np.asarray(f(m, b))) > 0.5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_arcee_fusion_half_precision_matches_torch(dtype):
    """``compute_dtype`` = mergekit's ``dtype``: the mask of the formula run in that dtype (fence rounded,
    NaN rows never kept), except in rows whose importance differs (see the test above); the output is
    ``b + τ`` rounded to the dtype where kept, else ``b`` (both as the dtype rounds them)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rnd = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    f = jax.jit(fusion_importance, static_argnames="precision")
    n_kept = 0
    for b, m in _half_cases(41):
        want_imp, want = _torch_fusion(b, m, dtype)
        out, ex = jmerge.merge(arcee_fusion(), {"w": b}, [{"w": m}], return_extras=True, compute_dtype=dtype)
        got = np.asarray(ex["w"]["fusion_mask"])
        imp = np.asarray(f(m, b, precision=dtype))
        same = ((imp == want_imp) | np.isnan(want_imp)).all(-1, keepdims=True)  # rows equal to torch's
        np.testing.assert_array_equal(same & got, same & want)
        r32 = lambda x: np.asarray(x).astype(rnd).astype(np.float32)  # noqa: E731
        bh, mh = r32(b), r32(m)
        np.testing.assert_array_equal(np.asarray(out["w"]), np.where(got, r32(bh + r32(mh - bh)), bh))
        n_kept += int(got.sum())
    assert n_kept > 0


# ------------------------------------------------------------------------------------------
# RAM and RAM+

def _check_ram(out, extras, base, models, eps, r=None, alpha=None):
    for name, b in base.items():
        exp, lam = ref_ram(b, [m[name] for m in models], eps, r, alpha)
        np.testing.assert_allclose(np.asarray(out[name]), exp, rtol=RTOL, atol=ATOL, err_msg=name)
        if r is not None and extras is not None:
            np.testing.assert_allclose(np.asarray(extras[name]["ram_lambda"]), lam, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.05])
def test_ram_matches_reference(T, eps):
    base, models = make(T, seed=10 + T, spread=0.1, density=[0.5, 0.3, 0.6, 0.2][:T], floor=1e-7)
    out = jmerge.merge(ram(eps), base, models)
    _check_ram(out, None, base, models, eps)


@pytest.mark.parametrize("T", [1, 3, 4])
@pytest.mark.parametrize("r,alpha,eps", [(0.1, 0.2, 1e-5), (0.5, 1.0, 0.05), (2.0, 5.0, 1e-5), (0.3, 0.0, 1e-5)])
def test_ramplus_tl_matches_reference(T, r, alpha, eps):
    base, models = make(T, seed=20 + T, spread=0.1, density=[0.15, 0.1, 0.25, 0.05][:T], floor=1e-7)
    out, extras = jmerge.merge(ramplus_tl(r, alpha, eps), base, models, return_extras=True)
    _check_ram(out, extras, base, models, eps, r, alpha)


def test_ram_regions():
    """Shared entries are averaged over contributors, unique ones kept (RAM) or scaled (RAM+), others base."""
    b = np.zeros(6, np.float32)
    m1 = np.array([1.0, 2.0, 0.0, 4.0, 0.0, 1e-6], np.float32)
    m2 = np.array([3.0, 0.0, 0.0, 0.0, 5.0, 1e-6], np.float32)
    out = jmerge.merge(ram(), {"x": b}, [{"x": m1}, {"x": m2}])["x"]
    np.testing.assert_array_equal(np.asarray(out), [2.0, 2.0, 0.0, 4.0, 5.0, 0.0])
    out, ex = jmerge.merge(ramplus_tl(r=0.5, alpha=1.0), {"x": b}, [{"x": m1}, {"x": m2}], return_extras=True)
    # model 1: 1 shared, 2 unique -> rho 0.5, lambda 1.25; model 2: 1 shared, 1 unique -> lambda 1.5
    np.testing.assert_allclose(np.asarray(ex["x"]["ram_lambda"]), [1.25, 1.5], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(out["x"]), [2.0, 2.5, 0.0, 5.0, 7.5, 0.0], rtol=RTOL)


def test_ramplus_with_alpha_zero_is_ram():
    base, models = make(3, seed=30, spread=0.1, density=0.3)
    a = jmerge.merge(ramplus_tl(r=0.7, alpha=0.0), base, models)
    b = jmerge.merge(ram(), base, models)
    for k in base:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_ram_traced_hparams_compile_once():
    base, models = make(3, seed=31, spread=0.1, density=[0.2, 0.1, 0.3], floor=1e-3,
                        shapes={"w": (16, 12), "b": (7,)})
    traces = []

    def run(r, alpha, eps):
        traces.append(1)
        return jmerge.merge(ramplus_tl(), base, models, hparams={"r": r, "alpha": alpha, "epsilon": eps},
                            return_extras=True)

    f = jax.jit(run)
    for r, alpha, eps in ((0.1, 0.2, 1e-5), (0.8, 2.0, 5e-3)):
        out, extras = f(jnp.float32(r), jnp.float32(alpha), jnp.float32(eps))
        _check_ram(out, extras, base, models, eps, r, alpha)
    assert len(traces) == 1


def test_hparam_ranges():
    base, models = make(2, seed=32, shapes={"w": (4, 6)})
    for method, hp in ((ram(), {"epsilon": -1.0}), (ramplus_tl(), {"r": -0.1}), (ramplus_tl(), {"alpha": -1.0}),
                       (arcee_fusion(), {"iqr_factor": -1.0})):
        with pytest.raises(MergeInputError):
            jmerge.merge(method, base, models[: method.max_models or 2], hparams=hp)


# ------------------------------------------------------------------------------------------
# mergekit mapping

def test_mergekit_names_and_defaults_match_mergekit():
    pytest.importorskip("torch")
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    for name in ("arcee_fusion", "ram", "ramplus_tl"):
        spec = MERGEKIT_METHODS[name]
        theirs = {p.name: p.default for p in registry.get(name).spec.parameters}
        assert set(spec.rename) == set(theirs), name
        assert {k: spec.hp_defaults[spec.rename[k]] for k in theirs} == theirs, name
        assert spec.jm == name and spec.base == "required"
    assert MERGEKIT_METHODS["arcee_fusion"].max_models == 1


def test_mergekit_configs_parse():
    plan = parse_config("merge_method: ramplus_tl\nbase_model: b\nmodels:\n  - model: m1\n  - model: m2\n"
                        "parameters:\n  r: 0.4\n  epsilon: 0.001\n")
    assert plan.method_name == "ramplus_tl"
    assert plan.hparams == {"r": 0.4, "alpha": 0.2, "epsilon": 0.001}
    # model cards carry GTA options with arcee_fusion; mergekit ignores them, so does jmerge
    plan = parse_config("merge_method: arcee_fusion\nbase_model: b\nmodels:\n  - model: b\n  - model: m\n"
                        "parameters:\n  normalize: true\n  int8_mask: true\n  rescale: false\n")
    assert plan.method_name == "arcee_fusion" and plan.models == ["m"]
    with pytest.raises(jmerge.ConfigError, match="at most 1"):
        parse_config("merge_method: arcee_fusion\nbase_model: b\nmodels:\n  - model: m1\n  - model: m2\n")


def test_row_kl_blocks_equal_the_whole_leaf():
    """_row_kl runs a loop over blocks of rows (the last block overlapping the one before when the rows do
    not divide); each row's KL equals the whole-leaf evaluation, which the reference test checks."""
    from jmerge.methods import fusion as F
    rng = np.random.default_rng(8)
    for shape in ((1000, 128), (401, 2817), (3, 70, 9000)):
        b = rng.normal(size=shape).astype(np.float32)
        m = (b + 0.01 * rng.normal(size=shape)).astype(np.float32)
        m.reshape(rows := m.size // shape[-1], -1)[0, 0] += 30.0  # a far row: the plain sum in its block
        B = F._blocked(jnp.asarray(m))
        assert 0 < B < rows and rows % B, (shape, B)  # several blocks, the last one overlapping
        whole = np.asarray(jax.jit(F._kl)(m, b))
        got = np.asarray(jax.jit(F._row_kl)(m, b))
        np.testing.assert_allclose(got, whole, rtol=2e-6, atol=0, err_msg=str(shape))
        ref = (ref_importance(b, m) / np.abs(m.astype(np.float64) - b)).reshape(rows, -1)[:, :1]
        np.testing.assert_allclose(got.reshape(rows, 1)[1:], ref[1:], rtol=1e-4)  # row 0 (far): the plain sum


def test_row_kl_long_blocks_give_the_short_blocks_bits(monkeypatch):
    """Rows of 256 entries or more take blocks of 2**19 entries (fewer loop iterations) with the KLs of the
    2**16-entry blocks bit for bit; shorter rows keep the short blocks."""
    from jmerge.methods import fusion as F
    rng = np.random.default_rng(10)
    for n in (256, 300, 1024, 2816, 5632):
        rows = (1 << 20) // n + 7
        b = rng.normal(size=(rows, n)).astype(np.float32)
        m = (b + 0.01 * rng.normal(size=b.shape)).astype(np.float32)
        long_ = np.asarray(jax.jit(F._row_kl)(m, b))
        assert F._blocked(jnp.asarray(m)) == max(4, (1 << 19) // n)
        with monkeypatch.context() as mp:
            mp.setattr(F, "_BLOCK_ENTRIES_LONG", 1 << 16)
            assert F._blocked(jnp.asarray(m)) == max(4, (1 << 16) // n)
            short = np.asarray(jax.jit(F._row_kl)(m, b))
        np.testing.assert_array_equal(long_, short, err_msg=str(n))
    assert F._blocked(jnp.zeros((4096, 255))) == (1 << 16) // 255


@pytest.mark.parametrize("nan_rows", [3, 30])
def test_arcee_fusion_nan_importances_sort_last(nan_rows):
    """NaN importances (a NaN weight makes its row's KL NaN) sort after every number, as in mergekit's
    torch.sort: quartiles at positions past the numbers are NaN, and a NaN fence keeps nothing. Few NaN rows:
    the fence is that of the numbers with the NaNs counted at the top (NumPy's sort)."""
    rng = np.random.default_rng(9)
    b = rng.normal(size=(40, 300)).astype(np.float32)
    m = (b + 0.01 * rng.normal(size=b.shape)).astype(np.float32)
    m[:nan_rows, 5] = np.nan
    _, ex = jmerge.merge(arcee_fusion(), {"w": b}, [{"w": m}], return_extras=True)
    got = np.asarray(ex["w"]["fusion_mask"])
    s = np.asarray(jax.jit(fusion_importance)(m, b))
    assert np.isnan(s[:nan_rows]).all() and not np.isnan(s[nan_rows:]).any()
    q1, q2, q3 = _quartiles(s)  # np.sort: NaN last
    want = s >= np.float32(q2) + np.float32(1.5) * (np.float32(q3) - np.float32(q1))
    np.testing.assert_array_equal(got, want)
    assert (got.sum() == 0) == (nan_rows == 30)  # 30 of 40 rows: Q3's position falls among the NaNs


@pytest.mark.parametrize("spread", [0.1, 0.9])
def test_log1p_minus_x_series_and_direct_branches(spread):
    """``log1p(x) - x`` against float64 NumPy, for a block whose every ``|x| <= 1/8`` (the series alone, no
    ``log1p`` evaluated) and for a block with larger entries too (each entry takes its own branch): within a
    few float32 ulps of the result, and the two blocks agree on the entries they share."""
    from jmerge.methods.fusion import _log1p_minus_x

    rng = np.random.default_rng(5)
    x = (rng.uniform(-1, 1, size=(64, 300)) * spread).astype(np.float32)
    x[0, :5] = [0.0, 0.125, -0.125, 1e-20, -3e-8]
    got = np.asarray(jax.jit(_log1p_minus_x)(jnp.asarray(x)))
    want = np.log1p(x.astype(np.float64)) - x.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=4e-6, atol=1e-30)
    small = np.abs(x) <= 0.125
    alone = np.asarray(jax.jit(_log1p_minus_x)(jnp.asarray(np.where(small, x, 0.0))))
    np.testing.assert_array_equal(alone[small], got[small])
