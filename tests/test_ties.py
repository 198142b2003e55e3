"""Sign election, disjoint merge and the TIES family against NumPy references written from the papers
(and mergekit as an oracle for its conventions)."""

import jax
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge import chain
from jmerge.methods.ties import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear,
                          disjoint_merge, elect_sign, magmax, sce, ties)
from jmerge import MergeInputError, leaves_with_paths
from tests._trees import k_round, np_taus, small_tree
from tests._trees import np_topk as np_topk_mask

SHAPES = {"a": (7,), "b": {"c": (16, 12)}, "d": (3, 4, 5)}
T = 3


def make_tree(seed, dtype=np.float32):
    return small_tree(seed, T, dtype, SHAPES)


def check_out(out_tree, refs, dtype, atol=1e-6):
    for (p, b, merged), o in zip(refs, leaves_with_paths(out_tree)[1]):
        o = np.asarray(o)
        assert o.dtype == np.dtype(dtype), p
        want = b + merged
        if dtype == np.float32:
            np.testing.assert_allclose(o, want, rtol=1e-6, atol=atol, err_msg=p)
        else:
            np.testing.assert_allclose(o.astype(np.float32), want.astype(dtype).astype(np.float32),
                                       rtol=2 ** -7, atol=1e-2, err_msg=p)


def pm(v):
    return jmerge.PerModel(list(v) if isinstance(v, (list, tuple)) else [v] * T)


def run(method, base, models, seed=0, scalars=("scale",), **hp):
    """return_extras=True and per-model vectors (scale scalar), so tests share compiled code."""
    return jmerge.merge(method, base, models, seed=seed, return_extras=True,
                        hparams={k: (v if k in scalars else pm(v)) for k, v in hp.items()})


def bshape(v, tau):
    return np.asarray(v, np.float32).reshape((T,) + (1,) * (tau.ndim - 1))


# ---- paper formulas, written independently -------------------------------------------------

def np_elect(tau, w, weighted=True, method="sum"):
    x = tau * bshape(w, tau) if weighted else tau
    votes = x.sum(0) if method == "sum" else np.sign(x).sum(0)
    return np.where(votes >= 0, 1.0, -1.0).astype(np.float32)


def np_disjoint(tau, w, sign, reduce="mean", normalize_by="count"):
    c = tau * bshape(w, tau)
    agree = (np.sign(c) == sign[None]) & (c != 0)
    total = np.where(agree, c, 0).sum(0)
    if reduce == "sum":
        return total
    div = agree.sum(0).astype(np.float32) if normalize_by == "count" else np.where(agree, bshape(w, tau), 0).sum(0)
    return total / np.where(div == 0, 1, div)


def np_trim_tensor(tau, dens):
    n = tau[0].size
    return np.stack([np.where(np_topk_mask(np.abs(tau[t]).ravel(), k_round(dens[t], n)).reshape(tau[t].shape),
                              tau[t], 0) for t in range(T)])


def np_trim_global(taus, dens):
    flat = np.concatenate([np.abs(t).reshape(T, -1) for t in taus], axis=1)
    g = np.stack([np_topk_mask(flat[t], k_round(dens[t], flat.shape[1])) for t in range(T)])
    out, off = [], 0
    for t in taus:
        n = t[0].size
        out.append(np.where(g[:, off:off + n].reshape(t.shape), t, 0))
        off += n
    return out


# --------------------------------------------------------------------------------------------

def test_elect_sign_and_disjoint_merge_small_closed_form():
    base = {"x": np.zeros(5, np.float32)}
    tv = np.array([[1.0, -2.0, 0.0, 3.0, 0.0],
                   [2.0, 1.0, 0.0, -1.0, 0.0],
                   [-0.5, 4.0, -1.0, -1.0, 0.0]], np.float32)
    models = [{"x": tv[t]} for t in range(3)]
    m = chain(elect_sign(), disjoint_merge(), name="ed")
    out, ex = jmerge.merge(m, base, models, return_extras=True)
    # sums 2.5, 3, -1, 1, 0 -> signs + + - + (+ for 0)
    np.testing.assert_array_equal(np.asarray(ex["x"]["sign"]), [1, 1, -1, 1, 1])
    np.testing.assert_allclose(np.asarray(out["x"]), [1.5, 2.5, -1.0, 3.0, 0.0], rtol=1e-6)
    # count election: entry 3 has signs +,-,- -> -1; mean of agreeing -1,-1 = -1
    m = chain(elect_sign(method="count"), disjoint_merge(), name="ed")
    out, ex = jmerge.merge(m, base, models, return_extras=True)
    np.testing.assert_array_equal(np.asarray(ex["x"]["sign"]), [1, 1, -1, -1, 1])
    np.testing.assert_allclose(np.asarray(out["x"]), [1.5, 2.5, -1.0, -1.0, 0.0], rtol=1e-6)


