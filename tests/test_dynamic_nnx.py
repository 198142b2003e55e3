"""Dynamic merging on Flax NNX modules (jmerge.dynamic.nnx): SMILE, LoRA-MoE and WEMoE layers swapped in.

References are independent of the NNX code: the linen path (``smile_apply``, ``lora_moe_apply``,
``wemoe_apply``, ``wemoe_tta`` through ``flax.linen.intercept_methods``) on an equivalent linen model with
the same weights, and the fine-tuned NNX models' own outputs under routing forced one-hot on task t.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmerge.core.errors import MergeInputError
from jmerge.dynamic.lora_experts import build_lora_moe, lora_expert_from_flax, lora_moe_apply, with_forced_expert
from jmerge.dynamic.nnx import (ExpertParam, LoraMoELinearNNX, RouterParam, SmileLinearNNX, WEMoEBlockNNX,
                                lora_moe_nnx, nnx_params, smile_nnx, wemoe_nnx, wemoe_tta_nnx)
from jmerge.dynamic.smile import smile_apply, smile_upscale
from jmerge.dynamic.wemoe import build_wemoe, wemoe_apply, wemoe_tta, with_constant_routing

T, P, D, H, C = 3, 4, 8, 12, 5


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(D, H, rngs=rngs), nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln, self.attn, self.mlp = nnx.LayerNorm(D, rngs=rngs), nnx.Linear(D, D, rngs=rngs), MLP(rngs)

    def __call__(self, x):
        h = x + self.attn(self.ln(x))
        return h + self.mlp(h)


class Net(nnx.Module):
    """A tiny ViT-like model: token embedding, blocks in an ``nnx.List``, pooled head."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(P, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, x):  # (B, N, P)
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(axis=1))


class LNet(nn.Module):
    """The same model in linen (blocks named ``blocks_0``, ``blocks_1``)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="embed")(x)
        for i in range(2):
            y = nn.LayerNorm(name=f"blocks_{i}_ln")(h)
            h = h + nn.Dense(D, name=f"blocks_{i}_attn")(y)
            h = h + nn.Dense(D, name=f"blocks_{i}_fc2")(nn.gelu(nn.Dense(H, name=f"blocks_{i}_fc1")(h)))
        return nn.Dense(C, name="head")(h.mean(axis=1))


class LNetMlp(nn.Module):
    """Linen twin with the MLP as one submodule per block (for WEMoE's MLP-block groups)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="embed")(x)
        for i in range(2):
            y = nn.LayerNorm(name=f"blocks_{i}_ln")(h)
            h = h + nn.Dense(D, name=f"blocks_{i}_attn")(y)
            h = h + LMLP(name=f"blocks_{i}_mlp")(h)
        return nn.Dense(C, name="head")(h.mean(axis=1))


class LMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(H, name="fc1")(x)))


def to_linen(tree, mlp_block=False):
    """NNX param dict (string keys) -> the linen twin's params."""
    out = {"embed": tree["embed"], "head": tree["head"]}
    for i in range(2):
        b = tree["blocks"][str(i)]
        out[f"blocks_{i}_ln"], out[f"blocks_{i}_attn"] = b["ln"], b["attn"]
        if mlp_block:
            out[f"blocks_{i}_mlp"] = b["mlp"]
        else:
            out[f"blocks_{i}_fc1"], out[f"blocks_{i}_fc2"] = b["mlp"]["fc1"], b["mlp"]["fc2"]
    return out


def lapply(p, x):
    return LNet().apply({"params": p}, x)


def lapply_mlp(p, x):
    return LNetMlp().apply({"params": p}, x)


def finetune(base, t, only=None):
    """A copy of ``base`` with every Linear kernel/bias bumped (not the LayerNorms); ``only``: path filter."""
    st = nnx.to_pure_dict(nnx.state(base, nnx.Param))

    def bump(path, a):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "/ln/" in name or (only is not None and only not in name):
            return a
        k = jax.random.fold_in(jax.random.key(10 + t), abs(hash(name)) % 1000)
        return a + 0.3 * jax.random.normal(k, a.shape)

    new = nnx.clone(base)
    state = nnx.state(new, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(bump, st))
    nnx.update(new, state)
    return new


