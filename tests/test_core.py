import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import Gradient, MergeInputError, PerModel, Rules
from tests._trees import random_trees


def flat(tree):
    paths, leaves, _ = jmerge.leaves_with_paths(tree)
    return dict(zip(paths, [np.asarray(x, np.float32) for x in leaves]))


def test_task_arithmetic_matches_numpy_and_keeps_dtype():
    base, models = random_trees(T=3, dtype=jnp.bfloat16)
    out = jmerge.merge(jmerge.task_arithmetic(scale=0.3, weight=PerModel([1.0, 0.5, 2.0])), base, models)
    fb, fms, fo = flat(base), [flat(m) for m in models], flat(out)
    for p in fb:
        ref = fb[p] + 0.3 * sum(w * (fm[p] - fb[p]) for w, fm in zip([1.0, 0.5, 2.0], fms))
        ref = np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float32)
        np.testing.assert_allclose(fo[p], ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_task_arithmetic_fp32_exactish():
    base, models = random_trees(T=2)
    out = jmerge.merge(jmerge.task_arithmetic(scale=0.7), base, models)
    fb, fms, fo = flat(base), [flat(m) for m in models], flat(out)
    for p in fb:
        ref = fb[p].astype(np.float64) + 0.7 * sum(fm[p].astype(np.float64) - fb[p] for fm in fms)
        np.testing.assert_allclose(fo[p], ref, rtol=1e-6, atol=1e-6)


def test_linear_is_weighted_average():
    base, models = random_trees(T=3)
    w = [0.2, 0.3, 0.5]
    out = flat(jmerge.merge(jmerge.linear(weight=PerModel(w)), base, models))
    fms = [flat(m) for m in models]
    for p in out:
        ref = sum(wi * fm[p].astype(np.float64) for wi, fm in zip(w, fms)) / sum(w)
        np.testing.assert_allclose(out[p], ref, rtol=1e-6, atol=1e-6)


def test_negation():
    base, models = random_trees(T=1)
    out = flat(jmerge.merge(jmerge.negation(scale=0.5), base, models))
    fb, fm = flat(base), flat(models[0])
    for p in out:
        np.testing.assert_allclose(out[p], fb[p] - 0.5 * (fm[p] - fb[p]), rtol=1e-6, atol=1e-6)


def test_gradient_rules_permodel_resolution():
    base, _ = random_trees(T=1)
    # 3 layers (0, 1, 2): t = 0, 0.5, 1; non-layer leaves get t = 0.
    hp = jmerge.resolve_hparams({"g": Gradient([0.0, 1.0, 0.0]),
                                 "r": Rules([("attn", 2.0), ("re:norm$", Gradient([1, 3]))], 9.0),
                                 "pm": PerModel([1.0, Gradient([0.0, 4.0])])}, base)
    paths = jmerge.leaves_with_paths(base)[0]
    got = {p: {k: v.tolist() for k, v in h.items()} for p, h in zip(paths, hp)}
    assert got["layers.0.attn.w"]["g"] == 0.0 and got["layers.1.attn.w"]["g"] == 1.0
    assert got["layers.2.mlp.w"]["g"] == 0.0 and got["embed"]["g"] == 0.0
    assert got["layers.1.attn.w"]["r"] == 2.0 and got["layers.1.norm"]["r"] == 2.0  # 1 + 2 * 0.5
    assert got["head"]["r"] == 9.0
    assert got["layers.1.norm"]["pm"] == [1.0, 2.0]
    # mergekit list-of-dicts form: first matching filter wins, entry without filter is the default
    hp2 = jmerge.resolve_hparams({"t": [{"filter": "attn", "value": [0, 1]}, {"filter": "w", "value": 5},
                                        {"value": 0.25}]}, base)
    got2 = dict(zip(paths, [h["t"].item() for h in hp2]))
    assert got2["layers.1.attn.w"] == 0.5 and got2["layers.2.mlp.w"] == 5 and got2["head"] == 0.25


def test_pytree_hparam_and_unknown_name():
    base, models = random_trees(T=2)
    scales = jax.tree.map(lambda x: 0.0, base)
    scales["head"] = 1.0
    out = flat(jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": scales}))
    fb = flat(base)
    assert np.allclose(out["embed"], fb["embed"]) and not np.allclose(out["head"], fb["head"])
    with pytest.raises(MergeInputError, match="no hyperparameter"):
        jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"densty": 0.1})


def test_no_retrace_on_new_values():
    base, models = random_trees(T=2)
    jmerge.merge(jmerge.task_arithmetic(scale=0.1), base, models, hparams={"weight": PerModel([0.5, 1.0])})
    n = jmerge.trace_count()
    for s in [0.2, 0.3, 0.9]:
        jmerge.merge(jmerge.task_arithmetic(scale=s), base, models, hparams={"weight": PerModel([s, 1.0])})
    jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": Gradient([0.1, 0.9])})
    assert jmerge.trace_count() == n