def test_disjoint_merge_requires_sign():
    base, models = make_tree(0)
    with pytest.raises(MergeInputError, match="elect_sign"):
        jmerge.merge(disjoint_merge(), base, models)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_ties_tensor_scope_paper(dtype):
    base, models = make_tree(1, dtype=dtype)
    method = ties()
    for dens, scale_, w in [([0.2] * 3, 1.0, [1.0] * 3), ([0.1, 0.4, 0.8], 0.7, [1.0] * 3),
                            ([0.3] * 3, 1.3, [0.5, 1.0, 2.0])]:
        out, ex = run(method, base, models, density=dens, scale=scale_, weight=w)
        refs = []
        for p, b, tau in np_taus(base, models):
            tr = np_trim_tensor(tau, dens)
            s = np_elect(tr, w)
            refs.append((p, b, np.float32(scale_) * np_disjoint(tr, w, s)))
        check_out(out, refs, dtype)
        if dtype != np.float32:
            break


def test_ties_global_scope_paper():
    base, models = make_tree(2)
    method = ties(scope="global", weighted=False)
    taus = np_taus(base, models)
    for dens in ([0.2] * 3, [0.5, 0.1, 0.3]):
        out, _ = run(method, base, models, density=dens, weight=1.0)
        trimmed = np_trim_global([t for _, _, t in taus], dens)
        refs = [(p, b, np_disjoint(tr, [1.0] * 3, np_elect(tr, [1.0] * 3, weighted=False)))
                for (p, b, _), tr in zip(taus, trimmed)]
        check_out(out, refs, np.float32)
        tensor_out, _ = run(ties(), base, models, density=dens, weight=1.0, scale=1.0)
        assert not np.allclose(np.asarray(tensor_out["b"]["c"]), np.asarray(out["b"]["c"]))


@pytest.mark.parametrize("weighted,reduce,normalize_by,sign_method", [
    (True, "mean", "weight", "sum"), (False, "mean", "count", "sum"), (True, "sum", "count", "sum"),
    (False, "mean", "weight", "count")])
def test_ties_options(weighted, reduce, normalize_by, sign_method):
    base, models = make_tree(3)
    w, dens = [0.3, 1.0, 2.5], [0.4, 0.6, 0.5]
    out, ex = run(ties(weighted=weighted, reduce=reduce, normalize_by=normalize_by, sign_method=sign_method),
                  base, models, density=dens, weight=w, scale=0.9)
    refs = []
    for (p, b, tau), leaf_ex in zip(np_taus(base, models), [ex["a"], ex["b"]["c"], ex["d"]]):
        tr = np_trim_tensor(tau, dens)
        s = np_elect(tr, w, weighted, sign_method)
        np.testing.assert_array_equal(np.asarray(leaf_ex["sign"]), s)
        refs.append((p, b, np.float32(0.9) * np_disjoint(tr, w, s, reduce, normalize_by)))
    check_out(out, refs, np.float32, atol=2e-6)


def test_ties_weighted_election_changes_result():
    # weights that flip the elected sign must change the result (the test can fail)
    base = {"x": np.zeros(3, np.float32)}
    models = [{"x": np.array([1.0, 1.0, 1.0], np.float32)}, {"x": np.array([-2.0, -2.0, 1.0], np.float32)}]
    hp = {"density": 1.0, "weight": jmerge.PerModel([3.0, 1.0])}
    paper = jmerge.merge(ties(weighted=False), base, models, hparams=hp)
    mk = jmerge.merge(ties(weighted=True, normalize_by="weight"), base, models, hparams=hp)
    np.testing.assert_allclose(np.asarray(paper["x"]), [-2.0, -2.0, 2.0], rtol=1e-6)   # sign of sum tau: -,-,+
    np.testing.assert_allclose(np.asarray(mk["x"]), [1.0, 1.0, 1.0], rtol=1e-6)       # sign of sum w tau: +,+,+


