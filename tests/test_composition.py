"""Composition: every step owns its hyperparameters (named steps, qualified names, public aliases)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError, PerModel
from tests._trees import k_round, np_taus, random_trees


def _readme_chain():
    return jmerge.chain(jmerge.dare(density=0.3), jmerge.trim(density=0.5), jmerge.elect_sign(),
                        jmerge.disjoint_merge(), jmerge.scale(0.8))


def test_readme_chain_applies_dare_at_its_own_density():
    """The README's chain: DARE keeps ~30% (its own 0.3), the trim keeps round(0.5 n) of what is left."""
    base, models = random_trees(T=3, seed=3, shapes={"w": (64, 96), "v": (4000,)})
    out, ex = jmerge.merge(_readme_chain(), base, models, return_extras=True, seed=1)
    for p in ("w", "v"):
        dm = np.asarray(ex[p]["dare_mask"])
        n = dm[0].size
        kept = dm.reshape(3, -1).mean(axis=1)
        # Binomial(n, 0.3): 5 standard deviations
        assert np.all(np.abs(kept - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n)), kept
        tm = np.asarray(ex[p]["trim_mask"]).reshape(3, -1)
        assert np.all(tm.sum(axis=1) == k_round(0.5, n))
        # entries the drop removed are zeros: the trim can only rank them last
        assert np.all((tm & dm.reshape(3, -1)).sum(axis=1) == np.minimum(dm.reshape(3, -1).sum(axis=1), k_round(0.5, n)))
    # NumPy reference of the whole chain given the drawn DARE mask
    for p, b, tau in np_taus(base, models):
        dm = np.asarray(ex[p]["dare_mask"]).astype(bool)
        dropped = np.where(dm, tau / np.float32(0.3), 0.0).reshape(3, -1)
        trimmed = np.zeros_like(dropped)
        for t in range(3):
            order = np.argsort(-np.abs(dropped[t]), kind="stable")[:k_round(0.5, dropped.shape[1])]
            trimmed[t, order] = dropped[t, order]
        sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        num = np.where(agree, trimmed, 0).sum(0)
        cnt = agree.sum(0)
        ref = b.reshape(-1) + 0.8 * num / np.where(cnt == 0, 1, cnt)
        np.testing.assert_allclose(np.asarray(out[p]).reshape(-1), ref, rtol=1e-5, atol=1e-6, err_msg=p)


def test_equal_densities_differ_from_the_readme_chain():
    """The old shared-namespace bug ran DARE at the trim's density: the two results must differ."""
    base, models = random_trees(T=3, seed=4, shapes={"w": (64, 96)})
    a = jmerge.merge(_readme_chain(), base, models, seed=2)
    b = jmerge.merge(_readme_chain(), base, models, seed=2, hparams={"dare.density": 0.5})
    assert not np.allclose(np.asarray(a["w"]), np.asarray(b["w"]))


def test_steps_are_addressed_by_qualified_and_public_names():
    c = _readme_chain()
    assert [n for n, _ in c.steps] == ["dare", "trim", "elect_sign", "disjoint_merge", "scale"]
    assert c.defaults == {"dare.density": 0.3, "trim.density": 0.5, "elect_sign.weight": 1.0,
                          "disjoint_merge.weight": 1.0, "scale.scale": 0.8}
    assert c.aliases == {"scale": ("scale.scale",)}
    assert set(c.ambiguous) == {"density", "weight"}
    b = c.bind({"dare.density": 0.1, "scale": 2.0})
    assert b["dare.density"] == 0.1 and b["trim.density"] == 0.5 and b["scale.scale"] == 2.0
    with pytest.raises(MergeInputError, match=r"'density' is ambiguous.*'dare\.density', 'trim\.density'"):
        c.bind({"density": 0.2})
    with pytest.raises(MergeInputError, match=r"no hyperparameter 'lambda'.*valid names: .*dare\.density"):
        c.bind({"lambda": 0.2})
    with pytest.raises(MergeInputError, match="given twice"):
        jmerge.ties().bind({"density": 0.1, "trim.density": 0.2})


def test_named_methods_declare_their_public_names():
    t = jmerge.ties(density=0.3, weight=PerModel([1.0, 2.0]))
    assert t.aliases["density"] == ("trim.density",)
    assert t.aliases["weight"] == ("elect_sign.weight", "disjoint_merge.weight")
    assert t.hparams == {"density": 0.3, "weight": PerModel([1.0, 2.0]), "scale": 1.0}
    d = jmerge.dare_ties(trim_density=0.2)
    assert d.aliases["density"] == ("dare.density",) and d.aliases["trim_density"] == ("trim.density",)
    # every registered method: its public names are what its factory's keyword arguments call them
    # (or per-leaf hyperparameters whose default is computed from the path, such as LiNeS' layer_position)
    import inspect
    for name, factory in jmerge.available_methods().items():
        m = factory()
        params = set(inspect.signature(factory).parameters)
        computed = {a for a, v in m.hparams.items() if callable(v)}
        assert set(m.aliases) - computed <= params, (name, set(m.aliases) - params)


def test_labelled_and_nested_chains():
    c = jmerge.chain(("drop", jmerge.dare(0.3)), ("keep", jmerge.trim(0.5)), jmerge.weighted_sum())
    assert [n for n, _ in c.steps] == ["drop", "keep", "weighted_sum"]
    assert c.defaults["drop.density"] == 0.3 and c.defaults["keep.density"] == 0.5
    two = jmerge.chain(("a", jmerge.task_arithmetic(scale=0.5)), ("b", jmerge.lines_scale()))
    assert two.aliases["a.scale"] == ("a.scale.scale",) and "alpha" in two.aliases
    rep = jmerge.chain(jmerge.trim(0.5), jmerge.trim(0.2), jmerge.weighted_sum())
    assert [n for n, _ in rep.steps] == ["trim", "trim_2", "weighted_sum"]
    bound = jmerge.chain(jmerge.dare(0.3), jmerge.trim(0.5), jmerge.weighted_sum(),
                         aliases={"density": ("dare.density", "trim.density")})
    assert bound.bind({"density": 0.7})["trim.density"] == 0.7
    with pytest.raises(MergeInputError, match="alias 'x' targets 'nope'"):
        jmerge.chain(jmerge.dare(), aliases={"x": "nope"})


