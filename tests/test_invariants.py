"""Invariants every merge method must satisfy (parametrised over jmerge.available_methods())."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from tests._invariants_lib import flat, float_hparams, has_stats, num_models_for
from tests._trees import random_trees

METHODS = sorted(jmerge.available_methods())


def close(a, b, rtol=1e-6, atol=1e-6):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def trees():
    return {dt: random_trees(T=3, seed=1, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)}


def _inputs(trees, name, dtype=jnp.float32):
    method = jmerge.available_methods()[name]()
    T = num_models_for(method)
    base, models = trees[dtype]
    return method, base, models[:T]


def test_registry_is_populated():
    assert {"linear", "task_arithmetic"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_shapes_dtypes_and_finite(trees, name):
    for dt in (jnp.float32, jnp.bfloat16):
        method, base, models = _inputs(trees, name, dt)
        out = jmerge.merge(method, base, models, seed=0)
        assert jax.tree.structure(out) == jax.tree.structure(base)
        for o, b in zip(jax.tree.leaves(out), jax.tree.leaves(base)):
            assert o.shape == b.shape and o.dtype == b.dtype
            assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


@pytest.mark.parametrize("name", METHODS)
def test_under_jit_equals_eager_driver(trees, name):
    method, base, models = _inputs(trees, name)
    a = flat(jmerge.merge(method, base, models, seed=3))
    b = flat(jax.jit(lambda bb, mm: jmerge.merge(method, bb, mm, seed=3))(base, models))
    close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_leaf_by_leaf_equals_whole_tree(trees, name):
    method, base, models = _inputs(trees, name)
    if has_stats(method):
        pytest.skip("whole-model statistics (global scope): checked in its own module")
    whole = flat(jmerge.merge(method, base, models, seed=5))
    paths, bl, _ = jmerge.leaves_with_paths(base)
    ml = [jmerge.leaves_with_paths(m)[1] for m in models]
    hps = jmerge.prepare_leaf_hparams(method, base, len(models))
    for i, p in enumerate(paths):
        leaf = jmerge.merge_leaf(method, bl[i], [m[i] for m in ml], hp=hps[i], path=p, seed=5)
        np.testing.assert_allclose(np.asarray(leaf, np.float32), whole[p], rtol=1e-6, atol=1e-7, err_msg=p)


@pytest.mark.parametrize("name", METHODS)
def test_subtree_gives_same_leaves(trees, name):
    """Per-leaf keys depend on seed and path only: dropping other leaves changes nothing."""
    method, base, models = _inputs(trees, name)
    if has_stats(method):
        pytest.skip("whole-model statistics depend on all leaves by definition")
    whole = flat(jmerge.merge(method, base, models, seed=7))
    sub = lambda t: {"layers": t["layers"]}
    part = flat(jmerge.merge(method, sub(base), [sub(m) for m in models], seed=7))
    for p in part:
        np.testing.assert_array_equal(part[p], whole[p], err_msg=p)


@pytest.mark.parametrize("name", METHODS)
def test_new_hparam_values_do_not_retrace(trees, name):
    method, base, models = _inputs(trees, name)
    jmerge.merge(method, base, models)
    n = jmerge.trace_count()
    new = float_hparams(method)
    out1 = flat(jmerge.merge(method, base, models, hparams=new))
    assert jmerge.trace_count() == n, f"{name} retraced for new values {new}"
    import inspect
    factory = jmerge.available_methods()[name]
    params = inspect.signature(factory).parameters
    if not all(k in params for k in new):
        return
    out2 = flat(jmerge.merge(factory(**new), base, models))
    assert jmerge.trace_count() == n, f"{name} retraced when rebuilt with {new}"
    close(out1, out2, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_result(trees, name):
    method, base, models = _inputs(trees, name)
    a = flat(jmerge.merge(method, base, models, seed=11))
    b = flat(jmerge.merge(method, base, models, seed=11))
    close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_too_few_models_rejected(trees, name):
    method = jmerge.available_methods()[name]()
    base, models = trees[jnp.float32]
    if method.min_models > 1:
        with pytest.raises(jmerge.MergeInputError, match="at least"):
            jmerge.merge(method, base, models[: method.min_models - 1])
    if method.max_models is not None:
        with pytest.raises(jmerge.MergeInputError, match="at most"):
            jmerge.merge(method, base, (models * 2)[: method.max_models + 1])
    with pytest.raises(jmerge.MergeInputError):
        jmerge.merge(method, base, [])