def snapshot(model):
    return [np.array(x) for x in jax.tree_util.tree_leaves(nnx.state(model))]


def assert_unchanged(model, before):
    after = snapshot(model)
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))
    assert all(type(b.mlp.fc1) is nnx.Linear and type(b.mlp) is MLP for b in model.blocks)


@pytest.fixture(scope="module")
def setup():
    base = Net(nnx.Rngs(0))
    models = [finetune(base, t) for t in range(T)]
    x = jax.random.normal(jax.random.key(1), (4, 3, P))
    return base, models, x


def test_twin_models_agree(setup):
    base, _, x = setup
    np.testing.assert_allclose(lapply(to_linen(nnx_params(base)), x), base(x), atol=1e-6)
    assert nnx_params(base)["blocks"]["1"]["mlp"]["fc1"]["kernel"].shape == (D, H)


# ---------------------------------------------------------------- SMILE

def test_smile_equals_linen_path(setup):
    base, models, x = setup
    sm = smile_upscale(nnx_params(base), [nnx_params(m) for m in models], k=2, gate_k=2, top_k=2)
    sml = smile_upscale(to_linen(nnx_params(base)), [to_linen(nnx_params(m)) for m in models], k=2, gate_k=2,
                        top_k=2)
    before = snapshot(base)
    new = smile_nnx(base, sm)
    assert isinstance(new.blocks[1].mlp.fc1, SmileLinearNNX) and isinstance(new.head, SmileLinearNNX)
    ref = smile_apply(lapply, sml, x)
    np.testing.assert_allclose(new(x), ref, atol=1e-5)
    assert float(jnp.max(jnp.abs(ref - base(x)))) > 1e-2  # the experts matter
    assert_unchanged(base, before)


def test_smile_full_rank_forced_routing_reproduces_models_and_jits(setup):
    base, models, x = setup
    sm = smile_upscale(nnx_params(base), [nnx_params(m) for m in models], k="full", gate_k=2)
    # Full-rank experts are float32 SVD factors of each update: their products carry float32 rounding of the
    # weights' scale, so outputs (~10) agree to ~1e-5 of their largest magnitude (run to run, the threaded SVD
    # moves the last bits: 2.6e-5 seen on an output of 0.3); a wrong route differs by O(1).
    tol = lambda y: dict(rtol=1e-5, atol=1e-5 * float(np.max(np.abs(np.asarray(y)))))
    for t in range(T):
        new = smile_nnx(base, sm, routing=t)
        np.testing.assert_allclose(new(x), models[t](x), **tol(models[t](x)))
    weights = smile_nnx(base, sm, routing=jax.nn.one_hot(1, T))  # routing weights (T,): static, as a tuple
    np.testing.assert_allclose(weights(x), models[1](x), **tol(models[1](x)))
    jitted = nnx.jit(lambda m, x: m(x))(new, x)
    np.testing.assert_allclose(jitted, models[T - 1](x), **tol(models[T - 1](x)))
    g, st = nnx.split(smile_nnx(base, sm))
    out = jax.jit(lambda st, x: nnx.merge(g, st)(x))(st, x)
    np.testing.assert_allclose(out, smile_nnx(base, sm)(x), rtol=1e-5, atol=1e-5)


