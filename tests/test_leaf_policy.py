"""Leaf policy and input errors: what is merged, what is taken from the base, what is refused."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jmerge
from jmerge import Gradient, MergeInputError, NonFloatLeavesWarning, OptimizerStateWarning, PerModel, Rules
from tests._trees import random_trees


def _with_counters(base, models):
    b = dict(base, step=jnp.int32(0), flag=jnp.array([True, False]), rng=jax.random.key(0),
             raw_key=jax.random.PRNGKey(1))
    ms = [dict(m, step=jnp.int32(100), flag=jnp.array([False, True]), rng=jax.random.key(t + 5),
               raw_key=jax.random.PRNGKey(t + 9)) for t, m in enumerate(models)]
    return b, ms


def test_non_float_leaves_come_from_the_base_with_one_warning():
    base, models = random_trees(T=3, seed=1)
    b, ms = _with_counters(base, models)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = jmerge.merge(jmerge.task_arithmetic(), b, ms)
    ours = [w for w in rec if issubclass(w.category, NonFloatLeavesWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "4 non-float leaves" in msg and "'step' (int32)" in msg and "'rng' (key<fry>)" in msg
    assert int(out["step"]) == 0  # not 300
    np.testing.assert_array_equal(np.asarray(out["flag"]), [True, False])
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(b["rng"]))
    np.testing.assert_array_equal(np.asarray(out["raw_key"]), np.asarray(b["raw_key"]))
    ref = jmerge.merge(jmerge.task_arithmetic(), base, models)  # float leaves unchanged by the extras
    for k in base:
        np.testing.assert_array_equal(np.asarray(jax.tree.leaves(out[k])[0]), np.asarray(jax.tree.leaves(ref[k])[0]))


def test_non_float_error_option_and_complex_leaves():
    base, models = random_trees(T=2, seed=2)
    b, ms = _with_counters(base, models)
    with pytest.raises(MergeInputError, match=r"4 leaves are not floating-point: .*'step' \(int32\).*non_float='base'"):
        jmerge.merge(jmerge.task_arithmetic(), b, ms, non_float="error")
    bc = dict(base, z=jnp.ones(3, jnp.complex64))
    mc = [dict(m, z=jnp.ones(3, jnp.complex64)) for m in models]
    with pytest.raises(MergeInputError, match=r"leaf 'z' is complex"):
        jmerge.merge(jmerge.task_arithmetic(), bc, mc)
    mi = [dict(m, head=jnp.ones(m["head"].shape, jnp.int32)) for m in models]
    with pytest.raises(MergeInputError, match=r"leaf 'head': the base is floating-point but model 0"):
        jmerge.merge(jmerge.task_arithmetic(), base, mi)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.dense = nnx.Linear(8, 4, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.calls = nnx.Variable(jnp.array(0))


def test_flax_nnx_state_with_rngs_merges():
    """An NNX state with Rngs (typed PRNG keys and uint32 counters) and an int counter merges."""
    states = []
    for s in range(3):
        net = _Net(nnx.Rngs(s))
        net.calls.value = jnp.array(s * 10)
        states.append(nnx.state(net))
    base, models = states[0], states[1:]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = jmerge.merge(jmerge.task_arithmetic(scale=0.5), base, models)
    assert any(issubclass(w.category, NonFloatLeavesWarning) for w in rec)
    assert int(out["calls"].value) == 0
    k = jmerge.leaves_with_paths(out)
    for p, x, b, m1, m2 in zip(k[0], k[1], *[jmerge.leaves_with_paths(s)[1] for s in states]):
        if jmerge.leaf_kind(b) == "float":
            np.testing.assert_allclose(np.asarray(x), np.asarray(b) + 0.5 * ((np.asarray(m1) - b) + (np.asarray(m2) - b)),
                                       rtol=1e-6, atol=1e-6, err_msg=p)
        elif jmerge.leaf_kind(b) == "key":
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(b))
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(b))
    net = nnx.merge(nnx.graphdef(_Net(nnx.Rngs(0))), out)  # the merged state loads into the module
    assert net.dense(jnp.ones((1, 8))).shape == (1, 4)


def test_flax_linen_params_merge():
    m = nn.Dense(3)
    trees = [m.init(jax.random.key(s), jnp.ones((1, 4)))["params"] for s in range(3)]
    out = jmerge.merge(jmerge.task_arithmetic(), trees[0], trees[1:])
    ref = trees[0]["kernel"] + (trees[1]["kernel"] - trees[0]["kernel"]) + (trees[2]["kernel"] - trees[0]["kernel"])
    np.testing.assert_allclose(np.asarray(out["kernel"]), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_optimizer_state_gets_a_warning():
    base, models = random_trees(T=2, seed=3)
    opt = optax.adam(1e-3)
    b = {"params": base, "opt": opt.init(base)}
    ms = [{"params": m, "opt": opt.init(m)} for m in models]
    with pytest.warns(OptimizerStateWarning, match=r"ScaleByAdamState at 'opt\.0'"):
        jmerge.merge(jmerge.task_arithmetic(), b, ms)


def test_models_not_in_a_list():
    base, models = random_trees(T=2, seed=4)
    with pytest.raises(MergeInputError, match=r"models must be a list.*got a dict.*\[ft\]"):
        jmerge.merge(jmerge.ties(), base, models[0])
    lbase = [jnp.ones(3), jnp.zeros(2)]
    with pytest.raises(MergeInputError, match="single parameter tree shaped like the base"):
        jmerge.merge(jmerge.task_arithmetic(), lbase, [jnp.ones(3) * 2, jnp.zeros(2)])


def test_containers_do_not_change_meaning():
    """A bare list (or tuple, or 1-D array) is refused: PerModel and Gradient say what is meant."""
    base, models = random_trees(T=3, seed=5)
    for bare in ([0.7, 0.2, 0.1], (0.7, 0.2, 0.1), np.array([0.7, 0.2, 0.1]), jnp.array([0.7, 0.2, 0.1])):
        with pytest.raises(MergeInputError, match=r"'weight'.*ambiguous.*PerModel.*Gradient"):
            jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"weight": bare})
    a = jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"weight": PerModel([0.7, 0.2, 0.1])})
    b = jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"weight": PerModel(jnp.array([0.7, 0.2, 0.1]))})
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    g = jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": Gradient([0.0, 1.0])})
    np.testing.assert_array_equal(np.asarray(g["layers"]["0"]["attn"]["w"]), np.asarray(base["layers"]["0"]["attn"]["w"]))


def test_rules_filter_matching_nothing_is_an_error_unless_allowed():
    base, models = random_trees(T=2, seed=6)
    with pytest.raises(MergeInputError, match=r"filter 'self_attn' is never used \(it matches no leaf"):
        jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": Rules([("self_attn", 0.3)], 1.0)})
    with pytest.raises(MergeInputError, match=r"filter 'layers.0' is never used \(earlier rules win"):
        jmerge.merge(jmerge.task_arithmetic(), base, models,
                     hparams={"scale": Rules([("layers", 0.3), ("layers.0", 0.5)], 1.0)})
    out = jmerge.merge(jmerge.task_arithmetic(), base, models,
                       hparams={"scale": Rules([("self_attn", 0.3)], 0.0, allow_unused=True)})
    np.testing.assert_array_equal(np.asarray(out["head"]), np.asarray(base["head"]))
