"""Mixture of LoRA experts (jmerge.dynamic.lora_experts) against NumPy references of the routed forward,
PEFT adapters written in PEFT's layout (both venvs) and by peft itself (3.11)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.core.errors import MergeInputError
from jmerge.dynamic.lora_experts import (build_lora_moe, lora_expert_from_flax, lora_moe_apply, lora_moe_delta,
                                         read_peft_expert, train_lora_router, with_forced_expert)
from jmerge.dynamic.wemoe import entropy_loss

nn = pytest.importorskip("flax.linen")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

D_IN, D_H, D_OUT = 6, 10, 4


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, name="fc2")(nn.relu(nn.Dense(D_H, name="fc1")(x)))


NET = Net()


def apply(p, x):
    return NET.apply({"params": p}, x)


def _base(seed=0):
    return NET.init(jax.random.PRNGKey(seed), jnp.zeros((1, D_IN)))["params"]


def _write_peft(d, factors, *, r, alpha, extra_cfg=None):
    """A PEFT adapter directory: factors = {module: (A (r,in), B (out,r))}."""
    os.makedirs(d, exist_ok=True)
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = np.asarray(a, np.float32)
        tensors[f"base_model.model.{m}.lora_B.weight"] = np.asarray(b, np.float32)
    safetensors_numpy.save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(factors),
           "base_model_name_or_path": "tiny"}
    cfg.update(extra_cfg or {})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def _random_factors(rng, ranks):
    return {"fc1": (rng.normal(size=(ranks[0], D_IN)), rng.normal(size=(D_H, ranks[0]))),
            "fc2": (rng.normal(size=(ranks[1], D_H)), rng.normal(size=(D_OUT, ranks[1])))}


def _experts(tmp_path, ranks=((2, 3), (3, 1), (1, 2))):
    rng = np.random.default_rng(0)
    out, raw = [], []
    for i, rk in enumerate(ranks):
        f = _random_factors(rng, rk)
        alpha = 4.0 + i
        out.append(read_peft_expert(_write_peft(str(tmp_path / f"a{i}"), f, r=rk[0], alpha=alpha,
                                                extra_cfg={"rank_pattern": {"fc2": rk[1]}})))
        raw.append({m: (np.asarray(a, np.float64), np.asarray(b, np.float64),
                        alpha / (rk[0] if m == "fc1" else rk[1])) for m, (a, b) in f.items()})
    return out, raw


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_layer(x, kernel, bias, router, experts, top_k, normalize):
    """base + routed LoRA in float64 NumPy from the formula (delta W = s * B @ A, W is (out, in))."""
    y = x @ kernel + bias
    p = _np_softmax(x @ np.asarray(router["kernel"], np.float64) + np.asarray(router["bias"], np.float64))
    for n in range(x.shape[0]):
        top = np.argsort(-p[n], kind="stable")[:top_k]
        w = p[n, top] / (p[n, top].sum() if normalize else 1.0)
        for e, we in zip(top, w):
            a, b, s = experts[e]
            y[n] += we * (s * (b @ a)) @ x[n]
    return y


def _np_forward(base, state, raw, x, top_k, normalize):
    p = {k: {n: np.asarray(v, np.float64) for n, v in base[k].items()} for k in base}
    h = _np_layer(np.asarray(x, np.float64), p["fc1"]["kernel"], p["fc1"]["bias"], state["routers"]["fc1"],
                  [r["fc1"] for r in raw], top_k, normalize)
    h = np.maximum(h, 0)
    return _np_layer(h, p["fc2"]["kernel"], p["fc2"]["bias"], state["routers"]["fc2"],
                     [r["fc2"] for r in raw], top_k, normalize)


@pytest.mark.parametrize("top_k,impl", [(1, "ragged"), (2, "ragged"), (2, "dense"), (1, "pallas"), (2, "pallas")])
def test_routed_forward_matches_numpy(tmp_path, top_k, impl):
    experts, raw = _experts(tmp_path)
    base = _base()
    spec, state = build_lora_moe(base, experts, top_k=top_k, router_std=1.0, impl=impl)
    assert spec.normalize == (top_k > 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D_IN))  # routed per token over (batch, seq)
    got, routing = lora_moe_apply(apply, spec, state, base, x, return_routing=True)
    want = _np_forward(base, state, raw, np.asarray(x).reshape(-1, D_IN), top_k, spec.normalize).reshape(2, 5, D_OUT)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    ids = np.asarray(routing["fc1"][1])
    assert len(np.unique(ids[:, 0])) > 1  # tokens really go to different experts


def test_forced_expert_is_base_plus_lora(tmp_path):
    experts, raw = _experts(tmp_path)
    base = _base()
    spec, state = build_lora_moe(base, experts, top_k=1)
    x = jax.random.normal(jax.random.PRNGKey(2), (7, D_IN))
    for t in range(len(experts)):
        got = lora_moe_apply(apply, spec, with_forced_expert(spec, state, t), base, x)
        p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), base)
        for m in ("fc1", "fc2"):
            a, b, s = raw[t][m]
            p[m]["kernel"] = p[m]["kernel"] + (s * (b @ a)).T  # merged weight, kernel layout (in, out)
        want = np.maximum(np.asarray(x, np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0) \
            @ p["fc2"]["kernel"] + p["fc2"]["bias"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        other = raw[(t + 1) % len(raw)]["fc2"]
        assert not np.allclose(s * (b @ a), other[2] * (other[1] @ other[0]))


def test_flax_pytree_experts_and_delta_top1_top2():
    rng = np.random.default_rng(3)
    trees = [{"fc1": {"lora_a": rng.normal(size=(D_IN, r)), "lora_b": rng.normal(size=(r, D_H))}} for r in (1, 4)]
    experts = [lora_expert_from_flax(t, name=f"e{i}", scale=0.5) for i, t in enumerate(trees)]
    base = _base()
    spec, state = build_lora_moe(base, experts, top_k=2, router_std=1.0)
    assert state["experts"]["fc1"]["A"].shape == (2, D_IN, 4)  # ranks 1 and 4 padded to 4
    x = rng.normal(size=(9, D_IN)).astype(np.float32)
    ex, r = state["experts"]["fc1"], state["routers"]["fc1"]
    logits = x @ np.asarray(r["kernel"]) + np.asarray(r["bias"])
    for k in (1, 2):
        d, _ = lora_moe_delta(jnp.asarray(x), jnp.asarray(logits), ex["A"], ex["B"], ex["scale"], top_k=k,
                              normalize=False)
        p = _np_softmax(logits.astype(np.float64))
        want = np.zeros((9, D_H))
        for n in range(9):
            for e in np.argsort(-p[n])[:k]:
                want[n] += p[n, e] * 0.5 * (x[n] @ trees[e]["fc1"]["lora_a"] @ trees[e]["fc1"]["lora_b"])
        np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5)


def test_peft_scale_rules(tmp_path):
    rng = np.random.default_rng(1)
    f = _random_factors(rng, (4, 2))
    e = read_peft_expert(_write_peft(str(tmp_path / "rs"), f, r=4, alpha=8,
                                     extra_cfg={"use_rslora": True, "rank_pattern": {"fc2": 2},
                                                "alpha_pattern": {"fc2": 3}}))
    assert e.modules["fc1"].scale == pytest.approx(8 / 2.0)
    assert e.modules["fc2"].scale == pytest.approx(3 / np.sqrt(2))


def test_errors(tmp_path):
    base = _base()
    with pytest.raises(MergeInputError, match="at least one expert"):
        build_lora_moe(base, [])
    rng = np.random.default_rng(2)
    good = read_peft_expert(_write_peft(str(tmp_path / "good"), _random_factors(rng, (2, 2)), r=2, alpha=2))
    other = {"fc1": (rng.normal(size=(2, D_IN + 3)), rng.normal(size=(D_H, 2)))}
    bad = read_peft_expert(_write_peft(str(tmp_path / "other_base"), other, r=2, alpha=2))
    with pytest.raises(MergeInputError, match=r"other_base.*adapter_model\.safetensors.*fc1\.lora_A\.weight.*"
                                              r"another base model"):
        build_lora_moe(base, [good, bad])
    with pytest.raises(MergeInputError, match="top_k=3"):
        build_lora_moe(base, [good, good], top_k=3)
    wrong_r = _write_peft(str(tmp_path / "wrong_r"), _random_factors(rng, (2, 2)), r=3, alpha=2)
    with pytest.raises(MergeInputError, match="rank 2 but adapter_config.json says r=3"):
        read_peft_expert(wrong_r)
    with pytest.raises(MergeInputError, match="nope/fc1.*not found"):
        build_lora_moe(base, [good], module_map={"fc1": "nope/fc1", "fc2": "fc2"})
    spec, state = build_lora_moe(base, [good, good])
    with pytest.raises(MergeInputError, match="out of range"):
        with_forced_expert(spec, state, 2)


def test_router_training_labelled_and_unlabelled(tmp_path):
    experts, _ = _experts(tmp_path)
    base = _base()
    spec, state = build_lora_moe(base, experts, top_k=1)
    x = jax.random.normal(jax.random.PRNGKey(4), (64, D_IN))
    target = lora_moe_apply(apply, spec, with_forced_expert(spec, state, 1), base, x)
    before = jax.tree_util.tree_map(np.array, state)

    def mse(st, batch):
        xb, yb = batch
        return jnp.mean((lora_moe_apply(apply, spec, st, base, xb) - yb) ** 2)

    new, losses = train_lora_router(spec, state, mse, (x, target), steps=60, lr=5e-2, batch_size=32)
    assert float(mse(new, (x, target))) < 0.5 * float(mse(state, (x, target)))
    _, routing = lora_moe_apply(apply, spec, new, base, x, return_routing=True)
    assert np.mean(np.asarray(routing["fc2"][1][:, 0]) == 1) > 0.8  # learnt to send tokens to expert 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["experts"], before["experts"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, before)

    def ent(st, xb):
        return entropy_loss(lora_moe_apply(apply, spec, st, base, xb))

    new2, _ = train_lora_router(spec, state, ent, x, steps=40, lr=5e-2, batch_size=32)
    assert float(ent(new2, x)) < float(ent(state, x)) - 1e-3
    jax.tree_util.tree_map(np.testing.assert_array_equal, new2["experts"], before["experts"])


def test_real_peft_adapters_match_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(D_IN, D_H)
            self.fc2 = torch.nn.Linear(D_H, D_OUT)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    tnet = TNet()
    base = {m: {"kernel": jnp.asarray(getattr(tnet, m).weight.detach().numpy().T),
                "bias": jnp.asarray(getattr(tnet, m).bias.detach().numpy())} for m in ("fc1", "fc2")}
    dirs = []
    for i, (r, alpha) in enumerate([(2, 4), (3, 3)]):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2"], init_lora_weights=False)
        import copy
        pm = peft.get_peft_model(copy.deepcopy(tnet), cfg)
        d = str(tmp_path / f"peft{i}")
        pm.save_pretrained(d)
        dirs.append((d, pm))
    experts = [read_peft_expert(d) for d, _ in dirs]
    spec, state = build_lora_moe(base, experts, top_k=1)
    x = np.random.default_rng(0).normal(size=(5, D_IN)).astype(np.float32)
    for t, (_, pm) in enumerate(dirs):
        got = lora_moe_apply(apply, spec, with_forced_expert(spec, state, t), base, jnp.asarray(x))
        with torch.no_grad():
            want = pm(torch.from_numpy(x)).numpy()
            plain = tnet(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(want - plain)) > 1e-2


@pytest.mark.parametrize("impl", ["ragged", "pallas", "dense"])
def test_delta_bfloat16_through_moe_dispatch(impl):
    """bf16 inputs: the routed LoRA part (moe_dispatch's linear experts: x A_e, then scale_e B_e, each rounded to
    bf16, float32 routing weights) against float64 NumPy from the same bf16 values; several row tiles per expert."""
    rng = np.random.default_rng(5)
    N, E, R = 40, 3, 4
    x = jnp.asarray(rng.normal(size=(N, D_IN)), jnp.bfloat16)
    logits = jnp.asarray(rng.normal(size=(N, E)) * 2, jnp.float32)
    A = jnp.asarray(rng.normal(size=(E, D_IN, R)), jnp.float32)
    B = jnp.asarray(rng.normal(size=(E, R, D_OUT)), jnp.float32)
    s = jnp.asarray([0.5, 2.0, 1.0], jnp.float32)
    d, (w, ids) = lora_moe_delta(x, logits, A, B, s, top_k=2, normalize=True, impl=impl, block_rows=8, interpret=True)
    assert d.dtype == jnp.bfloat16 and d.shape == (N, D_OUT)
    p = _np_softmax(np.asarray(logits, np.float64))
    x64, A64, B64 = (np.asarray(t, np.float64) for t in (x, A, B))
    want = np.zeros((N, D_OUT))
    for n in range(N):
        top = np.argsort(-p[n], kind="stable")[:2]
        np.testing.assert_array_equal(np.asarray(ids[n]), top)
        for e, we in zip(top, p[n, top] / p[n, top].sum()):
            want[n] += we * float(s[e]) * (x64[n] @ A64[e] @ B64[e])
    scale = np.abs(want).max()
    assert scale > 1.0
    # two bf16-rounded matmul outputs, bf16-rounded scale*B and result: measured <= 5.2e-3 of the scale (CPU, 4 seeds)
    np.testing.assert_allclose(np.asarray(d, np.float64), want, rtol=0, atol=1.5e-2 * scale)
