"""Exact top-k masks (jmerge.core.select) against a NumPy reference: stable argsort on -x."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.core import driver
from jmerge.core import select as S
from jmerge import transform

SHAPES = [(1,), (7,), (16, 12), (3, 4, 5), (41, 33)]


def ref_mask(x, k):
    """Keep the k largest of x (flattened), ties by lowest index: NumPy stable argsort on -x."""
    f = np.asarray(x, np.float32).ravel()
    f = np.where(f == 0, np.float32(0), f)  # -0.0 == 0.0
    f = np.where(np.isnan(f), np.float32(np.inf), f)  # NaN counts as +inf
    order = np.argsort(-f, kind="stable")
    m = np.zeros(f.size, bool)
    m[order[:min(max(int(k), 0), f.size)]] = True
    return m.reshape(np.shape(x))


def ref_rows(x, ks):
    return np.stack([ref_mask(x[t], ks[t]) for t in range(x.shape[0])])


def make(kind, shape, rng):
    n = int(np.prod(shape))
    if kind == "normal":
        x = np.abs(rng.normal(size=shape))
    elif kind == "signed":
        x = rng.normal(size=shape)
    elif kind == "int_ties":
        x = rng.integers(0, 4, size=shape)
    elif kind == "bf16":
        x = np.abs(rng.normal(size=shape)).astype(jnp.bfloat16).astype(np.float32)
    elif kind == "equal":
        x = np.full(shape, 0.5)
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "sorted":
        x = np.arange(n, dtype=np.float64).reshape(shape) / n
    else:
        raise ValueError(kind)
    return np.asarray(x, np.float32)


KINDS = ["normal", "signed", "int_ties", "bf16", "equal", "zeros", "sorted"]
_topk = jax.jit(S.topk_mask)


def edge_ks(n, rng):
    return sorted({-3, 0, 1, n // 2, max(n - 1, 0), n, n + 4, int(rng.integers(0, n + 1))})


@pytest.mark.parametrize("kind", KINDS)
def test_topk_mask_matches_numpy(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    for shape in SHAPES:
        x = make(kind, shape, rng)
        for k in edge_ks(x.size, rng):
            got = np.asarray(_topk(x, k))
            assert got.shape == x.shape and got.dtype == bool
            np.testing.assert_array_equal(got, ref_mask(x, k), err_msg=f"{kind} {shape} k={k}")
            assert got.sum() == min(max(k, 0), x.size)


def test_bfloat16_input_compared_as_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.abs(rng.normal(size=(16, 12))), jnp.bfloat16)  # many ties after rounding
    for k in (5, 50, 100, 191):
        np.testing.assert_array_equal(np.asarray(_topk(x, k)), ref_mask(np.asarray(x, np.float32), k))


@pytest.mark.parametrize("kind", ["normal", "bf16", "int_ties", "sorted"])
def test_large_inputs_all_paths(kind):
    """Large enough for the sampled bracket, the blocked extraction, the radix fallback (sorted input
    overflows the per-block candidate budget) and the partial-tie resolution."""
    rng = np.random.default_rng(7)
    x = make(kind, (150_001,), rng)
    for k in (1, 12_345, 75_000, 149_999):
        got = np.asarray(_topk(x, k))
        np.testing.assert_array_equal(got, ref_mask(x, k), err_msg=f"{kind} k={k}")


@pytest.mark.parametrize("kind", ["normal", "signed", "bf16", "int_ties", "zeros", "sorted", "lognormal"])
def test_search_path_rows_match_numpy(kind):
    """Rows longer than the sort cut-off go through the counting search: every row and k exact,
    including lengths that leave a tail after the blocks of 16 and ties that need the cut position."""
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    rows = jax.jit(S.topk_mask_rows)
    for n in (S._SORT_MAX + 1, 40_009, 65_536):
        if kind == "lognormal":
            x = np.exp(rng.normal(size=(3, n)) * 8).astype(np.float32)
        elif kind == "zeros":  # mostly exact zeros: the boundary often falls among them
            x = np.where(rng.random((3, n)) < 0.7, 0, rng.normal(size=(3, n))).astype(np.float32)
        else:
            x = make(kind, (3, n), rng)
        for ks in ([1, n // 2, n - 1], [int(0.2 * n), int(0.01 * n) + 1, int(0.9 * n)],
                   list(rng.integers(1, n, size=3))):
            got = np.asarray(rows(x, jnp.asarray(ks)))
            np.testing.assert_array_equal(got, ref_rows(x, ks), err_msg=f"{kind} n={n} k={ks}")


@pytest.mark.parametrize("kind", ["normal", "bf16"])
def test_keep_rows_rebuilt_from_models_equals_materialized(kind):
    """topk_keep_rows with ``rebuild`` (tau recomputed from base and models on every pass, as the
    trim does) keeps exactly what the materialized path and NumPy keep, for bf16 and float32
    inputs, rows of 2-D leaves and a length with a tail."""
    rng = np.random.default_rng(11)
    dt = jnp.bfloat16 if kind == "bf16" else jnp.float32
    for shape in ((97, 131), (3000,)):
        base = jnp.asarray(rng.normal(size=shape), dt)
        models = [jnp.asarray(np.asarray(base, np.float32) + 0.01 * rng.normal(size=shape), dt) for _ in range(3)]
        tau = jnp.stack([jnp.asarray(m, jnp.float32) - jnp.asarray(base, jnp.float32) for m in models])
        n = int(np.prod(shape))
        k = jnp.array([1, n // 5, n - 2], jnp.int32)

        def rebuilt(b, ms, k):
            t = jnp.stack([jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32) for m in ms])
            rb = lambda g: [jnp.asarray(g(m), jnp.float32) - jnp.asarray(g(b), jnp.float32) for m in ms]
            return S.topk_keep_rows(t, k, magnitude=True, rebuild=rb)

        kept_r, mask_r = jax.jit(rebuilt)(base, models, k)
        kept_m, mask_m = jax.jit(lambda t, k: S.topk_keep_rows(t, k, magnitude=True))(tau, k)
        ref = ref_rows(np.abs(np.asarray(tau)).reshape(3, -1), [int(v) for v in k]).reshape(tau.shape)
        np.testing.assert_array_equal(np.asarray(mask_r), ref)
        np.testing.assert_array_equal(np.asarray(mask_m), ref)
        np.testing.assert_array_equal(np.asarray(kept_r), np.where(ref, np.asarray(tau), 0))
        np.testing.assert_array_equal(np.asarray(kept_m), np.asarray(kept_r))


def test_magnitude_flag_ranks_absolute_values():
    rng = np.random.default_rng(4)
    rows = jax.jit(lambda x, k: S.topk_mask_rows(x, k, magnitude=True))
    for n in (100, 30_001):
        x = rng.normal(size=(2, n)).astype(np.float32)
        x[1, ::7] = -x[1, 1::7][: x[1, ::7].size] if n % 7 else x[1, ::7]  # equal magnitudes, both signs
        x[0, :5] = [np.nan, -np.inf, -0.0, 0.0, np.inf]
        for ks in ([1, 2], [n // 3, n // 2], [n - 1, 7]):
            np.testing.assert_array_equal(np.asarray(rows(x, jnp.asarray(ks))), ref_rows(np.abs(x), ks))


def test_search_internals_bracket_invariant():
    """_search returns v with #(key > v) < k <= #(key >= v), or an exact threshold (gt == k)."""
    rng = np.random.default_rng(8)
    x = np.round(np.abs(rng.normal(size=(4, 50_000))) * 64) / 64  # ties everywhere
    x[3] = rng.random(50_000)  # smooth row: usually an exact threshold
    x = x.astype(np.float32)
    k = jnp.array([1, 25_000, 49_999, 12_345], jnp.int32)
    v, gt, ge = jax.jit(lambda x, k: S._search(S._rows_fn(x), k, False)[:3])(jnp.asarray(x), k)
    keys = np.asarray(S._keys(jnp.asarray(x)))
    for t in range(4):
        assert (keys[t] > int(v[t])).sum() == int(gt[t]) and int(gt[t]) <= int(k[t])
        if int(gt[t]) < int(k[t]):
            assert (keys[t] >= int(v[t])).sum() == int(ge[t]) and int(ge[t]) >= int(k[t])
            assert int(v[t]) in set(keys[t].tolist())


def test_special_values():
    x = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0, 2.0, np.inf], np.float32)
    for k in range(0, 10):
        np.testing.assert_array_equal(np.asarray(_topk(x, k)), ref_mask(x, k), err_msg=f"k={k}")
    y = np.array([1.0, np.nan, 3.0, np.inf], np.float32)  # NaN counts as +inf (tie, index order)
    np.testing.assert_array_equal(np.asarray(_topk(y, 1)), [False, True, False, False])


