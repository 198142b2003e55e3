"""Inside a user's jit, leaves of one shape share one traced body: compile work follows shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge


def _trees(n, T=3, shape=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    base = {f"l{i}": jnp.asarray(rng.normal(size=shape), jnp.float32) for i in range(n)}
    base["odd"] = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    ms = [{k: v + 0.1 * jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in base.items()} for _ in range(T)]
    return base, ms


_eqns = jmerge.core.count_eqns  # equations of a jaxpr and its sub-jaxprs


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "pcb"])
def test_program_size_follows_shapes_not_leaves(name):
    """Compile-heavy bodies (top-k searches on leaves of more than 2048 entries) are traced once per shape."""
    method = jmerge.available_methods()[name]()
    size = {}
    for n in (8, 32):
        base, ms = _trees(n)
        size[n] = _eqns(jax.make_jaxpr(lambda b, m: jmerge.merge(method, b, m))(base, ms).jaxpr)
    assert size[32] < 1.5 * size[8], size
    base, ms = _trees(8)
    ungrouped = _eqns(jax.make_jaxpr(lambda b, m: jmerge.merge(method, b, m, group_leaves=False))(base, ms).jaxpr)
    assert ungrouped > 3 * size[8]  # what grouping avoids: one copy of the body per leaf


@pytest.mark.parametrize("name", ["ties", "dare_linear", "emr", "iso_cts", "consensus_ta"])
def test_grouped_equals_ungrouped_and_eager(name):
    method = jmerge.available_methods()[name]()
    base, ms = _trees(5, seed=1)
    eager, ex_e = jmerge.merge(method, base, ms, seed=3, return_extras=True)
    grouped, ex_g = jax.jit(lambda b, m: jmerge.merge(method, b, m, seed=3, return_extras=True))(base, ms)
    plain = jax.jit(lambda b, m: jmerge.merge(method, b, m, seed=3, group_leaves=False))(base, ms)
    forced = jax.jit(lambda b, m: jmerge.merge(method, b, m, seed=3, group_leaves=True))(base, ms)
    chex.assert_trees_all_close(forced, eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grouped, eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(plain, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ex_e), jax.tree.leaves(ex_g)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-5, atol=1e-6)


def test_auto_grouping_keeps_cheap_bodies_inline():
    base, ms = _trees(8)
    ta = _eqns(jax.make_jaxpr(lambda b, m: jmerge.merge(jmerge.task_arithmetic(), b, m))(base, ms).jaxpr)
    forced = _eqns(jax.make_jaxpr(lambda b, m: jmerge.merge(jmerge.task_arithmetic(), b, m, group_leaves=True))(
        base, ms).jaxpr)
    inline = _eqns(jax.make_jaxpr(lambda b, m: jmerge.merge(jmerge.task_arithmetic(), b, m, group_leaves=False))(
        base, ms).jaxpr)
    assert ta == inline and forced != inline
    with pytest.raises(jmerge.MergeInputError, match="group_leaves"):
        jmerge.merge(jmerge.ties(), base, ms, group_leaves="yes")
