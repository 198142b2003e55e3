"""The TIES family's single-pass route (``jmerge.methods.ties_fused``): with the merge backend forced to
Pallas (interpret mode on CPU), ``jmerge.merge`` of ties / dare_ties / breadcrumbs_ties / della equals the XLA
path bit for bit, and its program holds one ``pallas_call`` per leaf fed by the models and the base: no
trimmed ``(T, *shape)`` task vectors are formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.kernels import merge_backend


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bitwise(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    bad = _bits(got) != _bits(want)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} entries differ; first: got "
                           f"{got[bad][:4].astype(np.float32)} want {want[bad][:4].astype(np.float32)}")


def _trees(T, dtype, seed, ties=False):
    """Odd shapes: a 128-multiple matrix, a 2-D leaf 128 does not divide (the (1, n) view), a vector, a scalar."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (24, 128), "c": (33, 70), "b": (50,), "s": ()}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    models = []
    for _ in range(T):
        m = {}
        for k, a in base.items():
            d = 0.1 * rng.normal(size=a.shape).astype(np.float32)
            if ties:  # few magnitudes, exact zeros: ties at every threshold, zero votes
                d = np.round(d * 16) / 16
            m[k] = jnp.asarray(a + d, dtype)
        models.append(m)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), base), models


def _pair(name, **opts):
    factory = jmerge.methods.METHODS[name]
    with merge_backend("xla"):
        mx = factory(**opts)
    with merge_backend("pallas"):
        mp = factory(**opts)
    return mx, mp


CASES = [  # (method, options, T)
    ("ties", dict(density=0.3), 3),
    ("ties", dict(density=0.3, normalize_by="weight", rounding="floor"), 2),
    ("ties", dict(density=0.25, scope="global", reduce="sum"), 3),
    ("ties", dict(density=0.4, weighted=False, sign_method="count"), 4),
    ("dare_ties", dict(density=0.6, rescale="l1", reduce="sum"), 2),
    ("dare_ties", dict(density=0.7, trim_density=0.5), 3),
    ("dare_ties", dict(density=0.5, rescale="none", normalize_by="weight"), 1),
    ("breadcrumbs_ties", dict(density=0.6, gamma=0.05, reduce="sum"), 3),
    ("della", dict(density=0.6, epsilon=0.1, rescale="l1", normalize_by="weight"), 2),
    ("della", dict(density=0.6, epsilon=0.1), 3),  # rescale="inverse": per-entry factors, the stacked route
]


@pytest.mark.parametrize("name,opts,T", CASES)
@pytest.mark.parametrize("dtype,compute", [(np.float32, None), (jnp.bfloat16, "bfloat16")])
def test_forced_pallas_equals_xla(name, opts, T, dtype, compute):
    base, models = _trees(T, dtype, seed=T + len(opts), ties=dtype == jnp.bfloat16)
    hp = {"weight": jmerge.PerModel(list(np.linspace(0.6, 1.4, T)))}
    mx, mp = _pair(name, **opts)
    want = jmerge.merge(mx, base, models, hparams=hp, seed=3, compute_dtype=compute)
    got = jmerge.merge(mp, base, models, hparams=hp, seed=3, compute_dtype=compute)
    jax.tree.map(assert_bitwise, got, want)


def test_ties_at_threshold_per_model_density_and_out_dtype():
    # magnitudes from 4 values: every threshold falls inside a run of equal keys (lowest flat index kept)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 128)).astype(np.float32)
    models = [base + rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5], size=base.shape).astype(np.float32) for _ in range(3)]
    hp = {"density": jmerge.PerModel([0.1, 0.33, 0.7]), "weight": jmerge.PerModel([1.0, 0.5, 2.0]), "scale": 0.8}
    mx, mp = _pair("ties", normalize_by="weight")
    for out_dtype in (None, jnp.bfloat16):
        want = jmerge.merge(mx, base, models, hparams=hp, out_dtype=out_dtype)
        got = jmerge.merge(mp, base, models, hparams=hp, out_dtype=out_dtype)
        assert_bitwise(got, want)
    # the tie rule itself, against NumPy: model 0 keeps round(0.1 * n) entries, the tied ones lowest index first
    _, extras = jmerge.merge(mx, base, models, hparams=hp, return_extras=True)
    tau = models[0] - base
    k = int(np.round(np.float32(0.1) * tau.size))
    order = np.lexsort((np.arange(tau.size), -np.abs(tau).reshape(-1)))  # by magnitude, then flat index
    want_mask = np.zeros(tau.size, bool)
    want_mask[order[:k]] = True
    np.testing.assert_array_equal(np.asarray(extras["trim_mask"][0]).reshape(-1), want_mask)