def test_ties_matches_mergekit_conventions():
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("mergekit.sparsify")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    base, models = make_tree(4)
    w, dens, lam = [0.5, 1.0, 1.5], [0.3, 0.5, 0.7], 0.8
    for normalize in (True, False):
        method = ties(weighted=True, normalize_by="weight", reduce="mean" if normalize else "sum", rounding="floor")
        out, _ = run(method, base, models, density=dens, weight=w, scale=lam)
        for (p, b, tau), o in zip(np_taus(base, models), leaves_with_paths(out)[1]):
            deltas = torch.stack([sp.magnitude(torch.from_numpy(tau[t].copy()), dens[t]) for t in range(T)])
            wt = torch.tensor(w).reshape((T,) + (1,) * (tau.ndim - 1))
            deltas = deltas * wt
            mask = gta.get_mask(deltas, method="sum")
            mixed = (deltas * mask).sum(0)
            div = (wt * mask).sum(0)
            div[div == 0] = 1
            ref = (mixed / div if normalize else mixed) * lam
            np.testing.assert_allclose(np.asarray(o), b + ref.numpy(), rtol=1e-6, atol=2e-6, err_msg=p)


# ---- DARE / breadcrumbs / DELLA combinations: masks from extras, the rest from the formulas ----

def _given_mask_refs(base, models, ex, mask_name, tf, agg):
    refs = []
    for (p, b, tau), leaf_ex in zip(np_taus(base, models), [ex["a"], ex["b"]["c"], ex["d"]]):
        m = np.asarray(leaf_ex[mask_name])
        refs.append((p, b, agg(tf(tau, m))))
    return refs


def test_dare_linear_and_dare_ties():
    base, models = make_tree(5)
    dens, w, lam = [0.3, 0.6, 0.9], [1.0, 0.5, 2.0], 0.7
    dinv = lambda tau, m: np.where(m, tau, 0) / bshape(dens, tau)
    out, ex = run(dare_linear(), base, models, seed=1, density=dens, weight=w, scale=lam)
    check_out(out, _given_mask_refs(base, models, ex, "dare_mask", dinv,
                                    lambda x: np.float32(lam) * (x * bshape(w, x)).sum(0)), np.float32, atol=1e-5)
    out, ex = run(dare_ties(), base, models, seed=1, density=dens, weight=w, scale=lam)
    check_out(out, _given_mask_refs(base, models, ex, "dare_mask", dinv,
                                    lambda x: np.float32(lam) * np_disjoint(x, w, np_elect(x, w))), np.float32,
              atol=1e-5)
    # mergekit's dare_ties: l1 rescale, summed
    out, ex = run(dare_ties(rescale="l1", reduce="sum"), base, models, seed=1, density=dens, weight=w, scale=lam)

    def l1(tau, m):
        k = np.where(m, tau, 0)
        return k * bshape(np.abs(tau).reshape(T, -1).sum(1) / np.abs(k).reshape(T, -1).sum(1), tau)

    check_out(out, _given_mask_refs(base, models, ex, "dare_mask", l1,
                                    lambda x: np.float32(lam) * np_disjoint(x, w, np_elect(x, w), "sum")),
              np.float32, atol=1e-5)


def np_breadcrumbs_mask(tau_t, d, g):
    n = tau_t.size
    k_keep, k_top = k_round(d, n), k_round(g, n)
    k_top = min(k_top, n - k_keep)
    order = np.argsort(-np.abs(tau_t).ravel(), kind="stable")
    m = np.zeros(n, bool)
    m[order[k_top:k_top + k_keep]] = True
    return m.reshape(tau_t.shape)


def test_breadcrumbs_and_breadcrumbs_ties():
    base, models = make_tree(6)
    dens, gam, w, lam = [0.8, 0.6, 0.9], [0.05, 0.1, 0.01], [1.0, 2.0, 0.5], 0.6
    for method in (breadcrumbs(), breadcrumbs_ties()):
        out, _ = run(method, base, models, density=dens, gamma=gam, weight=w, scale=lam)
        refs = []
        for p, b, tau in np_taus(base, models):
            x = np.stack([np.where(np_breadcrumbs_mask(tau[t], dens[t], gam[t]), tau[t], 0) for t in range(T)])
            merged = (x * bshape(w, x)).sum(0) if method.name == "breadcrumbs" else np_disjoint(x, w, np_elect(x, w))
            refs.append((p, b, np.float32(lam) * merged))
        check_out(out, refs, np.float32, atol=2e-6)