def test_rows_per_row_k():
    rng = np.random.default_rng(5)
    rows = jax.jit(S.topk_mask_rows)
    for shape in [(3, 16, 12), (2, 3, 4, 5), (4, 5000)]:
        x = np.abs(rng.normal(size=shape)).astype(np.float32)
        x[0] = np.round(x[0] * 4) / 4
        n = int(np.prod(shape[1:]))
        ks = rng.integers(-1, n + 2, size=shape[0])
        got = np.asarray(rows(x, jnp.asarray(ks)))
        np.testing.assert_array_equal(got, ref_rows(x, ks))
        got = np.asarray(rows(x, n // 3))  # scalar k broadcasts
        np.testing.assert_array_equal(got, ref_rows(x, [n // 3] * shape[0]))


def test_traced_k_does_not_retrace():
    traces = {"n": 0}

    @jax.jit
    def f(x, k):
        traces["n"] += 1
        return S.topk_mask(x, k)

    x = np.abs(np.random.default_rng(0).normal(size=(16, 12))).astype(np.float32)
    for k in (0, 3, 50, 192, 500):
        np.testing.assert_array_equal(np.asarray(f(x, jnp.int32(k))), ref_mask(x, k))
    assert traces["n"] == 1

    @jax.jit
    def g(x, d):
        traces["n"] += 1
        return S.topk_mask(x, S.density_to_k(d, x.size))

    for d in (0.0, 0.1, 0.2, 0.5, 1.0):
        np.testing.assert_array_equal(np.asarray(g(x, jnp.float32(d))), ref_mask(x, int(np.round(np.float32(d) * 192))))
    assert traces["n"] == 2


def test_density_to_k():
    assert int(S.density_to_k(0.2, 100)) == 20
    assert int(S.density_to_k(0.0, 100)) == 0 and int(S.density_to_k(1.0, 7)) == 7
    assert int(S.density_to_k(0.25, 10)) == 2  # round half to even, like np.round
    np.testing.assert_array_equal(np.asarray(S.density_to_k(jnp.array([0.1, 0.5]), 30)), [3, 15])


def test_bad_k_shape():
    with pytest.raises(jmerge.MergeInputError):
        S.topk_mask(jnp.ones(5), jnp.array([1, 2]))
    with pytest.raises(jmerge.MergeInputError):
        S.topk_mask_rows(jnp.ones((3, 5)), jnp.array([1, 2]))


def test_empty():
    assert S.topk_mask(jnp.zeros((0, 3)), 2).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Global top-k over all leaves, through jmerge.merge

def _keep_global(state, hp):
    mask = S.global_topk_mask(state, "gtk")
    merged = jnp.sum(jnp.where(mask, state.tau, 0.0), axis=0)
    return state.replace(merged=merged, extras={"mask": mask})


def _global_method(density=0.2):
    return transform("keep_global", _keep_global, hparams={"density": density}, per_model=("density",),
                     stats=S.global_topk_phases("gtk", "density"))


def ref_global(taus, dens):
    """Per task: stable argsort of -|tau| over all leaves concatenated in leaf order."""
    T = taus[0].shape[0]
    flat = np.concatenate([np.abs(t).reshape(T, -1) for t in taus], axis=1)
    sizes = np.cumsum([0] + [int(np.prod(t.shape[1:])) for t in taus])
    masks = [np.zeros(t.shape, bool) for t in taus]
    for t in range(T):
        k = int(np.round(np.float64(np.float32(dens[t])) * flat.shape[1]))
        m = ref_mask(flat[t], k)
        for i, tau in enumerate(taus):
            masks[i][t] = m[sizes[i]:sizes[i + 1]].reshape(tau.shape[1:])
    return masks


def _tree(rng, quantize):
    shapes = {"a": (7,), "b": {"w": (16, 12)}, "c": (3, 4, 5), "d": (1,)}
    base = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))

    def ft(_):
        d = jax.tree.map(lambda b: rng.normal(size=b.shape).astype(np.float32) * 0.1, base)
        if quantize:  # heavy ties across leaves (and exact zeros)
            d = jax.tree.map(lambda x: np.round(x * 20) / 20, d)
        return jax.tree.map(lambda b, x: b + x, base, d)
    return base, [ft(i) for i in range(3)]


@pytest.mark.parametrize("quantize", [False, True])
def test_global_topk_matches_numpy(quantize):
    rng = np.random.default_rng(11 + quantize)
    base, models = _tree(rng, quantize)
    method = _global_method()
    tv = jmerge.task_vectors(base, models)
    taus = [np.asarray(t) for t in jax.tree.leaves(tv)]
    for dens in ([0.2] * 3, [0.0, 0.5, 1.0], [0.013, 0.37, 0.999]):
        hp = {"density": jmerge.PerModel(dens)}
        out, extras = jmerge.merge(method, base, task_vectors=tv, hparams=hp, return_extras=True)
        want = ref_global(taus, dens)
        for got, w, tau, b, o in zip(jax.tree.leaves(extras), want, taus, jax.tree.leaves(base), jax.tree.leaves(out)):
            np.testing.assert_array_equal(np.asarray(got), w)
            np.testing.assert_allclose(np.asarray(o), b + np.where(w, tau, 0).sum(0), rtol=1e-6, atol=1e-6)
        total = sum(int(np.prod(t.shape[1:])) for t in taus)
        kept = np.sum([np.asarray(g).reshape(3, -1).sum(1) for g in jax.tree.leaves(extras)], axis=0)
        np.testing.assert_array_equal(kept, np.round(np.asarray(dens, np.float32).astype(np.float64) * total))


def test_global_ties_broken_by_leaf_order():
    base = {"a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}
    m1 = {"a": np.array([1, 2, 2, 0], np.float32), "b": np.array([2, 2, 3], np.float32)}
    out, ex = jmerge.merge(_global_method(density=3 / 7), base, [m1], return_extras=True)
    # k = 3: the 3, then the first two of the four 2s in leaf order (leaf a, indices 1 and 2)
    np.testing.assert_array_equal(np.asarray(ex["a"]["mask"])[0], [False, True, True, False])
    np.testing.assert_array_equal(np.asarray(ex["b"]["mask"])[0], [False, False, True])
    out, ex = jmerge.merge(_global_method(density=4 / 7), base, [m1], return_extras=True)
    np.testing.assert_array_equal(np.asarray(ex["a"]["mask"])[0], [False, True, True, False])
    np.testing.assert_array_equal(np.asarray(ex["b"]["mask"])[0], [True, False, True])


def test_tie_quota_zero_in_one_row_partial_in_another():
    x = jnp.array([[7, 5, 7, 7, 1], [7, 7, 7, 2, 7]], jnp.float32)
    v = S._keys(jnp.array([7.0, 7.0]))
    cut = S._tie_cuts(S._rows_fn(x), v, jnp.array([0, 2]), jnp.array([3, 4]), False)
    np.testing.assert_array_equal(np.asarray(cut), [0, 2])  # row 1 keeps its 7s before position 2
    got = np.asarray(S._threshold_mask(x, v, cut, False))
    np.testing.assert_array_equal(got, [[False] * 5, [True, True, False, False, False]])
    # every row keeps all of its ties, or none: no cut to search, n or 0
    cut = S._tie_cuts(S._rows_fn(x), v, jnp.array([3, 0]), jnp.array([3, 4]), False)
    np.testing.assert_array_equal(np.asarray(cut), [5, 0])
    got = np.asarray(S._threshold_mask(x, v, cut, False))
    np.testing.assert_array_equal(got, [[True, False, True, True, False], [False] * 5])


def test_global_density_must_be_uniform():
    rng = np.random.default_rng(0)
    base, models = _tree(rng, False)
    with pytest.raises(jmerge.MergeInputError, match="differs between leaves"):
        jmerge.merge(_global_method(), base, models, hparams={"density": jmerge.Rules([("b", 0.5)], default=0.2)})


def _uses(fn, *args, prim):
    """Whether the jaxpr of ``fn(*args)`` (sub-jaxprs included) has primitive ``prim``."""
    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == prim:
                return True
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns") and walk(inner):
                        return True
        return False
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("kind", ["int_ties", "zeros_mixed", "signed"])
def test_whole_sort_and_counting_search_agree_around_the_cutoff(kind):
    """The whole-sort path (rows up to ``whole_sort_limit``) and the counting search give bit-identical masks,
    ties included (the first ``q`` tied entries in flat order), at lengths around the default and the sweep's
    cut-offs, for 1-D and 2-D rows, magnitude or signed keys, and under a vmap over k (as a sweep runs them).
    Each path is checked to be the one taken (a sort vs a while loop in the jaxpr) and against NumPy."""
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    for shape in ((2047,), (2049,), (96, 192), (32769,)):
        n = int(np.prod(shape))
        if kind == "zeros_mixed":  # mostly exact zeros, positive and negative: ties at the boundary
            x = np.where(rng.random((3,) + shape) < 0.6, 0.0, rng.normal(size=(3,) + shape)).astype(np.float32)
            x = np.where(rng.random(x.shape) < 0.5, -x, x)
        else:
            x = make(kind, (3,) + shape, rng)
        x = jnp.asarray(x)
        magnitude = kind != "signed"
        ks = jnp.asarray([[1, n // 3, n - 1], [n // 2, 7, int(0.9 * n)],
                          [int(rng.integers(1, n))] * 3], jnp.int32)  # 3 settings x 3 rows

        def run(limit):  # a new function per limit: JAX caches traces by function, and the limit is read when tracing
            def masks(x, ks):
                return jax.vmap(lambda k: S.topk_keep_rows(x, k, magnitude=magnitude)[1])(ks)
            with S.whole_sort_limit(limit):
                return _uses(masks, x, ks, prim="sort"), _uses(masks, x, ks, prim="while"), \
                    np.asarray(jax.jit(masks)(x, ks))

        sorts, loops, sort = run(1 << 30)
        assert sorts and not loops
        _, loops, count = run(0)
        assert loops
        np.testing.assert_array_equal(sort, count, err_msg=f"{kind} {shape}")
        xr = np.abs(np.asarray(x)) if magnitude else np.asarray(x)
        for s in range(ks.shape[0]):
            ref = ref_rows(xr.reshape(3, -1), [int(v) for v in ks[s]]).reshape(x.shape)
            np.testing.assert_array_equal(sort[s], ref, err_msg=f"{kind} {shape} setting {s}")


def test_whole_sort_limit_default_and_scope():
    """The default cut-off (2048) holds outside the block, the block's limit inside it, and a negative
    limit is refused."""
    x = jnp.ones((2, 4096), jnp.float32)
    k = jnp.array([5, 9], jnp.int32)
    f = lambda: lambda x: S.topk_mask_rows(x, k)  # a new function per trace (JAX caches traces by function)
    assert _uses(f(), x, prim="while")  # the counting search (its sample sort aside)
    with S.whole_sort_limit(4096):
        assert _uses(f(), x, prim="sort") and not _uses(f(), x, prim="while")
    assert _uses(f(), x, prim="while")
    with pytest.raises(jmerge.MergeInputError, match="whole_sort_limit"):
        with S.whole_sort_limit(-1):
            pass


def _bf16_task_vectors(rng, shape, T=3, scale=0.005):
    """Rows of ``model - base`` for bfloat16 checkpoints (base ~ 0.02 N(0,1), updates ~ ``scale`` N(0,1)): their
    magnitudes take a few thousand distinct values, many entries each (the tie-heavy case of LLM checkpoints)."""
    b0 = rng.normal(size=shape).astype(np.float32) * np.float32(0.02)
    base = b0.astype(jnp.bfloat16).astype(np.float32)
    ms = [(b0 + rng.normal(size=shape).astype(np.float32) * np.float32(scale)).astype(jnp.bfloat16).astype(np.float32)
          for _ in range(T)]
    return np.stack([m - base for m in ms])


class _CountingLax:
    """``jax.lax`` whose ``while_loop`` (the search's) also counts the rows still searching at each pass
    (``count``, traced; ``k`` the searched ranks), the first pass (before the loop) included: the rows it
    moved off the initial bracket ``[_NEG_INF_KEY, _TOP)``."""

    k = count = None

    def __getattr__(self, name):
        return getattr(jax.lax, name)

    def while_loop(self, cond, body, carry):
        def counted(c):
            lo, glo, hi = c[0][0][:3]
            return body(c[0]), c[1] + jnp.sum((glo != self.k) & (S._u32(hi) - S._u32(lo) > 1), dtype=jnp.int32)

        lo, _, hi = carry[0][:3]
        first = jnp.sum((lo != S._NEG_INF_KEY) | (hi != S._TOP), dtype=jnp.int32)
        carry, self.count = jax.lax.while_loop(lambda c: cond(c[0]), counted, (carry, first))
        return carry


def _counted_search(monkeypatch):
    """A jitted ``(x, k) -> (masks of the 3 rows, row-passes of the search)`` (``select.lax`` counting)."""
    lax_ = _CountingLax()
    monkeypatch.setattr(S, "lax", lax_)

    @jax.jit
    def search(x, k):
        lax_.k = k
        v, cut = S.topk_thresholds_rows(x, k, magnitude=True)
        return jnp.stack([S.threshold_mask(x[t], v[t], cut[t], magnitude=True) for t in range(3)]), lax_.count

    return search


def _row_passes(search, xs, densities) -> int:
    """Row-passes of ``search`` (:func:`_counted_search`) over each 3-row ``x`` and density; every mask NumPy's."""
    total = 0
    for x in xs:
        for d in densities:
            k = np.full(3, int(round(d * x[0].size)), np.int32)
            got, n = search(jnp.asarray(x), jnp.asarray(k))
            np.testing.assert_array_equal(np.asarray(got), ref_rows(np.abs(x), k))
            total += int(n)
    return total


def test_search_tied_bfloat16_rows_take_few_passes(monkeypatch):
    """bfloat16 task vectors: the sampled keys in the bracket repeat, and thresholds at sampled keys (x, x + 1)
    find the k-th key in a few passes (the key-space interpolation alone split the bracket evenly for many
    passes: 122 row-passes on these 8 searches, now 66); the mask is NumPy's."""
    rng = np.random.default_rng(21)
    xs = [_bf16_task_vectors(rng, (256, 1024), scale=scale) for scale in (0.005, 0.02) for _ in range(2)]
    total = _row_passes(_counted_search(monkeypatch), xs, (0.2, 0.5))
    assert total <= 80, total


def test_global_search_tied_bfloat16_ends_in_counting_phases(monkeypatch):
    """The whole-model search on bfloat16 task vectors: thresholds at sampled keys end it within the counting
    phases: 13 phases for these 4 searches (was 27, one of them ending with the radix-histogram fallback);
    masks equal NumPy's."""
    rng = np.random.default_rng(5)
    shapes = {"a": (256, 1024), "b": (512, 384), "c": (1024,)}
    phases, radix = [], []
    narrow, result = S._GSearch.narrow, S._radix_result
    monkeypatch.setattr(S._GSearch, "narrow", lambda self, *a: (phases.append(1), narrow(self, *a))[1])
    monkeypatch.setattr(S, "_radix_result", lambda *a, **k: (radix.append(1), result(*a, **k))[1])
    for scale in (0.005, 0.02):
        taus = {n: _bf16_task_vectors(rng, s, scale=scale) for n, s in shapes.items()}
        base = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        models = [{n: taus[n][t] for n in shapes} for t in range(3)]
        for dens in (0.2, 0.5):
            _, extras = jmerge.merge(_global_method(density=dens), base, models, return_extras=True)
            want = ref_global([taus[n] for n in sorted(shapes)], [dens] * 3)
            for n, w in zip(sorted(shapes), want):
                np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
    assert len(phases) <= 18 and not radix, (len(phases), radix)


@pytest.mark.parametrize("magnitude", [False, True])
def test_threshold_word_is_the_mask(magnitude):
    """threshold_word is -1 exactly where threshold_mask is true (keys >= 0: x >= 0, or magnitudes), for
    thresholds at the keys' extremes and the search's sentinels, every cut; bits & word is where(mask, y, +0)."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(size=(6, 50))).astype(np.float32)
    x[0, :10] = 0.5
    x[1, :5] = [np.nan, np.inf, 0.0, -0.0 if magnitude else 0.0, np.float32(1e-45)]
    if magnitude:
        x[2] *= np.where(rng.random(50) < 0.5, -1, 1).astype(np.float32)
        x[2, :2] = [-np.inf, -np.nan]
    keys = np.asarray(S._keys(jnp.asarray(x), magnitude))
    vs = sorted({int(keys.min()), int(keys.max()), int(np.median(keys)), int(keys[0, 0]), 0, -1,
                 int(S._TOP), int(S._NEG_INF_KEY) - 1, int(S._INF_KEY)})
    y = rng.normal(size=x.shape).astype(np.float32)
    for v in vs:
        for cut in (0, 1, 7, 50):
            m = np.asarray(S.threshold_mask(jnp.asarray(x), jnp.int32(v), jnp.int32(cut), magnitude=magnitude))
            w = np.asarray(S.threshold_word(jnp.asarray(x), jnp.int32(v), jnp.int32(cut), magnitude=magnitude))
            np.testing.assert_array_equal(w, np.where(m, -1, 0).astype(np.int32), err_msg=f"v={v} cut={cut}")
            masked = (y.view(np.int32) & w).view(np.float32)
            np.testing.assert_array_equal(masked.view(np.int32), np.where(m, y, np.float32(0)).view(np.int32))


@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_threshold_values_are_the_kth_largest(kind):
    """threshold_values from topk_thresholds_rows' thresholds is the k-th largest value of each row, against
    NumPy's sort (NaN sorts last, so the k-th largest is NaN for k up to the NaN count); every k from 0 to
    past n, rows of several shapes (the counting search and the whole sort)."""
    rng = np.random.default_rng(7)
    for shape in ((40, 60), (3000,), (5, 7, 90)):
        x = rng.normal(size=shape).astype(np.float32)
        flat = x.reshape(-1)
        if kind == "ties":
            flat[:] = np.round(flat * 4) / 4
        if kind == "special":
            flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, np.nan]
            flat[6:20] = np.float32(1e-45)
        n = flat.size
        asc = np.sort(flat)  # NaN last
        ks = np.array(sorted({0, 1, 2, 3, 5, n // 4, n // 2, n - 1, n, n + 3}), np.int32)
        rows = jnp.broadcast_to(jnp.asarray(x), (len(ks),) + shape)
        v, cut = S.topk_thresholds_rows(rows, jnp.asarray(ks))
        got = np.asarray(S.threshold_values([jnp.asarray(x)] * len(ks), ks, v, cut))
        want = np.array([np.inf if k <= 0 else asc[max(n - k, 0)] for k in ks], np.float32)
        np.testing.assert_array_equal(got, want, err_msg=f"{shape} k={ks}")
        # with the searches' k-th keys: the same values, whichever way each row's search ended
        v2, cut2, kth = S.topk_thresholds_rows(rows, jnp.asarray(ks), kth=True)
        np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(cut2), np.asarray(cut))
        got = np.asarray(S.threshold_values(lambda: [jnp.asarray(x)] * len(ks), ks, v2, cut2, kth))
        np.testing.assert_array_equal(got, want, err_msg=f"{shape} k={ks} (kth)")


@pytest.mark.parametrize("kind", ["normal", "ties", "inf"])
def test_threshold_values_read_no_row_when_every_search_ended_on_its_key(kind):
    """A counting search that ends on its k-th key (every read-out does: a one-key bracket) reports it, and
    threshold_values then takes the values from those keys without its pass (the rows' function is never
    run); an unknown k-th key (the search ended on a threshold that hit k exactly) or one equal to +inf (which
    NaN shares) keeps the pass. The values equal NumPy's sort (NaN last) either way."""
    rng = np.random.default_rng(3)
    x = rng.lognormal(size=(300, 211)).astype(np.float32)  # 63300 entries: the counting search
    if kind == "ties":
        x = np.round(x * 2) / 2
    if kind == "inf":
        x.flat[::5] = np.inf
        x.flat[::7] = np.nan
    flat = x.reshape(-1)
    n = flat.size
    asc = np.sort(flat)
    ks = np.array([n // 4, n // 2, 3 * n // 4], np.int32)
    ran = []

    def rows():
        jax.debug.callback(lambda: ran.append(1))
        return [jnp.asarray(x)] * len(ks)

    f = jax.jit(lambda x, ks: S.topk_thresholds_rows(jnp.broadcast_to(x, (3,) + x.shape), ks, kth=True))
    with S.whole_sort_limit(4096):  # read-outs allowed (unsharded rows), as jmerge.merge sets
        v, cut, kth = f(jnp.asarray(x), jnp.asarray(ks))
    got = np.asarray(jax.jit(lambda v, cut, kth: S.threshold_values(rows, ks, v, cut, kth))(v, cut, kth))
    want = np.array([asc[n - k] for k in ks], np.float32)
    np.testing.assert_array_equal(got, want)
    kth, true = np.asarray(kth), np.asarray(S._keys(jnp.asarray(want)))
    known = kth != np.iinfo(np.int32).min
    np.testing.assert_array_equal(kth[known], true[known])  # a reported key is the k-th key
    # the pass runs exactly when some k-th key is unknown or that of +inf / NaN
    assert bool(ran) == bool((~known).any() or (true >= np.asarray(S._INF_KEY)).any())
    if kind != "inf":  # read-outs end on their keys (ties included); a threshold hitting k exactly does not
        assert known.sum() >= 2
    else:
        assert ran


def _while_body_conds(fn, *args) -> list[int]:
    """Per while loop in the jaxpr of ``fn(*args)``: the number of conditionals directly in its body."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "while":
                body = e.params["body_jaxpr"].jaxpr
                found.append(sum(1 for b in body.eqns if b.primitive.name == "cond"))
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("kind", ["normal", "int_ties", "lattice"])
def test_shared_searches_match_numpy_and_separate_calls(kind):
    """``k`` of shape (P, T): P searches per row sharing its counting passes give NumPy's masks and exactly
    the thresholds of P separate calls, in the search path (rows of a 2-D leaf, a 1-D row with a tail) and
    the sort path, with and without ``rebuild``, for k from 0 past n."""
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    for shape in ((3, 97, 131), (2, 40_009), (3, 30, 40)):
        T, n = shape[0], int(np.prod(shape[1:]))
        if kind == "lattice":  # float32 model - base: few distinct values per row, many entries each
            b = rng.normal(size=shape).astype(np.float32)
            x = (b + (0.01 * rng.normal(size=shape)).astype(np.float32)) - b
        elif kind == "zeros":
            x = np.where(rng.random(shape) < 0.6, 0, rng.normal(size=shape)).astype(np.float32)
        else:
            x = make(kind, shape, rng)
        ks = np.stack([rng.integers(1, n, T), np.full(T, n // 100 + 1), np.array([0, n, n + 3][:T]),
                       np.full(T, n // 2)]).astype(np.int32)
        f = jax.jit(lambda x, k: S.topk_thresholds_rows(x, k, magnitude=True))
        rb = jax.jit(lambda x, k: S.topk_thresholds_rows(x, k, magnitude=True, rebuild=lambda g: [g(r) for r in x]))
        v, cut = f(jnp.asarray(x), jnp.asarray(ks))
        assert v.shape == cut.shape == ks.shape
        vr, cr = rb(jnp.asarray(x), jnp.asarray(ks))
        np.testing.assert_array_equal(np.asarray(vr), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(cr), np.asarray(cut))
        for p in range(ks.shape[0]):
            v1, c1 = f(jnp.asarray(x), jnp.asarray(ks[p]))
            np.testing.assert_array_equal(np.asarray(v[p]), np.asarray(v1), err_msg=f"{kind} {shape} p={p}")
            np.testing.assert_array_equal(np.asarray(cut[p]), np.asarray(c1), err_msg=f"{kind} {shape} p={p}")
            got = np.stack([np.asarray(S.threshold_mask(jnp.asarray(x[t]), v[p, t], cut[p, t], magnitude=True))
                            for t in range(T)])
            np.testing.assert_array_equal(got, ref_rows(np.abs(x), ks[p]), err_msg=f"{kind} {shape} p={p}")


def test_shared_searches_read_each_row_once_per_pass():
    """Every search of a counting pass counts in one reduction, one conditional: with k of shape (P, T)
    (Breadcrumbs-like (2, 3) targets) the six searches of three rows (each row read once for its two), and with
    one search per row (a separate call per target) the three rows (rows made from shared inputs, TIES's task
    vectors, read them once); two separate calls run two loops of one."""
    x = jnp.zeros((3, 97, 131), jnp.float32)
    shared = _while_body_conds(lambda x: S.topk_thresholds_rows(x, jnp.ones((2, 3), jnp.int32), magnitude=True), x)
    separate = _while_body_conds(lambda x: [S.topk_thresholds_rows(x, jnp.ones(3, jnp.int32), magnitude=True)
                                            for _ in range(2)], x)
    assert shared == [1], shared
    assert separate == [1, 1], separate


def test_search_lattice_rows_snap_to_their_keys(monkeypatch):
    """Rows of few-times-tied keys (integers times 1e-4, ~7 entries per key, as float32 ``model - base`` values
    sit on a lattice): a bracket end moved by the counts snaps to the nearest key inside (the pass's snaps),
    so a bracket holding one key ends the search: 145 row-passes on these 12 searches of 3 rows (173 when only
    an unmoved end snapped); masks equal NumPy's."""
    rng = np.random.default_rng(3)
    xs = [(rng.integers(1, 30000, size=(3, 200_000)) * np.float32(1e-4)).astype(np.float32) for _ in range(3)]
    total = _row_passes(_counted_search(monkeypatch), xs, (0.2, 0.5, 0.9, 0.01))
    assert total <= 150, total


def _finetuned(seed, shapes):
    """A float32 base ~ N(0, 1) of ``shapes``, three fine-tunes ``base + 0.01 N(0, 1)``, and the task vectors stacked per
    leaf in sorted name order (what :func:`ref_global` takes)."""
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    models = [{n: base[n] + (0.01 * rng.normal(size=s)).astype(np.float32) for n, s in shapes.items()}
              for _ in range(3)]
    taus = [np.stack([m[n] - base[n] for m in models]) for n in sorted(shapes)]
    return base, models, taus


def test_global_search_float32_task_vectors_take_few_phases(monkeypatch):
    """The whole-model search on float32 ``model - base`` task vectors (values on a lattice: thousands of entries
    per sampled key in the first bracket, too many distinct keys within the sample's error for the tied-key pairs):
    4 counting phases per search here (19 in all before: tied pairs counted where the estimate could not reach,
    and only an unmoved bracket end snapped); masks equal NumPy's."""
    shapes = {"a": (1024, 1024), "b": (1024, 2816), "c": (2816, 1024), "d": (1024,)}
    phases = []
    narrow = S._GSearch.narrow
    monkeypatch.setattr(S._GSearch, "narrow", lambda self, *a: (phases.append(1), narrow(self, *a))[1])
    base, models, taus = _finetuned(8, shapes)
    for dens in (0.2, 0.5, 0.9, 0.01):
        _, extras = jmerge.merge(_global_method(density=dens), base, models, return_extras=True)
        for n, w in zip(sorted(shapes), ref_global(taus, [dens] * 3)):
            np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
    assert len(phases) <= 16, len(phases)


def _whole_model_samples(rng):
    """Samples as the global search takes them: tied keys spread over leaves (incl. 0 and the largest key), leaf ids
    non-decreasing along the keys; one with several leaves and one with a single leaf."""
    for counts in ([4096, 1, 0, 300, 4096, 17], [5000]):
        keys = np.concatenate([rng.choice(np.array([0, 5, 6, 1 << 20, int(S._INF_KEY)]), c) if i % 2 else
                               rng.integers(0, int(S._INF_KEY) + 1, c) for i, c in enumerate(counts)]).astype(np.int64)
        yield keys, np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def test_sorted_keys_is_the_stable_argsort_of_a_whole_model_sample():
    """The global search orders its weighted sample with one packed sort (:func:`select._sorted_keys`); the keys
    and cumulative weights equal those of the stable argsort it replaced, on tied keys spread over leaves of
    different weights, and on one leaf."""
    rng = np.random.default_rng(3)
    for keys, leaf in _whole_model_samples(rng):
        wl = rng.uniform(1.0, 500.0, leaf[-1] + 1)
        order = np.argsort(keys, kind="stable")
        got, g = S._sorted_keys(keys, leaf)
        np.testing.assert_array_equal(got, keys[order])
        np.testing.assert_array_equal(np.cumsum(wl[g]), np.cumsum(wl[leaf[order]]))
        np.testing.assert_array_equal(np.sort(g), np.sort(leaf))


def test_first_thresholds_read_the_ascending_sort_from_the_top():
    """The first thresholds are looked up from the largest sampled key down, in the one ascending sort of the sample
    reversed (:func:`select._weights_from_top`): at the end of each run of equal keys its cumulative weights are
    those of the stable descending argsort (integer weights, a leaf's size over its sampled count), and
    ``searchsorted`` at any target picks the same key in both."""
    rng = np.random.default_rng(4)
    for keys, leaf in _whole_model_samples(rng):
        wl = rng.integers(1, 800, leaf[-1] + 1).astype(np.float64)
        up, g = S._sorted_keys(keys, leaf)
        down, cw = up[::-1], S._weights_from_top(np.cumsum(wl[g]))
        order = np.argsort(-keys, kind="stable")
        ref_keys, ref_cw = keys[order], np.cumsum(wl[leaf[order]])
        np.testing.assert_array_equal(down, ref_keys)
        ends = np.flatnonzero(np.append(down[1:] != down[:-1], True))  # last entry of each run of equal keys
        np.testing.assert_array_equal(cw[ends], ref_cw[ends])
        targets = rng.uniform(0, ref_cw[-1] * 1.01, 2000)
        pick = lambda c, d: d[np.clip(np.searchsorted(c, targets), 0, d.size - 1)]
        np.testing.assert_array_equal(pick(cw, down), pick(ref_cw, ref_keys))
        if leaf[-1] > 0:  # leaves of different weights: the runs' inner entries differ (two orders compared)
            assert not np.array_equal(cw, ref_cw)


def test_global_search_reads_out_the_bracket_after_one_counting_phase(monkeypatch):
    """On unsharded leaves (``jmerge.merge`` outside jit) a counting phase also reads out the keys of the bracket the
    previous phase left when every leaf holds at most its read-out capacity of them: every search then ends after two
    phases (four here without it), with NumPy's masks, ties split across leaves included. This 4-leaf tree's bracket
    after one phase holds ~0.5-1% of the entries (~0.06% on ``bench_methods.py``'s 72 leaves: a larger sample), so
    the capacity is raised here to 1/32 of a leaf; at the default (1/512) the bracket is read out one phase later
    (three), and under the default whole-sort limit (how sharded leaves are declared) not at all (four). A phase
    that reads out counts nothing (the host already knows the bracket's entries per leaf): every phase but that
    one narrows the bracket from counts."""
    shapes = {"a": (1024, 1024), "b": (1024, 2816), "c": (37, 5), "d": (1024,)}
    base, models, taus = _finetuned(21, shapes)
    counted, narrowed = [], []  # phases run while a search was open; phases that narrowed from counts
    narrow, read_out = S._GSearch.narrow, S._GSearch.read_out
    monkeypatch.setattr(S._GSearch, "narrow", lambda self, *a: (narrowed.append(1), narrow(self, *a))[1])
    monkeypatch.setattr(S._GSearch, "read_out", lambda self, *a: (counted.append(1), read_out(self, *a))[1])
    capacity = S._read_capacity
    for cap, limit, phases in ((5, None, 2), (9, None, 3), (5, S._SORT_MAX, 4)):
        monkeypatch.setattr(S, "_read_capacity", lambda n: max(16, n >> cap) if cap != 9 else capacity(n))
        jax.clear_caches()  # the capacity is static in the compiled counting phase
        for dens in (0.2, 0.9):
            counted.clear()
            narrowed.clear()
            with S.whole_sort_limit(limit) if limit else contextlib.nullcontext():
                _, extras = jmerge.merge(_global_method(density=dens), base, models, return_extras=True)
            for n, w in zip(sorted(shapes), ref_global(taus, [dens] * 3)):
                np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
            assert len(counted) == phases, (cap, limit, dens, counted)
            assert len(narrowed) == (phases - 1 if limit is None else phases), (cap, limit, dens, narrowed)


def test_global_first_counting_phase_counts_without_snaps(monkeypatch):
    """The first counting phase counts from the whole range, where the snaps would be the row's extreme keys: it
    counts without them (its no-information values move no end of a bracket), every later phase with them. Without
    read-outs (the default whole-sort limit) the searches take several counting phases; the masks equal NumPy's."""
    calls = []
    count_rows = S._count_pass_rows

    def recording(xs, ts, lo, hi, magnitude, inside=False, snaps=True, sums=False):
        calls.append(snaps)
        return count_rows(xs, ts, lo, hi, magnitude, inside, snaps, sums)

    monkeypatch.setattr(S, "_count_pass_rows", recording)
    jax.clear_caches()  # every phase's program traced here
    shapes = {"a": (256, 640), "b": (4099,)}
    base, models, taus = _finetuned(8, shapes)
    with S.whole_sort_limit(S._SORT_MAX):
        _, extras = jmerge.merge(_global_method(density=0.2), base, models, return_extras=True)
    for n, w in zip(sorted(shapes), ref_global(taus, [0.2] * 3)):
        np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
    first = calls.index(True)
    assert first > 0 and not any(calls[:first]) and all(calls[first:]), calls


def test_global_search_reads_nothing_it_did_not_ask_for():
    """A counting phase returns the read-out's outputs as zeros when the host did not ask for it; a leaf shorter
    than a block returns its keys as the read-out's tail, so those zeros could pass the host's count check (a
    bracket at key 0 holding as many entries per leaf as the tail). ``read_done`` tells them apart: the same
    outputs end the search when the read was asked for, and leave it open when not."""
    def collected(done):
        return [{"read_keys": np.zeros((1, 16, 7), np.int32), "read_blocks": np.zeros(1, np.int32),
                 "read_tail": np.zeros((1, 7), np.int32), "read_done": np.asarray(done)} for _ in range(2)]

    for done in (False, True):
        search = S._GSearch(np.array([10]), np.array([7, 7]))
        search.hi[0] = 5  # bracket [0, 5) holding all 14 entries (7 per leaf), k = 10
        search.read_out(collected(done))
        assert bool(search.done()[0]) == done
        if done:  # the zeros taken as keys: the k-th key is 0, tied 14 times
            assert search.lo[0] == 0 and search.glo_i[:, 0].tolist() == [7, 7] and search.ghi_i[:, 0].tolist() == [0, 0]


def test_global_read_only_phase_that_did_not_end_its_search_counts_next():
    """A phase that reads out counts nothing (neutral counts). Should its read-out not end a search (a leaf that
    could not read: not expected once the host checked the capacities), the host must not narrow from its zero
    counts: the bracket and thresholds stay, and the next phase counts them (no read-out asked)."""
    phase = S.global_topk_phases()[2]  # a counting phase after the first (whose finalize narrows before reading out)
    search = S._GSearch(np.array([10]), np.array([7, 7]))
    search.hi[0] = 5  # bracket [0, 5) holding all 14 entries (7 per leaf), k = 10
    search.glo_i[:, 0] = [7, 7]
    ts = np.arange(1, S._G_J + 1, dtype=np.int64)[None]
    token = S._g_put({"search": search, "ts": ts})
    zeros = {"counts": np.zeros((1, S._G_J), np.int32), "below": np.full((1,), S._I32_MIN),
             "above": np.full((1,), S._I32_MAX), "token": np.int32(token)}
    read = {"read_keys": np.zeros((1, 16, 7), np.int32), "read_blocks": np.zeros(1, np.int32),
            "read_tail": np.zeros((1, 7), np.int32)}
    collected = [{**zeros, **read, "read_done": np.asarray(True)}, {**zeros, **read, "read_done": np.asarray(False)}]
    out = phase.finalize(collected, [{"density": np.float32(10 / 14)}] * 2)
    assert not search.done()[0] and search.no_read and not search.readable()
    assert (search.lo[0], search.hi[0]) == (0, 5) and search.glo_i[:, 0].tolist() == [7, 7]
    np.testing.assert_array_equal(np.asarray(out[0]["ts"]), ts)  # the same thresholds, counted next
    assert not bool(out[0]["read"]) and bool(out[0]["run"])
    # every leaf read: the same zeros end the search (the k-th key is 0, tied 14 times), no counts needed
    search2 = S._GSearch(np.array([10]), np.array([7, 7]))
    search2.hi[0] = 5
    token2 = S._g_put({"search": search2, "ts": ts})
    both = [{**c, "token": np.int32(token2), "read_done": np.asarray(True)} for c in collected]
    phase.finalize(both, [{"density": np.float32(10 / 14)}] * 2)
    assert search2.done()[0] and search2.lo[0] == 0 and not search2.no_read


@pytest.mark.parametrize("L,K,p", [(1, 1, 0.5), (31, 4, 0.3), (32, 40, 0.9), (33, 3, 0.5), (1000, 64, 0.02),
                                   (90112, 1024, 0.006), (4099, 2048, 1.0), (4099, 16, 0.0)])
def test_first_true_is_nonzero_of_each_row(L, K, p):
    """``_first_true`` (the read-out's compaction: word population counts, then the bit in the word) against NumPy's
    ``flatnonzero`` per row: the first K True positions in order, -1 past their number, and the count."""
    rng = np.random.default_rng(L + K)
    mask = rng.random((3, L)) < p
    mask[1] = rng.random(L) < min(1.0, 4 * p)  # rows of different counts in one call
    idx, cnt = jax.jit(lambda m: S._first_true(m, K))(jnp.asarray(mask))
    for r in range(3):
        ref = np.flatnonzero(mask[r])
        assert int(cnt[r]) == ref.size
        want = np.full(K, -1)
        want[:min(K, ref.size)] = ref[:K]
        np.testing.assert_array_equal(np.asarray(idx[r]), want)
    flags = jnp.asarray(mask.astype(np.int32) * 3)  # block counts: any positive count flags the block
    bidx, bcnt = S._flagged_blocks(flags, K)
    for r in range(3):
        ref = np.flatnonzero(mask[r])[:K]
        np.testing.assert_array_equal(np.asarray(bidx[r]), np.concatenate([ref, np.full(K - ref.size, L - 1)]))


def _lattice_rows(rng, shape):
    """Task vectors on a coarse float32 lattice (many entries tied at each magnitude), with exact zeros."""
    x = np.round(rng.normal(size=(3,) + shape) * 40).astype(np.float32) / np.float32(1024)
    x[:, : shape[0] // 4] = 0.0
    return x


@pytest.mark.parametrize("case", ["smooth", "tail", "bf16", "lattice"])
def test_tensor_search_reads_out_its_bracket(monkeypatch, case):
    """With the whole-sort limit raised (leaves not sharded, as ``jmerge.merge`` and the executor declare), a
    per-tensor search gathers the blocks holding the span of a pass's thresholds once they fit and ends there,
    its tie cut read from the gathered positions: every mask is NumPy's (ties by flat index), in fewer
    row-passes than the counting search, which the default limit keeps."""
    rng = np.random.default_rng(33)
    if case == "smooth":  # blocks split the last axis of a 3-d row (310 = 10 x 31)
        xs = [rng.normal(size=(3, 40, 310)).astype(np.float32) * np.float32(0.01) for _ in range(2)]
    elif case == "tail":  # a prime length: the flattened row in blocks of 32 and a tail
        xs = [rng.normal(size=(3, 40009)).astype(np.float32) for _ in range(2)]
    elif case == "bf16":
        xs = [_bf16_task_vectors(rng, (64, 512), scale=scale) for scale in (0.005, 0.02)]
    else:
        xs = [_lattice_rows(rng, (96, 320))]
    n = xs[0][0].size
    densities = (0.2, 0.5, 0.9, 0.01, 1 / n, (n - 1) / n)
    with S.whole_sort_limit(8192):
        read = _row_passes(_counted_search(monkeypatch), xs, densities)
    counted = _row_passes(_counted_search(monkeypatch), xs, densities)
    # heavy ties end the counting search at a one-key bracket within a few passes (the read-out then saves the
    # tie cut's pass, which is not a row-pass)
    assert read < counted if case != "lattice" else read <= counted, (read, counted)
    print(case, read, counted)


def test_tensor_search_tail_quantiles_read_out_in_two_passes(monkeypatch):
    """Low densities of Llama-sized rows (Breadcrumbs' top 1%, TIES at 5%): the entries' density falls by tens
    of percent across the bracket the first pass leaves (thousands of entries in a distribution's tail), and
    the next thresholds, placed for that slope (:func:`_slope`), hold the k-th key, so that pass reads the
    bracket out. Interpolated as if uniform they missed it: 56 row-passes for these 6 searches of 3 rows
    (a pass that barely narrowed, then two more), 39 now; masks are NumPy's."""
    rng = np.random.default_rng(7)
    shape = (3, 1024, 2816)
    b = rng.normal(size=shape[1:]).astype(np.float32)
    xs = [rng.normal(size=shape).astype(np.float32) * np.float32(0.01),
          rng.laplace(size=shape).astype(np.float32) * np.float32(0.01),
          np.stack([(b + rng.normal(size=shape[1:]).astype(np.float32) * np.float32(0.01)) - b for _ in range(3)])]
    with S.whole_sort_limit(8192):
        total = _row_passes(_counted_search(monkeypatch), xs, (0.01, 0.05))
    assert total <= 42, total


def test_tensor_search_slope_from_neighbours_of_512_entries(monkeypatch):
    """A top-1% search of float32 task vectors ``(b + 0.01 N) - b`` of a ``(1024, 1024)`` leaf (JAX's keys 0..3):
    after the sample's pass the bracket holds 2708 entries and its left neighbour 918, whose densities show the
    tail's fall; with neighbours of at least 1024 entries required the bracket was taken as uniform, its estimate of
    the k-th key fell 4.9 counting errors above it (beyond all five thresholds) and that row's search took three
    passes more (9 row-passes for the 3 rows instead of 6). Masks are NumPy's either way."""
    key = jax.random.key(0)
    b = jax.random.normal(key, (1024, 1024))
    x = np.stack([np.asarray(b + 0.01 * jax.random.normal(jax.random.fold_in(key, i + 1), b.shape) - b)
                  for i in range(3)])
    with S.whole_sort_limit(8192):
        now = _row_passes(_counted_search(monkeypatch), [x], (0.01,))
        monkeypatch.setattr(S, "_SLOPE_MIN", 1024)
        before = _row_passes(_counted_search(monkeypatch), [x], (0.01,))
    assert now <= 6 < before, (now, before)


def _linear_counts(ts, lo, hi, a, b, total):
    """``G(t) = #{key >= t}`` at keys ``ts`` for entries of density ``a + b (key - lo)`` per key on ``[lo, hi)``
    (``total`` entries at or above ``lo``)."""
    t = np.asarray(ts, np.float64) - lo
    return np.round(total - (a * t + 0.5 * b * t * t)).astype(np.int32)


def test_slope_of_a_linear_density():
    """:func:`select._slope` recovers a linear density's relative slope across the bracket from the neighbouring
    intervals' counts (both, or one side), and gives 0 when the slope is within the counts' noise, when the
    counts are few, or when the bracket straddles a binade (keys halve their step there: no slope)."""
    lo = np.int32(0x3C000000)  # keys of 2^-7 ...: one binade spans 2^23 keys
    step = 20_000
    ts = lo + step * np.arange(1, 6, dtype=np.int32)  # brackets between consecutive thresholds

    def slope(a, b, j, lo_=lo, ts_=ts):
        hi = np.int32(lo_ + 6 * step)
        total = int(a * 6 * step + 0.5 * b * (6 * step) ** 2) + 10
        c = _linear_counts(ts_, lo_, hi, a, b, total)
        glo, ghi = np.int32(total), _linear_counts([hi], lo_, hi, a, b, total)[0]
        as_ = lambda v: jnp.asarray(np.atleast_1d(v))
        g, dg = S._slope(as_(ts_)[None], as_(c)[None], as_(lo_), as_(glo), as_(hi), as_(ghi),
                         as_(ts_[j]), as_(c[j]), as_(ts_[j + 1]), as_(c[j + 1]))
        rho_mid = a + b * (ts_[j] + step / 2 - lo_)
        return float(g[0]), b * step / rho_mid, float(dg[0]), np.concatenate([[glo], c, [ghi]])

    for a, b in ((200.0, -1e-3), (100.0, 5e-4), (30.0, -1.5e-4)):  # millions of entries: little noise
        for j in (0, 1, 3):  # j = 0: the left neighbour is the old bracket's end lo; j = 3: the right one is hi
            got, want, dg, G = slope(a, b, j)
            assert abs(want) > 0.05 and abs(got - want) <= 0.05 * abs(want) + 0.005, (a, b, j, got, want)
            # the part not used is the shrinkage: 3 counting errors of the two neighbours' densities
            noise = np.sqrt(1.0 / (G[j] - G[j + 1]) + 1.0 / (G[j + 2] - G[j + 3]))
            assert dg == pytest.approx(3.0 * noise, rel=1e-4), (a, b, j, dg, noise)
            assert abs(abs(got) + dg - abs(want)) <= 0.05 * abs(want) + 0.005  # together: the measured slope
    assert slope(200.0, 0.0, 2)[:3:2] == (0.0, 0.0)  # uniform (the counts' slope is exactly 0)
    assert slope(0.02, -5e-8, 2)[:3:2] == (0.0, 0.0)  # 400 entries per interval: few
    g, want, dg, _ = slope(1.0, 1e-7, 2)  # a slope of 0.2% across the bracket is within the noise: all of it unused
    assert g == 0.0 and 0.0 < dg <= 3.0 * np.sqrt(2.0 / 20_000) and abs(dg - want) <= 0.02
    near = np.int32(0x3C800000 - 3 * step - step // 2)  # the binade's end inside the middle bracket
    assert slope(200.0, -1e-3, 2, near, near + step * np.arange(1, 6, dtype=np.int32))[:3:2] == (0.0, 0.0)


def test_next_thresholds_spread_for_the_slope_not_used():
    """The next thresholds lie at ``est + err * (-2.5, -0.8, 0, 0.8, 2.5)``; the slope :func:`select._slope` did not
    use (``dg``) adds its error of the estimate, ``D u (1 - u) / 2 * dg`` keys (``du/dg`` for the linear density),
    in quadrature: ``err' = sqrt(err^2 + model^2)``, with ``cap``, at most ``cap`` entries' worth of keys but never
    below ``err`` (the read-out's blocks). NumPy from the formulas."""
    lo, hi = np.int32(0x3C000000), np.int32(0x3C000000 + 200_000)
    glo, ghi, k = 2708, 0, 1167  # the k-th key 1541 entries above lo: f = 1541.5 / 2708
    D, m = 200_000.0, 2708.0
    f = (glo - k + 0.5) / m
    err = 0.5 * D / np.sqrt(m) + 1.0
    as_ = lambda v, dt=np.int32: jnp.asarray(np.atleast_1d(np.asarray(v, dt)))

    def spread(dg, cap=None):
        ts = S._next_thresholds(as_(lo), as_(glo), as_(hi), as_(ghi), as_(False, bool), as_(hi), as_(lo),
                                as_(0.0, np.float32), as_(dg, np.float32), as_(k), cap=cap)
        ts = np.asarray(ts[0], np.int64)
        return ts, (ts[4] - ts[0]) / 5.0  # in keys, per expected error

    ts0, _ = spread(0.0)
    est = D * f
    assert np.allclose(ts0 - lo, np.floor(est + err * np.array([-2.5, -0.8, 0.0, 0.8, 2.5])), atol=2)
    for dg in (0.1, 0.3, 0.9):
        model = D * 0.5 * f * (1.0 - f) * dg
        _, e = spread(dg)
        assert e == pytest.approx(np.hypot(err, model), abs=1.0), (dg, e)
        _, ec = spread(dg, cap=100.0)  # at most 100 entries' keys (7386), at least err (1922)
        assert ec == pytest.approx(min(np.hypot(err, model), max(err, 100.0 * D / m)), abs=1.0), (dg, ec)
    assert spread(0.9, cap=1.0)[1] == pytest.approx(err, abs=1.0)  # never below the counting error


def test_searches_of_one_row_share_its_first_pass(monkeypatch):
    """Two targets per row (Breadcrumbs' cuts, Arcee Fusion's quartiles): with read-outs, the sample's first
    pass counts all six searches of the three rows in one reduction without block flags, and the loop's pass
    counts them in one reduction with their flags; without read-outs, every pass is one reduction of the six,
    no flags. Results equal NumPy's either way."""
    calls = []
    count_rows = S._count_pass_rows

    def recording(xs, ts, lo, hi, magnitude, inside=False, snaps=True):
        calls.append((len(xs), inside is not False, snaps))
        return count_rows(xs, ts, lo, hi, magnitude, inside, snaps)

    monkeypatch.setattr(S, "_count_pass_rows", recording)
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 200, 300)).astype(np.float32)
    k = np.array([[30_000, 20_000, 50_000], [600, 60, 6000]], np.int32)
    ref = np.stack([ref_rows(np.abs(x.reshape(3, -1)), k[p]) for p in range(2)])
    for limit, want in ((8192, {(6, False, True), (6, True, True)}), (None, {(6, False, True)})):
        calls.clear()
        with S.whole_sort_limit(limit) if limit else contextlib.nullcontext():
            v, cut = jax.jit(lambda x: S.topk_thresholds_rows(x, jnp.asarray(k), magnitude=True))(jnp.asarray(x))
        # a conditional's branch may be traced twice (its shapes, then the branch itself)
        assert set(calls) == want and len(calls) <= 4, calls
        got = np.stack([[np.asarray(S.threshold_mask(jnp.asarray(x[t]), v[p, t], cut[p, t], magnitude=True)).reshape(-1)
                         for t in range(3)] for p in range(2)])
        np.testing.assert_array_equal(got, ref)


def test_tensor_search_read_out_merges_equal_the_counting_ones():
    """Eager merges (read-out on rows above the eager sort limit) equal the same merges traced under a user's
    ``jax.jit`` (counting search and tie-cut pass), byte for byte: TIES, Consensus TIES, PCB, Breadcrumbs."""
    rng = np.random.default_rng(34)
    shapes = [(3, 128, 96), (3, 40009), (3, 96, 320)]
    for shape in shapes:
        tau = (_lattice_rows(rng, shape[1:]) if shape[-1] == 320
               else rng.normal(size=shape).astype(np.float32) * np.float32(0.01))
        b = rng.normal(size=shape[1:]).astype(np.float32)
        base, models = {"w": jnp.asarray(b)}, [{"w": jnp.asarray(b + t)} for t in tau]
        for method in (jmerge.ties(density=0.3), jmerge.consensus_ties(), jmerge.pcb(), jmerge.breadcrumbs()):
            eager = jmerge.merge(method, base, models)["w"]
            traced = jax.jit(lambda base, models: jmerge.merge(method, base, models))(base, models)["w"]
            np.testing.assert_array_equal(np.asarray(eager).view(np.int32), np.asarray(traced).view(np.int32))


@pytest.mark.parametrize("shape", [(97, 131), (64, 96), (1000,), (3, 7, 50)], ids=str)
@pytest.mark.parametrize("J", [S._J, S._G_J])
def test_count_pass_rows_equals_one_row_at_a_time(shape, J):
    """The searches' counting in one reduction gives each search's counts, snaps and block counts of ``_count_pass``
    (tails of the blocks included, one and two packed counts), and NumPy's counts: three rows, and a row searched
    twice (its two searches with thresholds of their own, as Breadcrumbs' two cuts)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(shape).astype(np.float32)
    models = [base + rng.standard_normal(shape).astype(np.float32) * s for s in (0.01, 0.1, 1.0)]
    for order in ((0, 1, 2), (0, 0, 1)):
        rows = [models[o] for o in order]
        keys = [np.abs(r - base).view(np.int32).reshape(-1) for r in rows]
        ts = jnp.asarray(np.stack([np.sort(rng.choice(k, J, replace=False)) for k in keys]), jnp.int32)
        lo, hi = ts[:, 1], ts[:, J - 2]
        # a span between two thresholds (columns 1 and J - 2: lo and hi): the same block counts from the packed fields
        fspan = S._FieldSpan(jnp.full((3,), 1, jnp.int32), jnp.full((3,), J - 2, jnp.int32))
        for inside, snaps in ((False, True), (True, True), (fspan, True), (fspan, False)):
            got = jax.jit(lambda b, ms: S._count_pass_rows([(m - b)[None] for m in ms], ts, lo, hi, True,
                                                           inside=inside, snaps=snaps))(base, rows)
            for i, r in enumerate(rows):
                want = S._count_pass(jnp.asarray(r - base)[None], ts[i:i + 1], lo[i:i + 1], hi[i:i + 1], True,
                                     inside=inside is not False)
                np.testing.assert_array_equal(np.asarray(got[0])[i:i + 1], np.asarray(want[0]))
                if snaps:
                    for a, b in zip(got[1:3], want[1:3]):
                        np.testing.assert_array_equal(np.asarray(a)[i:i + 1], np.asarray(b))
                else:  # no-information snaps
                    assert int(got[1][i]) == int(hi[i]) - 1 and int(got[2][i]) == int(lo[i]) + 1
                if inside is not False:
                    np.testing.assert_array_equal(np.asarray(got[3][i]), np.asarray(want[3]))
            np.testing.assert_array_equal(np.asarray(got[0]),
                                          np.stack([(k[:, None] >= np.asarray(t)[None]).sum(0) for k, t in zip(keys, ts)]))


def test_global_search_after_a_missed_first_phase(monkeypatch):
    """When the k-th key falls outside the first counting phase's thresholds (the sample's estimate off by more than
    their ``_G_CS0_READ`` errors, made certain here by thresholds 0.01 errors apart), the next phase counts at sampled keys
    further out on that side (:meth:`select._GSearch.after_miss`) instead of interpolating over a bracket that reaches
    the key range's end: fewer phases than without, every search ends, and the masks equal NumPy's."""
    shapes = {"a": (1024, 1024), "b": (1024, 2816), "c": (37, 5), "d": (1024,)}
    base, models, taus = _finetuned(5, shapes)
    monkeypatch.setattr(S, "_G_CS0_READ", np.array([-0.02, -0.01, 0.0, 0.01, 0.02]))
    phases, missed = [], []
    narrow, after_miss = S._GSearch.narrow, S._GSearch.after_miss

    def recording_miss(self, ts, first):
        out = after_miss(self, ts, first)
        missed.append(int(np.sum(np.any(out != ts, axis=1))))
        return out

    monkeypatch.setattr(S._GSearch, "narrow", lambda self, *a: (phases.append(1), narrow(self, *a))[1])
    counts = {}
    for use in (True, False):
        monkeypatch.setattr(S._GSearch, "after_miss", recording_miss if use else lambda self, ts, first: ts)
        for dens in (0.2, 0.03):
            phases.clear()
            _, extras = jmerge.merge(_global_method(density=dens), base, models, return_extras=True)
            for n, w in zip(sorted(shapes), ref_global(taus, [dens] * 3)):
                np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
            counts[use, dens] = len(phases)
    print(counts, missed)
    assert missed and all(m == 3 for m in missed), missed  # every task's first thresholds missed, and were moved
    for dens in (0.2, 0.03):
        assert counts[True, dens] < counts[False, dens], counts


def test_compact_bracket_keeps_the_bracket_keys_of_the_valid_blocks():
    """The read-out's device compaction (:func:`select._compact_bracket`): of each row's gathered blocks, the first
    ``nblocks`` are valid; their keys with ``lo <= key < hi`` come back in flat order with their number (NumPy's
    boolean selection), the tail as given."""
    rng = np.random.default_rng(9)
    T, C, w = 3, 40, 32
    keys = rng.integers(0, 1 << 20, (T, C, w)).astype(np.int32)
    nb = np.array([40, 7, 0], np.int32)
    lo = np.array([1 << 18, 0, 5], np.int32)
    hi = np.array([(1 << 18) + 4000, 1 << 20, 9], np.int32)
    tail = rng.integers(0, 9, (T, 5)).astype(np.int32)
    got, cnt, t2 = jax.jit(S._compact_bracket)(*map(jnp.asarray, (keys, nb, tail, lo, hi)))
    for t in range(T):
        k = keys[t, :nb[t]].reshape(-1)
        want = k[(k >= lo[t]) & (k < hi[t])]
        assert int(cnt[t]) == want.size
        np.testing.assert_array_equal(np.asarray(got[t])[:want.size], want[:C])
    assert 0 < int(cnt[0]) <= C and int(cnt[1]) == 7 * w > C and int(cnt[2]) == 0
    np.testing.assert_array_equal(np.asarray(t2), tail)


def test_fits_read_out_estimates_each_leafs_share_of_a_bracket():
    """The five first thresholds are kept only when the weighted sample puts every bracket between them within the
    read-out (:meth:`select._GSearch.fits_read_out`): a leaf's share is its size times the bracket's fraction among the
    sampled keys of its size class. Spread keys fit; a leaf whose keys crowd into one bracket does not, and a bracket
    holding more than the read-out in all does not."""
    rng = np.random.default_rng(2)
    sizes = np.array([1 << 20, 1 << 20, 1 << 12])
    counts = np.array([4096, 4096, 128])
    caps = np.array([S._read_capacity(int(n)) for n in sizes], np.float64)
    ts = np.array([400_000, 499_000, 500_000, 501_000, 600_000])

    def search(crowd):
        keys = [rng.integers(0, 1_000_000, c) for c in counts]
        if crowd:
            keys[1][:400] = rng.integers(500_000, 501_000, 400)  # ~10% of leaf 1 in one bracket: ~100k entries
        s = S._GSearch(np.array([1 << 20]), sizes)
        leaf = np.repeat(np.arange(3), counts)
        s.samples[0] = (np.concatenate(keys).astype(np.int64), leaf, sizes / counts)
        return s

    assert search(False).fits_read_out(0, ts[1:4], caps)  # ~0.1% of each leaf per bracket: ~1k of 2048
    assert not search(True).fits_read_out(0, ts[1:4], caps)
    assert not search(False).fits_read_out(0, ts[[0, 4]], caps)  # ~20% of every leaf


@pytest.mark.parametrize("J", [5, 10])
@pytest.mark.parametrize("shape", [(64, 96), (4099,), (7, 33), (5,)])
def test_interval_marks_flag_each_blocks_intervals_between_the_thresholds(shape, J):
    """A whole-model counting phase marks, per block, which intervals between neighbouring thresholds hold entries
    (:func:`select._interval_marks`, from the packed block sums the count adds anyway; five thresholds in one packed
    word, ten in two): bit ``j`` where some key of the block has ``ts[j] <= key < ts[j + 1]`` (NumPy per block, blocks
    of :func:`select._blocks`; repeated thresholds give empty intervals); the counts are those of the pass without
    marks."""
    rng = np.random.default_rng(sum(shape) + J)
    rows = [rng.laplace(size=shape).astype(np.float32) for _ in range(3)]
    keys = [np.abs(r).view(np.int32) for r in rows]
    ts = np.stack([np.sort(np.quantile(k, np.linspace(0.1, 0.95, J)).astype(np.int64)) for k in keys])
    ts[1, 3:] = ts[1, 2]  # empty intervals from the third on
    ts = jnp.asarray(ts.astype(np.int32))
    lo, hi = jnp.zeros(3, jnp.int32), jnp.full(3, S._TOP)
    xs = [jnp.asarray(r)[None] for r in rows]
    out = jax.jit(lambda xs: S._count_pass_rows(xs, ts, lo, hi, True, snaps=J == 10, sums=True))(xs)
    plain = jax.jit(lambda xs: S._count_pass_rows(xs, ts, lo, hi, True, snaps=J == 10))(xs)
    for a, b in zip(out[:3], plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    marks = np.asarray(S._interval_marks(out[3], J))
    main, _ = S._blocks(jnp.zeros((1,) + shape))
    w, nb = main.shape[-1], int(np.prod(main.shape[1:-1]))
    assert marks.shape == (3,) + main.shape[1:-1] and marks.dtype == (np.uint8 if J == 5 else np.uint16)
    t = np.asarray(ts)
    for r in range(3):
        blk = keys[r].reshape(-1)[:nb * w].reshape(nb, w) if nb else np.zeros((0, w), np.int32)
        want = sum(np.any((blk >= t[r, j]) & (blk < t[r, j + 1]), axis=1).astype(np.int64) << j for j in range(J - 1))
        np.testing.assert_array_equal(marks[r].reshape(-1).astype(np.int64), np.asarray(want).reshape(-1))
    if nb:
        top = 1 << (J - 2)
        assert np.any(marks & 1) and np.any(marks & top) and not np.any(marks[1] & ~np.array(3, marks.dtype))


def test_marked_intervals_make_up_each_open_bracket():
    """The host maps each open bracket to the run of first-phase intervals it spans (:meth:`select._GSearch.
    marked_intervals`): bits ``a..b-1`` for ``[ts[a], ts[b])``, 0 for a finished search, None when an end is not one
    of the thresholds (a miss: the read-out then flags its blocks in a pass)."""
    first = np.array([[10, 20, 30, 40, 50], [5, 6, 7, 7, 7], [1, 2, 3, 4, 5]], np.int64)
    s = S._GSearch(np.array([5, 5, 5]), np.array([100, 100]))
    s.lo[:], s.hi[:] = [20, 5, 3], [40, 7, 4]  # the third done: a one-key bracket
    assert s.marked_intervals(first).tolist() == [0b0110, 0b0011, 0]
    s.lo[1], s.hi[1] = 7, S._TOP  # above every threshold: a miss
    assert s.marked_intervals(first) is None


def test_global_read_out_gathers_the_blocks_the_first_phase_marked(monkeypatch):
    """A read-out right after the first counting phase gathers the blocks that phase marked in the bracket's intervals
    instead of a pass flagging them; the masks equal NumPy's and those of the flagging pass (marks refused), at two
    densities, after a first phase of five thresholds (one packed word of marks) and of ten (two; the five refused
    here). The capacity is raised (1/8 of a leaf) so that this small tree's bracket is read out after one phase.
    Out of core (statistics on the host) no marks are asked for."""
    shapes = {"a": (1024, 1024), "b": (1024, 2816), "d": (1024,)}
    base, models, taus = _finetuned(21, shapes)
    used, counted, firsts = [], [], []
    marked, read_out, sample_thresholds = S._GSearch.marked_intervals, S._GSearch.read_out, S._GSearch.sample_thresholds
    monkeypatch.setattr(S._GSearch, "read_out", lambda self, *a: (counted.append(1), read_out(self, *a))[1])
    monkeypatch.setattr(S._GSearch, "sample_thresholds", lambda self, t, cs: (firsts.append(cs.size),
                                                                               sample_thresholds(self, t, cs))[1])
    monkeypatch.setattr(S, "_read_capacity", lambda n: max(16, n >> 3))
    jax.clear_caches()  # the capacity is static in the compiled counting phase
    merged_stats = []
    call = driver.LeafProgram.__call__
    monkeypatch.setattr(driver.LeafProgram, "__call__",
                        lambda self, b, m, hp, k, st=None, *a, **kw: (merged_stats.append(st), call(self, b, m, hp, k, st,
                                                                                                  *a, **kw))[1])
    for fit in (S._G_FIT, 0.0):
        monkeypatch.setattr(S, "_G_FIT", fit)
        for refuse in (False, True):
            monkeypatch.setattr(S._GSearch, "marked_intervals",
                                lambda self, c: used.append(not refuse) or (None if refuse else marked(self, c)))
            for dens in (0.2, 0.9):
                used.clear(), counted.clear(), firsts.clear()
                _, extras = jmerge.merge(_global_method(density=dens), base, models, return_extras=True)
                for n, w in zip(sorted(shapes), ref_global(taus, [dens] * 3)):
                    np.testing.assert_array_equal(np.asarray(extras[n]["mask"]), w)
                # every search ends in the read-out (a block missed would leave it counting)
                assert used == [not refuse] and len(counted) == 2, (fit, refuse, dens, used, counted)
                assert firsts[-1] == (5 if fit else 10), firsts
                # the marks were dropped once read: the merge's programs do not take them
                assert merged_stats and not any("marks" in str(jax.tree_util.keystr(p))
                                                for st in merged_stats for p, _ in
                                                jax.tree_util.tree_flatten_with_path(st)[0]), merged_stats[:1]
    outs = []
    sample = S.global_topk_phases()[0]
    for conv in (lambda a: a, np.asarray):  # device statistics (jmerge.merge), host ones (out of core)
        collected = [{"keys": conv(jnp.asarray(np.arange(1, 65, dtype=np.int32).reshape(1, 64) * (i + 1))),
                      "n": np.int32(1 << 16), "read": np.asarray(True)} for i in range(2)]
        outs.append(sample.finalize(collected, [{"density": np.float32(0.2)}] * 2)[0])
    assert "mark" in outs[0] and "mark" not in outs[1]