def test_stacked_task_vectors_models_stacked_and_extras():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(16, 128)).astype(np.float32)
    tv = (0.1 * rng.normal(size=(3, 16, 128))).astype(np.float32)
    mx, mp = _pair("ties", density=0.3)
    assert_bitwise(jmerge.merge(mp, base, task_vectors=tv, out_dtype=jnp.bfloat16),
                   jmerge.merge(mx, base, task_vectors=tv, out_dtype=jnp.bfloat16))
    models = jnp.asarray(base[None] + tv, jnp.bfloat16)  # one (T, *shape) buffer, as the pipeline reads them
    hp = jmerge.prepare_leaf_hparams(mx, ["w"], 3)[0]
    key = jmerge.leaf_key(0, "w")
    run = lambda m: jmerge.LeafProgram(m, compute_dtype="bfloat16")(jnp.asarray(base, jnp.bfloat16), models, hp, key,
                                                                    models_stacked=True)
    assert_bitwise(run(mp), run(mx))
    # return_extras: the step-by-step route (masks are outputs), same numbers
    got, ex = jmerge.merge(mp, base, list(base[None] + tv), return_extras=True)
    assert_bitwise(got, jmerge.merge(mx, base, list(base[None] + tv)))
    assert "trim_mask" in ex


def _jaxpr_with(jaxpr, prim):
    """The (sub-)jaxpr holding an equation of primitive ``prim``."""
    if any(e.primitive.name == prim for e in jaxpr.eqns):
        return jaxpr
    for e in jaxpr.eqns:
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found = _jaxpr_with(inner, prim)
                    if found is not None:
                        return found
    return None


_VIEWS = ("reshape", "squeeze", "expand_dims", "slice", "copy", "copy_p")


def _pallas_operand_sources(method, base, models, hp, **kw):
    """For the ``pallas_call`` of a one-leaf merge: how many there are, and for each float operand of the
    leaf's size or more, whether it is an input of the program (models, base; reshaped at most) or computed."""
    n = base.size
    closed = jax.make_jaxpr(lambda b, ms: jmerge.merge(method, b, ms, hparams=hp, seed=1, **kw))(base, models)
    jaxpr = _jaxpr_with(closed.jaxpr, "pallas_call")
    if jaxpr is None:
        return 0, []
    made = {o: e for e in jaxpr.eqns for o in e.outvars}
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    sources = []
    for e in calls:
        for v in e.invars:
            if hasattr(v, "val") or not jnp.issubdtype(v.aval.dtype, jnp.floating) or v.aval.size < n:
                continue
            chain = []
            while v in made and made[v].primitive.name in _VIEWS:
                chain.append(made[v].primitive.name)
                v = made[v].invars[0]
            sources.append("input" if v in inputs else f"computed by {made[v].primitive.name} {v.aval.str_short()}")
    return len(calls), sources


@pytest.mark.parametrize("name,opts", [("ties", dict(density=0.2)), ("ties", dict(density=0.2, weighted=False)),
                                       ("breadcrumbs_ties", dict(gamma=0.02)), ("dare_ties", dict(rescale="l1")),
                                       ("della", dict(rescale="l1"))])
def test_single_pass_kernel_reads_the_inputs(name, opts):
    """The one kernel reads the models and the base themselves: no trimmed (or otherwise computed) task
    vectors are formed for it (the selection enters as per-model thresholds, or an int8 mask for a drop)."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(48, 128)).astype(np.float32)  # > 2048 entries: the counting search, not a sort
    models = [base + 0.1 * rng.normal(size=base.shape).astype(np.float32) for _ in range(3)]
    hp = {"weight": jmerge.PerModel([0.5, 1.0, 1.5])}
    _, mp = _pair(name, **opts)
    calls, sources = _pallas_operand_sources(mp, base, models, hp)
    assert calls == 1 and sources == ["input"] * 4, sources  # 3 models + the base


def _two_scale_chain(backend):
    """A TIES chain the single-pass route does not take (two scales after the merge), built for ``backend``."""
    with merge_backend(backend):
        return jmerge.chain(jmerge.trim(0.5), jmerge.elect_sign(), jmerge.disjoint_merge(), jmerge.scale(0.5),
                            jmerge.scale(2.0))


def test_operand_check_sees_computed_task_vectors():
    # the check can fail: a chain the single-pass route does not take (two scales) uses the step-level kernel,
    # fed the trimmed task vectors computed by XLA, and DELLA's inverse rescale feeds the rescaled ones
    rng = np.random.default_rng(4)
    base = rng.normal(size=(48, 128)).astype(np.float32)
    models = [base + 0.1 * rng.normal(size=base.shape).astype(np.float32) for _ in range(2)]
    _, della_inverse = _pair("della")
    for m in (_two_scale_chain("pallas"), della_inverse):
        calls, sources = _pallas_operand_sources(m, base, models, {})
        assert calls == 1 and any(s != "input" for s in sources), sources


def test_other_chains_keep_their_steps():
    # a chain the route does not know (a step between election and merge) runs its steps, still exactly
    rng = np.random.default_rng(6)
    base = rng.normal(size=(8, 128)).astype(np.float32)
    models = [base + 0.1 * rng.normal(size=base.shape).astype(np.float32) for _ in range(2)]
    mp, mx = _two_scale_chain("pallas"), _two_scale_chain("xla")
    assert_bitwise(jmerge.merge(mp, base, models), jmerge.merge(mx, base, models))