def np_della_probs(tau_t, d, e):
    x = np.abs(tau_t)
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    m = rows.shape[1]
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float32)
    rn = ranks / np.float32(m - 1)
    return np.clip(np.float32(d) - np.float32(e) + np.float32(2) * np.float32(e) * rn, 0, 1).reshape(tau_t.shape)


def test_della_and_della_linear():
    base, models = make_tree(7)
    dens, eps, w, lam = [0.7, 0.5, 0.6], [0.15, 0.1, 0.2], [1.0, 0.5, 2.0], 1.1
    inv = lambda tau, m: np.where(m, tau / np.stack([np_della_probs(tau[t], dens[t], eps[t]) for t in range(T)]), 0)
    out, ex = run(della(), base, models, seed=4, density=dens, epsilon=eps, weight=w, scale=lam)
    check_out(out, _given_mask_refs(base, models, ex, "della_mask", inv,
                                    lambda x: np.float32(lam) * np_disjoint(x, w, np_elect(x, w))), np.float32,
              atol=1e-5)
    out, ex = run(della_linear(), base, models, seed=4, density=dens, epsilon=eps, weight=w, scale=lam)
    check_out(out, _given_mask_refs(base, models, ex, "della_mask", inv,
                                    lambda x: np.float32(lam) * (x * bshape(w, x)).sum(0)), np.float32, atol=1e-5)


# ---- MagMax, SCE ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_magmax(dtype):
    base, models = make_tree(8, dtype=dtype)
    for lam in (0.5, 1.0):
        out = jmerge.merge(magmax(), base, models, hparams={"scale": lam})
        refs = []
        for p, b, tau in np_taus(base, models):
            idx = np.abs(tau).argmax(0)
            refs.append((p, b, np.float32(lam) * np.take_along_axis(tau, idx[None], 0)[0]))
        check_out(out, refs, dtype)


