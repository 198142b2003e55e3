"""WEMoE (jmerge.dynamic.wemoe) on a tiny linen ViT-like model, checked against plain forwards of
hand-merged (NumPy) parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.core.errors import MergeInputError
from jmerge.dynamic.wemoe import (build_wemoe, entropy_loss, wemoe_router_init, vit_mlp_groups, wemoe_apply,
                                  wemoe_storage, wemoe_tta, with_constant_routing)

nn = pytest.importorskip("flax.linen")

W, S, T = 8, 4, 3  # width, tokens, tasks


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        y = nn.LayerNorm(name="ln1")(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(y, y)
        y = nn.LayerNorm(name="ln2")(h)
        y = nn.Dense(2 * W, name="fc1")(y)
        return h + nn.Dense(W, name="fc2")(nn.gelu(y))


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, S, 3)
        h = nn.Dense(W, name="embed")(x)
        for i in range(2):
            h = Block(name=f"layers_{i}")(h)
        return nn.Dense(5, name="head")(h.mean(axis=1))


MODEL = Tiny()


def apply(p, x):
    return MODEL.apply({"params": p}, x)


def _models(mlp_only=False):
    k = jax.random.PRNGKey(0)
    base = MODEL.init(k, jnp.zeros((1, S, 3)))["params"]
    fts = []
    for t in range(T):
        kt = jax.random.fold_in(k, t + 1)
        leaves, tdef = jax.tree_util.tree_flatten_with_path(base)
        new = []
        for i, (path, v) in enumerate(leaves):
            names = [getattr(q, "key", "") for q in path]
            touch = (not mlp_only) or ("fc1" in names or "fc2" in names)
            d = 0.3 * jax.random.normal(jax.random.fold_in(kt, i), v.shape) if touch else 0.0
            new.append(v + d)
        fts.append(jax.tree_util.tree_unflatten(tdef, new))
    x = jax.random.normal(jax.random.fold_in(k, 99), (6, S, 3))
    return base, fts, x


def _np_params(base, fts, lam, mlp_from):
    """Reference params: TA (NumPy) outside the MLPs, ``mlp_from(path, base_leaf, ft_leaves)`` inside."""
    def f(path, b, *fs):
        names = [getattr(q, "key", "") for q in path]
        b64, f64 = np.asarray(b, np.float64), [np.asarray(x, np.float64) for x in fs]
        if "fc1" in names or "fc2" in names:
            return jnp.asarray(mlp_from(b64, f64), jnp.float32)
        return jnp.asarray(b64 + lam * sum(x - b64 for x in f64), jnp.float32)
    return jax.tree_util.tree_map_with_path(f, base, *fts)


def test_vit_mlp_groups():
    base, _, _ = _models()
    g = vit_mlp_groups(base)
    assert g == {"layers_0": [("layers_0", "fc1"), ("layers_0", "fc2")],
                 "layers_1": [("layers_1", "fc1"), ("layers_1", "fc2")]}


@pytest.mark.parametrize("granularity", ["sample", "token", "batch"])
def test_one_hot_routing_reproduces_finetuned(granularity):
    base, fts, x = _models(mlp_only=True)
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), scaling=0.3, granularity=granularity)
    run = jax.jit(lambda st, x: wemoe_apply(apply, spec, st, x))
    for t in range(T):
        got = run(with_constant_routing(state, np.eye(T, dtype=np.float32)[t]), x)
        want = apply(fts[t], x)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        other = apply(fts[(t + 1) % T], x)
        assert np.max(np.abs(np.asarray(got) - np.asarray(other))) > 1e-2  # the check can fail


def test_one_hot_general_finetunes_ta_outside_mlps():
    base, fts, x = _models()
    lam = 0.3
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), scaling=lam)
    t = 1
    got = wemoe_apply(apply, spec, with_constant_routing(state, np.eye(T, dtype=np.float32)[t]), x)
    want = apply(_np_params(base, fts, lam, lambda b, f: f[t]), x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_untrained_router_is_task_arithmetic():
    base, fts, x = _models()
    lam = 0.25
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), scaling=lam)
    got = wemoe_apply(apply, spec, state, x)
    want = apply(_np_params(base, fts, lam, lambda b, f: b + lam * sum(y - b for y in f)), x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _random_routers(state, key):
    leaves, tdef = jax.tree_util.tree_flatten(state["routers"])
    leaves = [0.5 * jax.random.normal(jax.random.fold_in(key, i), v.shape) for i, v in enumerate(leaves)]
    return {**state, "routers": jax.tree_util.tree_unflatten(tdef, leaves)}


def test_per_sample_merge_matches_reference():
    base, fts, x = _models()
    lam = 0.3
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), scaling=lam)
    state = _random_routers(state, jax.random.PRNGKey(5))
    out, routing = wemoe_apply(apply, spec, state, x, return_routing=True)
    assert routing["layers_0"].shape == (x.shape[0], T)
    r = {g: np.asarray(v, np.float64) for g, v in routing.items()}
    assert np.ptp(r["layers_1"], axis=0).max() > 1e-3  # routing really differs per sample
    for i in range(x.shape[0]):
        def f(path, b, *fs):
            names = [getattr(q, "key", "") for q in path]
            b64 = np.asarray(b, np.float64)
            tv = [np.asarray(y, np.float64) - b64 for y in fs]
            g = next((n for n in names if n.startswith("layers_")), None)
            if "fc1" in names or "fc2" in names:
                return jnp.asarray(b64 + sum(r[g][i, t] * tv[t] for t in range(T)), jnp.float32)
            return jnp.asarray(b64 + lam * sum(tv), jnp.float32)
        p_i = jax.tree_util.tree_map_with_path(f, base, *fts)
        np.testing.assert_allclose(out[i], apply(p_i, x[i:i + 1])[0], rtol=1e-4, atol=1e-5)
    # a per-sample model: each sample's output does not depend on the rest of the batch (to float32 rounding of
    # the logits' scale: XLA may block a matmul of 2 rows otherwise than one of the whole batch; JAX 0.12.1 did)
    scale = float(np.abs(np.asarray(out)).max())
    np.testing.assert_allclose(out[:2], wemoe_apply(apply, spec, state, x[:2]), rtol=1e-5, atol=1e-6 * scale)
    batch = wemoe_apply(apply, spec, state, x, granularity="batch")
    assert np.max(np.abs(np.asarray(batch) - np.asarray(out))) > 1e-4


def test_token_routing_shape_and_constant_equivalence():
    base, fts, x = _models()
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), granularity="token")
    st = _random_routers(state, jax.random.PRNGKey(1))
    out, routing = wemoe_apply(apply, spec, st, x, return_routing=True)
    assert routing["layers_0"].shape == (x.shape[0], S, T)
    w = np.array([0.2, -0.1, 0.7], np.float32)
    a = wemoe_apply(apply, spec, with_constant_routing(state, w), x)
    b = wemoe_apply(apply, spec, with_constant_routing(state, w), x, granularity="sample")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tta_lowers_entropy_and_touches_only_routers():
    base, fts, x = _models()
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base), scaling=0.3)
    key = jax.random.PRNGKey(3)
    data = [jax.random.normal(jax.random.fold_in(key, t), (32, S, 3)) for t in range(2)]
    before_state = jax.tree_util.tree_map(np.array, state)

    def logits_fn(st, xb, t):
        return wemoe_apply(apply, spec, st, xb)

    def entropy(st):
        return float(sum(entropy_loss(logits_fn(st, d, t)) for t, d in enumerate(data)))

    new, losses = wemoe_tta(spec, state, logits_fn, data, steps=30, lr=5e-2, batch_size=16)
    assert losses.shape == (30,)
    assert entropy(new) < entropy(state) - 1e-3
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["params"], before_state["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["experts"], before_state["experts"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, before_state)  # input not modified
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                                               new["routers"], before_state["routers"]))
    assert any(changed)


def test_storage_counts():
    base, fts, _ = _models()
    spec, state = build_wemoe(base, fts, vit_mlp_groups(base))
    s = wemoe_storage(spec, state)
    n = sum(v.size for v in jax.tree_util.tree_leaves(base))
    mlp = sum(v.size for k, blk in base.items() if k.startswith("layers_") for m in ("fc1", "fc2")
              for v in jax.tree_util.tree_leaves(blk[m]))
    assert s["merged"] == n and s["mlp_experts"] == T * mlp and s["full_models"] == T * n
    assert s["routers"] == 2 * (W * W + W + W * T + T)


def test_errors():
    base, fts, x = _models()
    with pytest.raises(MergeInputError, match="at least one fine-tuned model"):
        build_wemoe(base, [], vit_mlp_groups(base))
    with pytest.raises(MergeInputError, match="at least one expert"):
        wemoe_router_init(jax.random.PRNGKey(0), W, 0)
    with pytest.raises(MergeInputError, match="layers_0/mlp.*not found"):
        build_wemoe(base, fts, ["layers_0/mlp"])
    with pytest.raises(MergeInputError, match="overlap"):
        build_wemoe(base, fts, ["layers_0", "layers_0/fc1"])
    spec, state = build_wemoe(base, fts, {"g": [("layers_0", "fc2"), ("layers_0", "fc1")]})
    with pytest.raises(MergeInputError, match="ran before the group's first module"):
        wemoe_apply(apply, spec, state, x)