def test_inside_user_jit_and_traced_hparams():
    base, models = random_trees(T=2)
    f = jax.jit(lambda b, ms, s: jmerge.merge(jmerge.task_arithmetic(), b, ms, hparams={"scale": s}))
    a = flat(f(base, models, jnp.float32(0.4)))
    b = flat(jmerge.merge(jmerge.task_arithmetic(scale=0.4), base, models))
    for p in a:
        np.testing.assert_allclose(a[p], b[p], rtol=1e-6, atol=1e-7)


def test_task_vectors_input_and_apply_delta():
    base, models = random_trees(T=2, dtype=jnp.bfloat16)
    tv = jmerge.task_vectors(base, models)
    assert jax.tree.leaves(tv)[0].dtype == jnp.float32 and jax.tree.leaves(tv)[0].shape[0] == 2
    a = flat(jmerge.merge(jmerge.task_arithmetic(scale=0.5), base, task_vectors=tv))
    b = flat(jmerge.merge(jmerge.task_arithmetic(scale=0.5), base, models))
    for p in a:
        np.testing.assert_array_equal(a[p], b[p])
    d = jax.tree.map(lambda t: t.sum(0), tv)
    out = jmerge.apply_delta(base, d, 0.5)
    assert jax.tree.leaves(out)[0].dtype == jnp.bfloat16


def test_errors_name_the_leaf():
    base, models = random_trees(T=2)
    bad = jax.tree.map(lambda x: x, models[1])
    bad["layers"]["1"]["attn"]["w"] = jnp.zeros((16, 11))
    with pytest.raises(MergeInputError, match=r"layers\.1\.attn\.w.*\(16, 11\)"):
        jmerge.merge(jmerge.task_arithmetic(), base, [models[0], bad])
    bad2 = dict(models[1])
    bad2.pop("head")
    with pytest.raises(MergeInputError, match="head"):
        jmerge.merge(jmerge.task_arithmetic(), base, [models[0], bad2])
    nan = jax.tree.map(lambda x: x, models[0])
    nan["embed"] = nan["embed"].at[0, 0].set(jnp.nan)
    jmerge.merge(jmerge.task_arithmetic(), base, [nan])  # opt-in check: no error by default
    with pytest.raises(MergeInputError, match="embed.*NaN"):
        jmerge.merge(jmerge.task_arithmetic(), base, [nan], check_finite=True)
    with pytest.raises(MergeInputError, match="2 models"):
        jmerge.merge(jmerge.task_arithmetic(weight=PerModel([1, 2, 3])), base, models)


def test_leaf_key_depends_on_path_only():
    k1 = jax.random.key_data(jmerge.leaf_key(3, "a.b"))
    k2 = jax.random.key_data(jmerge.leaf_key(3, "a.b"))
    k3 = jax.random.key_data(jmerge.leaf_key(3, "a.c"))
    k4 = jax.random.key_data(jmerge.leaf_key(4, "a.b"))
    assert np.array_equal(k1, k2) and not np.array_equal(k1, k3) and not np.array_equal(k1, k4)


def test_leaf_key_of_int_seeds_is_cached_concrete_and_unchanged():
    """Integer seeds' keys are computed once: the same bits as folding by hand (a key array seed, the
    uncached path), no tracer kept when the first call happens inside jit, no op dispatched on a repeat."""
    import zlib

    path = "layers.3.mlp.kernel"
    by_hand = jax.random.fold_in(jax.random.key(11), np.uint32(zlib.crc32(path.encode()) & 0x7FFFFFFF))
    inside = jax.jit(lambda x: x + jax.random.uniform(jmerge.leaf_key(11, path)))(1.0)  # first call: in a trace
    k = jmerge.leaf_key(11, path)
    assert not isinstance(k, jax.core.Tracer)
    assert np.array_equal(jax.random.key_data(k), jax.random.key_data(by_hand))
    assert np.array_equal(jax.random.key_data(jmerge.leaf_key(jax.random.key(11), path)), jax.random.key_data(k))
    assert float(inside) == 1.0 + float(jax.random.uniform(by_hand))
    assert jmerge.leaf_key(np.int64(11), path) is k  # cached: the same array object, nothing recomputed
    with jax.transfer_guard("disallow"):
        assert jmerge.leaf_key(11, path) is k