def test_with_hparams_keeps_identity_and_sets_step_defaults():
    t = jmerge.ties(density=0.2)
    u = t.with_hparams(density=0.4, scale=0.5)
    assert u == t and hash(u) == hash(t)
    assert u.defaults["trim.density"] == 0.4 and t.defaults["trim.density"] == 0.2


def test_identity_is_made_once_and_not_pickled():
    """A method's identity (its jit cache key as a static argument) is built on first use and kept; equal methods
    still compare and hash equal, other configurations differ, and a pickled method carries no cached hash (a
    function's hash is its id, which another process does not share)."""
    import pickle
    t = jmerge.ties(density=0.2)
    h = hash(t)
    assert t.__dict__["_hash"] == h and t._identity() is t._identity()
    assert hash(jmerge.ties(density=0.7)) == h and jmerge.ties(density=0.7) == t
    assert jmerge.ties(scope="global") != t and jmerge.ties(rounding="floor") != t
    state = t.__getstate__()
    assert "_hash" not in state and "_ident" not in state
    u = pickle.loads(pickle.dumps(t))
    assert "_hash" not in u.__dict__ and u == t and hash(u) == h


def test_uncalled_factory_is_a_clear_error():
    base, models = random_trees(T=2)
    with pytest.raises(MergeInputError, match=r"factory 'ties' itself; call it.*jmerge\.ties\(\)"):
        jmerge.merge(jmerge.ties, base, models)
    with pytest.raises(MergeInputError, match="factory 'dare'"):
        jmerge.chain(jmerge.dare, jmerge.weighted_sum())


def test_traced_values_do_not_recompile_and_vmap_over_settings():
    base, models = random_trees(T=3, seed=5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(lam, d):
        return jmerge.merge(jmerge.ties(), base, models, hparams={"scale": lam, "density": d})

    a = f(0.5, 0.2)
    b = f(0.7, 0.3)  # a second trace would raise
    chex.assert_trees_all_close(b, jmerge.merge(jmerge.ties(density=0.3, scale=0.7), base, models),
                                rtol=1e-6, atol=1e-6)
    lams = jnp.array([0.1, 0.5, 0.9])
    vm = jax.vmap(lambda lam: jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"scale": lam}))(lams)
    for i, lam in enumerate([0.1, 0.5, 0.9]):
        one = jmerge.merge(jmerge.task_arithmetic(scale=lam), base, models)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], vm), one, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(a["head"]), np.asarray(b["head"]))


def test_traced_per_model_weights():
    base, models = random_trees(T=3, seed=6)
    w = jnp.array([0.2, 0.5, 1.0])
    out = jax.jit(lambda w: jmerge.merge(jmerge.task_arithmetic(), base, models, hparams={"weight": PerModel(w)}))(w)
    ref = jmerge.merge(jmerge.task_arithmetic(weight=PerModel([0.2, 0.5, 1.0])), base, models)
    chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=1e-6)


def test_range_checks_host_and_traced():
    base, models = random_trees(T=3, seed=7)
    with pytest.raises(MergeInputError, match=r"'density' \(step 'trim' of 'ties'\) = 1\.5.*outside \[0\.0, 1\.0\]"):
        jmerge.merge(jmerge.ties(), base, models, hparams={"density": 1.5})
    f = jax.jit(lambda d: jmerge.merge(jmerge.ties(), base, models, hparams={"density": d}))
    jax.block_until_ready(f(0.3))
    with pytest.raises(Exception, match=r"'density' \(step 'trim' of 'ties'\) = 1\.5 is outside"):
        jax.block_until_ready(f(1.5))
    g = jax.jit(lambda d: jmerge.merge(jmerge.ties(), base, models, hparams={"density": d},
                                       traced_range_checks=False))
    jax.block_until_ready(g(1.5))  # the check is skipped on request: no error


def test_per_model_value_for_a_scalar_hyperparameter_is_refused():
    base, models = random_trees(T=3)
    with pytest.raises(MergeInputError, match=r"'scale' \(step 'scale' of 'ties'\).*per-model values"):
        jmerge.merge(jmerge.ties(), base, models, hparams={"scale": PerModel([1.0, 2.0, 3.0])})
    with pytest.raises(MergeInputError, match="2 per-model values but 3 models"):
        jmerge.merge(jmerge.ties(), base, models, hparams={"weight": PerModel([1.0, 2.0])})


def test_merge_leaf_needs_qualified_hparams():
    base, models = random_trees(T=2, seed=8, shapes={"w": (6, 5)})
    m = jmerge.ties(density=0.4)
    hp = jmerge.prepare_leaf_hparams(m, ["w"], 2)[0]
    assert set(hp) == {"trim.density", "elect_sign.weight", "disjoint_merge.weight", "scale.scale"}
    leaf = jmerge.merge_leaf(m, base["w"], [x["w"] for x in models], hp=hp, path="w")
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jmerge.merge(m, base, models)["w"]))
    with pytest.raises(MergeInputError, match=r"hp lacks \['disjoint_merge.weight'.*prepare_leaf_hparams"):
        jmerge.merge_leaf(m, base["w"], [x["w"] for x in models], hp={"density": 0.4}, path="w")