class Custom(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(P, D, rngs=rngs)
        self.proj = Proj(rngs)

    def __call__(self, x):
        return self.proj(self.embed(x))


class Proj(nnx.Module):
    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
        return x @ self.kernel[...]


def test_smile_refuses_non_linear_layer():
    base = Custom(nnx.Rngs(0))
    ft = nnx.clone(base)
    ft.proj.kernel[...] = ft.proj.kernel[...] + 1.0
    sm = smile_upscale(nnx_params(base), [nnx_params(ft)], gate_k=2)
    assert "proj.kernel" in sm.layers
    with pytest.raises(MergeInputError, match=r"'proj' is a Proj, not an nnx.Linear"):
        smile_nnx(base, sm)
    assert type(base.proj) is Proj


# ---------------------------------------------------------------- LoRA MoE

LORA_LAYERS = [("blocks", "0", "mlp", "fc1"), ("blocks", "1", "attn"), ("head",)]


def lora_trees():
    shapes = {"fc1": (D, H), "attn": (D, D), "head": (D, C)}
    trees = []
    for e in range(T):
        tree: dict = {}
        for i, path in enumerate(LORA_LAYERS):
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            din, dout = shapes[path[-1]]
            ka, kb = jax.random.split(jax.random.key(100 * e + i))
            node[path[-1]] = {"lora_a": 0.5 * jax.random.normal(ka, (din, 2 + e)),
                              "lora_b": 0.5 * jax.random.normal(kb, (2 + e, dout))}
        trees.append(tree)
    return trees


def linen_lora(tree):
    return {"blocks_0_fc1": tree["blocks"]["0"]["mlp"]["fc1"], "blocks_1_attn": tree["blocks"]["1"]["attn"],
            "head": tree["head"]}  # the NNX tree's layer order: the routers' seeds follow it


@pytest.mark.parametrize("top_k", [1, 2])
def test_lora_moe_equals_linen_path(setup, top_k):
    base, _, x = setup
    trees = lora_trees()
    ex = [lora_expert_from_flax(t, name=f"e{i}", scale=0.5 + i) for i, t in enumerate(trees)]
    exl = [lora_expert_from_flax(linen_lora(t), name=f"e{i}", scale=0.5 + i) for i, t in enumerate(trees)]
    spec, state = build_lora_moe(nnx_params(base), ex, top_k=top_k, router_std=1.0, impl="ragged")
    specl, statel = build_lora_moe(to_linen(nnx_params(base)), exl, top_k=top_k, router_std=1.0, impl="ragged")
    before = snapshot(base)
    new = lora_moe_nnx(base, spec, state)
    assert isinstance(new.blocks[0].mlp.fc1, LoraMoELinearNNX) and isinstance(new.blocks[1].attn, LoraMoELinearNNX)
    ref = lora_moe_apply(lapply, specl, statel, to_linen(nnx_params(base)), x)
    assert float(jnp.max(jnp.abs(ref - base(x)))) > 1e-2  # the experts matter
    np.testing.assert_allclose(new(x), ref, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(new, x), ref, atol=1e-5)
    assert_unchanged(base, before)


def test_lora_moe_forced_expert_reproduces_merged_lora(setup):
    base, _, x = setup
    trees = lora_trees()
    ex = [lora_expert_from_flax(t, name=f"e{i}", scale=0.5 + i) for i, t in enumerate(trees)]
    spec, state = build_lora_moe(nnx_params(base), ex, top_k=1)
    for t in range(T):
        ref = nnx.clone(base)  # base + scale_t * lora_a @ lora_b in each adapted layer
        for path in LORA_LAYERS:
            mod = ref
            for k in path:
                mod = mod[int(k)] if k.isdigit() else getattr(mod, k)
            node = trees[t]
            for k in path:
                node = node[k]
            mod.kernel[...] = mod.kernel[...] + (0.5 + t) * node["lora_a"] @ node["lora_b"]
        out = lora_moe_nnx(base, spec, with_forced_expert(spec, state, t))(x)
        # x W + s (x A) B against x (W + s A B): two float32 orders of the same sums; outputs reach ~70, so
        # an absolute 1e-5 alone is below their rounding (1.5e-5 apart on this machine's CPU)
        np.testing.assert_allclose(out, ref(x), rtol=2e-6, atol=1e-5)


def test_lora_moe_refuses_non_linear_layer():
    base = Custom(nnx.Rngs(0))
    e = lora_expert_from_flax({"proj": {"lora_a": jnp.ones((D, 2)), "lora_b": jnp.ones((2, D))}}, name="e")
    spec, state = build_lora_moe(nnx_params(base), [e])
    with pytest.raises(MergeInputError, match=r"adapted layer 'proj' is a Proj, not an nnx.Linear"):
        lora_moe_nnx(base, spec, state)


# ---------------------------------------------------------------- WEMoE

GROUPS = {"g0": ["blocks/0/mlp"], "g1": ["blocks/1/mlp"]}
LGROUPS = {"g0": ["blocks_0_mlp"], "g1": ["blocks_1_mlp"]}


def random_routers(state, seed=3):
    def rnd(path, a):
        k = jax.random.fold_in(jax.random.key(seed), abs(hash(jax.tree_util.keystr(path))) % 1000)
        return a + 0.1 * jax.random.normal(k, a.shape)
    return {**state, "routers": jax.tree_util.tree_map_with_path(rnd, state["routers"])}


@pytest.fixture(scope="module")
def wemoe(setup):
    base, models, x = setup
    spec, state = build_wemoe(nnx_params(base), [nnx_params(m) for m in models], GROUPS, scaling=0.3)
    specl, statel = build_wemoe(to_linen(nnx_params(base), True), [to_linen(nnx_params(m), True) for m in models],
                                LGROUPS, scaling=0.3)
    return spec, random_routers(state), specl, random_routers(statel)


@pytest.mark.parametrize("granularity", ["sample", "token", "batch"])
def test_wemoe_equals_linen_path(setup, wemoe, granularity):
    base, _, x = setup
    spec, state, specl, statel = wemoe
    before = snapshot(base)
    new = wemoe_nnx(base, spec, state, granularity=granularity)
    assert isinstance(new.blocks[0].mlp, WEMoEBlockNNX) and isinstance(new.blocks[0].attn, nnx.Linear)
    ref = wemoe_apply(lapply_mlp, specl, statel, x, granularity=granularity)
    np.testing.assert_allclose(new(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(new, x), ref, rtol=1e-5, atol=1e-5)
    assert_unchanged(base, before)


def test_wemoe_one_hot_reproduces_finetuned_model(setup):
    base, _, x = setup
    models = [finetune(base, t, only="/mlp/") for t in range(T)]  # only the MLPs differ: TA elsewhere is the base
    spec, state = build_wemoe(nnx_params(base), [nnx_params(m) for m in models], GROUPS)
    for t in range(T):
        new = wemoe_nnx(base, spec, with_constant_routing(state, jax.nn.one_hot(t, T)))
        np.testing.assert_allclose(new(x), models[t](x), atol=1e-5)


def test_wemoe_tta_matches_linen_and_trains_only_routers(setup, wemoe):
    base, _, x = setup
    spec, state, specl, statel = wemoe
    data = [jax.random.normal(jax.random.key(20 + t), (6, 3, P)) for t in range(T)]
    model = wemoe_nnx(base, spec, state)
    before = snapshot(model)
    new, losses = wemoe_tta_nnx(model, lambda m, xb, t: m(xb), data, steps=4, lr=1e-2, batch_size=3)
    refst, ref_losses = wemoe_tta(specl, statel, lambda st, xb, t: wemoe_apply(lapply_mlp, specl, st, xb), data,
                                  steps=4, lr=1e-2, batch_size=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(new(x), wemoe_apply(lapply_mlp, specl, refst, x), atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(snapshot(model), before))  # the input is not modified
    same = lambda f: all(np.array_equal(a, b) for a, b in zip(  # noqa: E731
        jax.tree_util.tree_leaves(nnx.state(new, f)), jax.tree_util.tree_leaves(nnx.state(model, f))))
    assert same(ExpertParam) and same(nnx.Not(RouterParam)) and not same(RouterParam)


def test_wemoe_errors(setup):
    base, models, _ = setup
    spec, state = build_wemoe(nnx_params(base), [nnx_params(m) for m in models],
                              {"g": ["blocks/0/mlp/fc1", "blocks/0/mlp/fc2"]})
    with pytest.raises(MergeInputError, match=r"group 'g' has 2 modules .*name the one MLP module"):
        wemoe_nnx(base, spec, state)
    other = Custom(nnx.Rngs(0))
    spec, state = build_wemoe(nnx_params(base), [nnx_params(m) for m in models], GROUPS)
    with pytest.raises(MergeInputError, match=r"wemoe_nnx: the model's parameter '.*' is not in the built params"):
        wemoe_nnx(other, spec, state)