def test_leaf_key_host_threefry_equals_jax():
    """The host-side Threefry-2x32 of integer seeds gives JAX's bits (``fold_in(key(seed), h)``) for seeds and
    path hashes over their whole ranges; a seed outside ``[0, 2**31)`` takes JAX's own path."""
    import zlib

    from jmerge.core.tree import _threefry_fold_in_data

    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 42, 2**31 - 1] + [int(s) for s in rng.integers(0, 2**31, 12)]
    hashes = [0, 1, 0x7FFFFFFF, 0xFFFFFFFF] + [int(h) for h in rng.integers(0, 2**32, 12)]
    for s in seeds:
        for h in hashes:
            ref = jax.random.key_data(jax.random.fold_in(jax.random.key(s), np.uint32(h)))
            assert np.array_equal(_threefry_fold_in_data(s, h), ref), (s, h)
    path = "model.layers.0.mlp.up_proj.weight"
    h = zlib.crc32(path.encode()) & 0x7FFFFFFF
    for s in (5, -3):  # the host path, and JAX's (a negative seed)
        k = jmerge.leaf_key(s, path)
        assert jax.random.key_impl(k) == jax.random.key_impl(jax.random.key(0))
        assert np.array_equal(jax.random.key_data(k),
                              jax.random.key_data(jax.random.fold_in(jax.random.key(s), np.uint32(h))))


def test_leaves_with_paths_cached_by_structure():
    """Paths are built once per tree structure: equal for equal structures, never reused across different
    keys, and computed without the cache for a node whose auxiliary data cannot be hashed."""
    from jmerge.core.tree import leaves_with_paths

    a = {"enc": {"w": np.zeros(2), "b": np.zeros(1)}, "head": [np.zeros(3), np.ones(1)]}
    b = {"enc": {"w": np.ones(2), "b": np.ones(1)}, "head": [np.ones(3), np.zeros(1)]}
    c = {"enc": {"w": np.zeros(2), "bias": np.zeros(1)}, "head": [np.zeros(3), np.ones(1)]}
    pa, la, _ = leaves_with_paths(a)
    assert pa == ["enc.b", "enc.w", "head.0", "head.1"] and leaves_with_paths(b)[0] == pa
    assert leaves_with_paths(c)[0] == ["enc.bias", "enc.w", "head.0", "head.1"]
    assert all(x is y for x, y in zip(la, jax.tree.leaves(a)))
    pa.append("mutated")  # a caller's list is its own
    assert leaves_with_paths(a)[0] == ["enc.b", "enc.w", "head.0", "head.1"]

    @jax.tree_util.register_pytree_with_keys_class
    class Box:
        def __init__(self, x, meta):
            self.x, self.meta = x, meta

        def tree_flatten_with_keys(self):
            return ((jax.tree_util.GetAttrKey("x"), self.x),), self.meta

        @classmethod
        def tree_unflatten(cls, meta, children):
            return cls(children[0], meta)

    assert leaves_with_paths({"k": Box(np.zeros(2), ["unhashable"])})[0] == ["k.x"]


def test_flax_nnx_state_merges():
    from flax import nnx

    def make(seed):
        return nnx.split(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(seed)), nnx.Linear(3, 2, rngs=nnx.Rngs(seed + 1))))

    gdef, base = make(0)
    ms = [make(s)[1] for s in (10, 20)]
    out = jmerge.merge(jmerge.task_arithmetic(scale=0.5), base, ms)
    assert type(out) is type(base)
    model = nnx.merge(gdef, out)
    y = model(jnp.ones((1, 4)))
    assert y.shape == (1, 2)
    lb, l0, l1, lo = (jax.tree.leaves(t) for t in (base, ms[0], ms[1], out))
    for b, a0, a1, o in zip(lb, l0, l1, lo):
        np.testing.assert_allclose(o, b + 0.5 * ((a0 - b) + (a1 - b)), rtol=1e-6, atol=1e-6)


_GROUPED_CALLS = []


def _counted_mean(state, hp):
    _GROUPED_CALLS.append(1)
    return state.replace(merged=jnp.mean(state.tau, axis=0) * hp["weight"])


def test_grouped_leaves_trace_the_merge_body_once():
    """Inside a user's jit, leaves of one shape share one loop body whose Python runs once (its jaxpr gives the
    output shapes and the body), and every leaf gets its own merge (NumPy: base + w * mean(tau))."""
    method = jmerge.transform("counted_mean", _counted_mean, hparams={"weight": 1.0})
    rng = np.random.default_rng(3)
    base = {f"w{i}": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32) for i in range(3)}
    models = [jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), jnp.float32), base) for _ in range(2)]
    _GROUPED_CALLS.clear()
    out = jax.jit(lambda w: jmerge.merge(method, base, models, hparams={"weight": w}, group_leaves=True))(0.5)
    assert len(_GROUPED_CALLS) == 1
    for k in base:
        tau = np.stack([np.asarray(m[k]) - np.asarray(base[k]) for m in models])
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(base[k]) + 0.5 * tau.mean(0), rtol=1e-6, atol=1e-6)