def np_sce(tau, density):
    var = tau.var(0)
    if density >= 1:
        sel = np.ones(var.shape, bool)
    else:
        k = int(np.count_nonzero(var) * np.float64(density))
        sel = np_topk_mask(var.ravel(), k).reshape(var.shape)
    x = np.where(sel[None], tau, 0)
    sign = np.where(x.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(x) == sign[None]
    e = (x ** 2).reshape(T, -1).mean(1)
    wt = e / e.sum() if abs(e.sum()) >= 1e-6 else np.full(T, 1 / T)
    ew = np.where(erase, bshape(wt, x), 0)
    return (x * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def test_sce_numpy_and_mergekit():
    base, models = make_tree(9)
    for d in (1.0, 0.3, 0.75):
        out = jmerge.merge(sce(), base, models, hparams={"density": d})
        refs = [(p, b, np_sce(tau, d)) for p, b, tau in np_taus(base, models)]
        check_out(out, refs, np.float32, atol=2e-6)
    torch = pytest.importorskip("torch")
    mk = pytest.importorskip("mergekit.merge_methods.sce")
    out = jmerge.merge(sce(), base, models, hparams={"density": 0.3})
    for (p, b, tau), o in zip(np_taus(base, models), leaves_with_paths(out)[1]):
        tv = torch.from_numpy(tau.copy())
        tv = tv * mk.sce_mask(tv, 0.3, torch.float32).unsqueeze(0)
        sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
        em = (tv.sign() == sign).float()
        wt = mk.sce_weight(tv).reshape((T,) + (1,) * (tau.ndim - 1)) * em
        ref = (tv * wt).sum(0) / wt.sum(0).clamp(min=1e-6)
        np.testing.assert_allclose(np.asarray(o), b + ref.numpy(), rtol=1e-6, atol=2e-6, err_msg=p)


# ---- registry and inputs ----------------------------------------------------------------------

def test_methods_registered_and_callable_without_arguments():
    assert set(METHODS) == {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                            "della_linear", "magmax", "sce"}
    avail = jmerge.available_methods()
    for name, f in METHODS.items():
        assert avail[name] is f
        m = f()
        assert m.name == name and f.__doc__ and "References:" in f.__doc__
    assert jmerge.ties is ties and jmerge.breadcrumbs is breadcrumbs and jmerge.della is della


def test_ties_density_out_of_range_names_leaf():
    base, models = make_tree(10)
    with pytest.raises(MergeInputError, match=r"density.*ties.*'a'"):
        jmerge.merge(ties(), base, models, hparams={"density": 1.01})
    with pytest.raises(MergeInputError, match="epsilon"):
        jmerge.merge(della(), base, models, hparams={"epsilon": 0.7})
    with pytest.raises(MergeInputError, match="reduce"):
        ties(reduce="median")


def test_new_hyperparameter_values_do_not_recompile_and_user_jit_matches():
    base, models = make_tree(11)
    run(ties(), base, models, density=0.2, weight=1.0, scale=1.0)
    n = jmerge.trace_count()
    outs = [run(ties(), base, models, density=d, weight=w, scale=s)[0]
            for d, w, s in [(0.3, 1.0, 0.5), ([0.1, 0.9, 0.5], [2.0, 1.0, 0.1], 1.2)]]
    assert jmerge.trace_count() == n
    assert not np.allclose(np.asarray(outs[0]["d"]), np.asarray(outs[1]["d"]))
    # inside a user's jax.jit the same per-leaf code is traced inline
    one, one_models = {"c": base["b"]["c"]}, [{"c": m["b"]["c"]} for m in models]
    f = jax.jit(lambda b, ms: jmerge.merge(ties(density=0.3), b, ms))
    eager = jmerge.merge(ties(density=0.3), one, one_models)
    np.testing.assert_allclose(np.asarray(f(one, one_models)["c"]), np.asarray(eager["c"]), rtol=1e-6, atol=1e-6)


def test_ties_eager_merge_sorts_unsharded_rows_and_equals_the_counting_search(monkeypatch):
    """Outside ``jax.jit``, leaves on one device whose rows exceed the default sort cut-off (2048) but not
    ``EAGER_SORT_LIMIT`` are trimmed by a whole sort (seen when the leaf program is traced); under
    ``whole_sort_limit(0)`` by the counting search (no sort). Both give the paper's formulas, bit for bit alike.
    Shapes used by no other test, so both leaf programs are traced here."""
    from jmerge.core import driver as D
    from jmerge.core import select as S
    rng = np.random.default_rng(11)
    shapes = {"w": (37, 131), "v": (2053,)}
    assert all(2048 < int(np.prod(s)) <= D.EAGER_SORT_LIMIT for s in shapes.values())
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    models = [{k: v + np.float32(0.1) * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(T)]
    calls = []
    real = S._sorted_threshold
    monkeypatch.setattr(S, "_sorted_threshold", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    dens, w = [0.2, 0.35, 0.5], [1.0] * T
    sorted_out = run(ties(), base, models, density=dens, scale=1.0, weight=w)[0]
    assert len(calls) >= len(shapes)
    calls.clear()
    with S.whole_sort_limit(0):
        counted_out = run(ties(), base, models, density=dens, scale=1.0, weight=w)[0]
    assert not calls
    refs = []
    for p, b, tau in np_taus(base, models):
        tr = np_trim_tensor(tau, dens)
        refs.append((p, b, np_disjoint(tr, w, np_elect(tr, w))))
    check_out(sorted_out, refs, np.float32)
    for k in shapes:
        np.testing.assert_array_equal(np.asarray(sorted_out[k]), np.asarray(counted_out[k]), err_msg=k)


def test_leaf_program_sort_limit_values():
    """``sort_limit``: "auto", None or a count give the same merged leaf (the formulas'); anything else is
    refused, naming the value."""
    from jmerge.core.driver import LeafProgram
    rng = np.random.default_rng(12)
    b = rng.normal(size=(2101,)).astype(np.float32)
    ms = tuple(b + np.float32(0.1) * rng.normal(size=b.shape).astype(np.float32) for _ in range(T))
    hp = jmerge.prepare_leaf_hparams(ties(), ["w"], T, hparams={"density": 0.3})[0]
    prog = LeafProgram(ties())
    outs = [np.asarray(prog(b, ms, hp, jmerge.leaf_key(0, "w"), {}, None, sort_limit=lim))
            for lim in ("auto", None, 4096)]
    tau = np.stack(ms) - b
    tr = np_trim_tensor(tau, [0.3] * T)
    np.testing.assert_allclose(outs[0], b + np_disjoint(tr, [1.0] * T, np_elect(tr, [1.0] * T)), rtol=1e-6, atol=1e-6)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for bad in ("sorted", -1):
        with pytest.raises(MergeInputError, match="sort_limit"):
            prog(b, ms, hp, jmerge.leaf_key(0, "w"), {}, None, sort_limit=bad)
