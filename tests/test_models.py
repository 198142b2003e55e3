"""jmerge.models: JAX decoders (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Mixtral, Qwen2-MoE, Qwen3-MoE) loaded from
the tiny bf16 checkpoints of tests/data/arch give transformers' logits and hidden states on the same weights
(float32: <= 1e-4 relative; bfloat16: <= 2e-2 relative), with and without left padding; so do Llama with each
rotary scaling (linear, dynamic, llama3, yarn; transformers 5 ``rope_parameters`` and transformers 4
``rope_scaling``), Gemma-2 with its sliding window applied and Qwen3-MoE with dense layers among the sparse ones;
MoE checkpoints read as stored (per-expert names) and fused (transformers 5 ``gate_up_proj``) give identical
models; moe_ffn equals a per-token NumPy loop; a model sharded over 8 simulated CPU devices gives the unsharded
logits."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge.models as jm
from jmerge.io import CheckpointFormatError

ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch")
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "mixtral", "qwen2_moe", "qwen3_moe"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
B, T, PAD = 2, 10, 3


def _ids_mask(t=T):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, size=(B, t)).astype(np.int32)
    mask = np.ones((B, t), np.int32)
    mask[0, :PAD] = 0  # left padding of row 0
    ids[0, :PAD] = 3
    return ids, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _hf(path, dtype_name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    dt = getattr(torch, dtype_name)
    # transformers' default attention (SDPA), whose order jmerge follows; soft-capped Gemma-2 runs eager there
    attn = "eager" if "gemma2" in path else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn)
    return torch, model.eval()


def _hf_run(torch, model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
                    output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def _edited_copy(src, dst, **changes):
    """Copy a checkpoint directory and update its config.json (a value None removes the key)."""
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(cfg_path, "w"))
    return dst


#: config variants: ``qwen2_moe_norm`` Qwen2-MoE with ``norm_topk_prob: true``; ``qwen3_moe_nonorm`` Qwen3-MoE
#: with ``norm_topk_prob: false`` and the Hub's key ``num_experts`` (transformers 5 writes ``num_local_experts``).
VARIANTS = {"qwen2_moe_norm": ("qwen2_moe", {"norm_topk_prob": True}),
            "qwen3_moe_nonorm": ("qwen3_moe", {"norm_topk_prob": False, "num_local_experts": None, "num_experts": 4})}


def _variant(arch, tmp_path):
    """The checkpoint directory of ``arch`` or of a :data:`VARIANTS` entry."""
    if arch not in VARIANTS:
        return os.path.join(ARCH, arch, "base")
    src, changes = VARIANTS[arch]
    return _edited_copy(os.path.join(ARCH, src, "base"), str(tmp_path / arch), **changes)


@pytest.mark.parametrize("arch", ARCHS + list(VARIANTS))
def test_logits_match_transformers_float32(arch, tmp_path):
    """float32 (the bf16 checkpoint cast on load), jitted: logits and every hidden state (each layer's input,
    then the final normed output, as transformers returns them) within 1e-4 relative (observed <= 2e-6),
    without and with left padding (padded query positions are not compared: they are undefined)."""
    path = _variant(arch, tmp_path)
    torch, hf = _hf(path, "float32")
    model = jm.load_model(path, jnp.float32)
    assert model.dtype == jnp.float32
    fwd = jax.jit(lambda m, i, a: m(i, a, output_hidden_states=True))
    ids, mask = _ids_mask()
    for m in (None, mask):
        ref, ref_h = _hf_run(torch, hf, ids, m)
        logits, hidden = fwd(model, jnp.asarray(ids), None if m is None else jnp.asarray(m))
        assert logits.dtype == jnp.float32
        assert len(hidden) == len(ref_h) == model.config.num_hidden_layers + 1
        keep = np.ones((B, T), bool) if m is None else mask.astype(bool)
        err = _rel(np.asarray(logits)[keep], ref[keep])
        assert err <= 1e-4, (arch, m is not None, err)
        for i, (h, r) in enumerate(zip(hidden, ref_h)):
            herr = _rel(np.asarray(h)[keep], r[keep])
            assert herr <= 1e-4, (arch, m is not None, "hidden", i, herr)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_bfloat16(arch):
    """bfloat16, each layer teacher-forced: jmerge's layer ``i`` on transformers' bf16 input of layer ``i``
    gives transformers' input of layer ``i + 1`` within 1.5e-2 relative (observed <= 0.9e-2, about two bf16
    ulps: fused elementwise chains round differently), the last layer + final norm and the LM head likewise.
    End to end, dense models stay within 5e-2 of transformers' bf16 logits (observed <= 3.5e-2; both are
    as far from float32). MoE models get no end-to-end bound: under bf16 noise a near-tie token can pick
    another expert in one implementation and not the other (observed up to 0.15 on the tiny Mixtral; with
    teacher forcing, at most one token of a layer flips, and every other token keeps the bound). Gemma-2's
    head includes the final logit soft-capping. The reference is transformers' default attention (SDPA; eager for
    the soft-capped Gemma-2), whose order jmerge follows."""
    path = os.path.join(ARCH, arch, "base")
    torch, hf = _hf(path, "bfloat16")
    model = jm.load_model(path, jnp.bfloat16)
    ids, mask = _ids_mask()
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    for m in (None, mask):
        ref, ref_h = _hf_run(torch, hf, ids, m)
        keep = np.ones((B, T), bool) if m is None else mask.astype(bool)
        am = None if m is None else jnp.asarray(m)
        n = len(model.layers)
        for i, layer in enumerate(model.layers):
            y = layer(jnp.asarray(ref_h[i], jnp.bfloat16), pos, am)
            if i == n - 1:
                y = model.norm(y)
            got, want = np.asarray(y, np.float32)[keep], ref_h[i + 1][keep]
            if arch in MOE_ARCHS and model.config.moe_layers[i]:
                # a token whose router logits nearly tie can pick another expert under bf16 noise (observed:
                # one token of a layer of the tiny Qwen2-MoE / Mixtral, depending on the attention order):
                # bound every token but at most one, and that one loosely
                tok = np.abs(got - want).max(-1) / np.abs(want).max()
                assert np.sort(tok)[-2] <= 1.5e-2 and tok.max() <= 0.3, (arch, m is not None, "layer", i, tok.max())
                continue
            err = _rel(got, want)
            assert err <= 1.5e-2, (arch, m is not None, "layer", i, err)
        lg = model.logits_from_hidden(jnp.asarray(ref_h[n], jnp.bfloat16))
        assert _rel(np.asarray(lg, np.float32)[keep], ref[keep]) <= 1.5e-2
        logits, hidden = model(jnp.asarray(ids), am, output_hidden_states=True)
        assert logits.dtype == jnp.bfloat16 and len(hidden) == n + 1
        if arch not in MOE_ARCHS:
            err = _rel(np.asarray(logits, np.float32)[keep], ref[keep])
            assert err <= 5e-2, (arch, m is not None, err)


def test_padding_matches_unpadded_row():
    """A left-padded row with positions shifted to start at 0 gives the unpadded sequence's logits."""
    model = jm.load_model(os.path.join(ARCH, "llama", "base"), jnp.float32)
    ids, mask = _ids_mask()
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    padded = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
    alone = model(jnp.asarray(ids[:1, PAD:]))
    np.testing.assert_allclose(np.asarray(padded[0, PAD:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def _fused_copy(src, dst, arch):
    """Rewrite an MoE checkpoint with transformers 5's fused expert tensors (NumPy + safetensors)."""
    from safetensors.numpy import save_file
    from jmerge.io import open_checkpoint

    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    r = open_checkpoint(src)
    cfg = r.config
    n = cfg.get("num_local_experts") or cfg["num_experts"]
    proj = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    stored = ".block_sparse_moe.experts." if arch == "mixtral" else ".mlp.experts."
    out = {}
    for k in r.keys():
        if ".experts." not in k:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = r.get(k)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        st = {part: np.stack([r.get(f"{p}{stored}{e}.{name}.weight") for e in range(n)]) for part, name in proj.items()}
        out[f"{p}.mlp.experts.gate_up_proj"] = np.concatenate([st["gate"], st["up"]], axis=1)
        out[f"{p}.mlp.experts.down_proj"] = st["down"]
    r.close()
    save_file(out, os.path.join(dst, "model.safetensors"))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_experts_read_as_stored(arch, tmp_path):
    src = os.path.join(ARCH, arch, "base")
    dst = str(tmp_path / "fused")
    _fused_copy(src, dst, arch)
    a, b = jm.load_model(src, jnp.float32), jm.load_model(dst, jnp.float32)
    ids, mask = _ids_mask()
    la, lb = a(jnp.asarray(ids), jnp.asarray(mask)), b(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def test_moe_ffn_matches_per_token_loop():
    rng = np.random.default_rng(1)
    n, h, i, e, k = 7, 6, 5, 4, 2
    x = rng.standard_normal((n, h)).astype(np.float32)
    logits = rng.standard_normal((n, e)).astype(np.float32)
    gate, up = rng.standard_normal((2, e, i, h)).astype(np.float32)
    down = rng.standard_normal((e, h, i)).astype(np.float32)
    for normalize in (True, False):
        out = np.asarray(jm.moe_ffn(jnp.asarray(x), jnp.asarray(logits), jnp.asarray(gate), jnp.asarray(up),
                                    jnp.asarray(down), k, normalize=normalize))
        ref = np.zeros_like(x)
        for t in range(n):
            p = np.exp(logits[t] - logits[t].max())
            p /= p.sum()
            top = np.argsort(-p)[:k]
            w = p[top] / (p[top].sum() if normalize else 1.0)
            for wi, ex in zip(w, top):
                g = gate[ex] @ x[t]
                ref[t] += wi * (down[ex] @ (g / (1 + np.exp(-g)) * (up[ex] @ x[t])))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_matches_transformers(tmp_path):
    """Mistral with a 4-token window on a 10-token sequence (the window is applied, not ignored)."""
    src = os.path.join(ARCH, "mistral", "base")
    dst = str(tmp_path / "mistral_sw")
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["sliding_window"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    torch, hf = _hf(dst, "float32")
    model = jm.load_model(dst, jnp.float32)
    assert model.config.sliding_windows == (4,) * 4
    ids, mask = _ids_mask()
    ref, _ = _hf_run(torch, hf, ids, None)
    assert _rel(model(jnp.asarray(ids)), ref) <= 1e-4
    full = jm.load_model(src, jnp.float32)(jnp.asarray(ids))
    assert _rel(full, ref) > 1e-3  # the window changes the logits: the test can fail


@pytest.mark.parametrize("layer_types", [True, False])
def test_gemma2_sliding_window_matches_transformers(layer_types, tmp_path):
    """Gemma-2 with a 4-token window on 10 tokens: layers 0 and 2 slide (from ``layer_types``, or without them by
    transformers' rule: every other layer from the first), layers 1 and 3 attend fully; logit soft-capping on."""
    src = os.path.join(ARCH, "gemma2", "base")
    dst = _edited_copy(src, str(tmp_path / "gemma2_sw"), sliding_window=4,
                       **({} if layer_types else {"layer_types": None}))
    torch, hf = _hf(dst, "float32")
    model = jm.load_model(dst, jnp.float32)
    assert model.config.sliding_windows == (4, None, 4, None)
    assert model.config.final_logit_softcapping == 30.0 and model.config.attn_logit_softcapping == 50.0
    ids, mask = _ids_mask()
    for m in (None, mask):
        ref, _ = _hf_run(torch, hf, ids, m)
        keep = np.ones((B, T), bool) if m is None else mask.astype(bool)
        got = model(jnp.asarray(ids), None if m is None else jnp.asarray(m))
        assert _rel(np.asarray(got)[keep], ref[keep]) <= 1e-4
    full = jm.load_model(src, jnp.float32)(jnp.asarray(ids))
    assert _rel(full, _hf_run(torch, hf, ids, None)[0]) > 1e-3  # the window matters here


def test_gemma2_numerics_by_hand():
    """Gemma-2's pieces against NumPy from the formulas: embeddings times sqrt(hidden), RMSNorm times (1 + w),
    final logits ``30 tanh(z / 30)`` of the tied head."""
    model = jm.load_model(os.path.join(ARCH, "gemma2", "base"), jnp.float32)
    ids, _ = _ids_mask()
    emb = np.asarray(model.embed_tokens[...])
    np.testing.assert_allclose(np.asarray(model.embed(jnp.asarray(ids))), emb[ids] * 4.0, rtol=1e-6)
    x = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    w = np.asarray(model.norm.weight[...])
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(np.asarray(model.norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    z = x @ emb.T
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(jnp.asarray(x))), 30 * np.tanh(z / 30),
                               rtol=1e-5, atol=1e-6)


def test_qwen3_moe_dense_layers_and_window(tmp_path):
    """Qwen3-MoE with ``decoder_sparse_step: 2`` and ``mlp_only_layers: [5]`` (MoE in layers 1 and 3 only), the
    sliding window on every layer (``use_sliding_window``), unnormalised top-k weights: transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[5], norm_topk_prob=False, use_sliding_window=True,
        sliding_window=4, initializer_range=0.2, max_position_embeddings=64)
    dst = str(tmp_path / "qwen3_moe_sparse")
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(dst)
    torch, hf = _hf(dst, "float32")
    model = jm.load_model(dst, jnp.float32)
    c = model.config
    assert c.moe_layers == (False, True, False, True, False, False) and c.sliding_windows == (4,) * 6
    assert not c.norm_topk_prob and c.qk_norm and isinstance(model.layers[0].mlp, jm.MLP)
    ids, mask = _ids_mask()
    for m in (None, mask):
        ref, ref_h = _hf_run(torch, hf, ids, m)
        keep = np.ones((B, T), bool) if m is None else mask.astype(bool)
        logits, hidden = model(jnp.asarray(ids), None if m is None else jnp.asarray(m), output_hidden_states=True)
        assert _rel(np.asarray(logits)[keep], ref[keep]) <= 1e-4
        for h, r in zip(hidden, ref_h):
            assert _rel(np.asarray(h)[keep], r[keep]) <= 1e-4
    counts = np.asarray(model(jnp.asarray(ids), output_expert_counts=True)[1])
    assert (counts[[1, 3]].sum(axis=1) == B * T * 2).all() and (counts[[0, 2, 4, 5]] == 0).all()


#: rotary scalings tested on Llama (head_dim 8: four frequencies, so llama3's three bands and yarn's ramp are all
#: exercised): (rope parameters, extra config fields, sequence length)
ROPES = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, {}, 16),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {"max_position_embeddings": 16}, 24),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, {"max_position_embeddings": 256}, 24),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
             {"max_position_embeddings": 1024}, 24),
}


def _rope_copy(tmp_path, name, rope, extra, style):
    """The tiny Llama with 2 heads of 8 dims (same tensor shapes) and a rotary scaling written as transformers 5
    (``rope_parameters`` with ``rope_theta`` inside) or 4 (``rope_scaling``, ``type`` for the older types, top-level
    ``rope_theta``) writes it."""
    changes = dict(extra, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    if style == "tf5":
        changes["rope_parameters"] = dict(rope, rope_theta=10000.0)
    else:
        old = dict(rope)
        if rope["rope_type"] in ("linear", "dynamic"):
            old["type"] = old.pop("rope_type")
        changes.update(rope_parameters=None, rope_scaling=old, rope_theta=10000.0)
    return _edited_copy(os.path.join(ARCH, "llama", "base"), str(tmp_path / f"{name}_{style}"), **changes)


@pytest.mark.parametrize("style", ["tf5", "tf4"])
@pytest.mark.parametrize("name", list(ROPES))
def test_rope_scaling_matches_transformers(name, style, tmp_path):
    """float32 logits within 1e-4 of transformers' with and without left padding, on sequences long enough that the
    scaling changes them (> 1e-3 from the same model with the default rotary embedding). ``dynamic`` (threshold
    16 positions): a 24-token batch grows the base, a 12-token batch keeps the default frequencies exactly."""
    rope, extra, t = ROPES[name]
    path = _rope_copy(tmp_path, name, rope, extra, style)
    plain = _edited_copy(os.path.join(ARCH, "llama", "base"), str(tmp_path / "plain"), num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8)
    torch, hf = _hf(path, "float32")
    model = jm.load_model(path, jnp.float32)
    assert model.config.rope_scaling.rope_type == name and model.config.head_dim == 8
    default = jm.load_model(plain, jnp.float32)
    fwd = jax.jit(lambda m, i, a: m(i, a))
    ids, mask = _ids_mask(t)
    for m in (None, mask):
        ref, _ = _hf_run(torch, hf, ids, m)
        keep = np.ones(ids.shape, bool) if m is None else mask.astype(bool)
        am = None if m is None else jnp.asarray(m)
        got = np.asarray(fwd(model, jnp.asarray(ids), am))
        err = _rel(got[keep], ref[keep])
        assert err <= 1e-4, (name, style, m is not None, err)
        assert _rel(np.asarray(fwd(default, jnp.asarray(ids), am))[keep], ref[keep]) > 1e-3, name
    if name == "dynamic":
        short = jnp.asarray(ids[:, :12])
        ref_short, _ = _hf_run(torch, hf, ids[:, :12], None)
        got_short = np.asarray(fwd(model, short, None))
        assert _rel(got_short, ref_short) <= 1e-4
        np.testing.assert_array_equal(got_short, np.asarray(fwd(default, short, None)))


def test_rope_inv_freq_by_hand():
    """The scaled frequencies against NumPy from the published formulas (head_dim 8, theta 10000)."""
    from jmerge.models.config import RopeScaling
    from jmerge.models.layers import rope_inv_freq
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)  # 1, 0.1, 0.01, 0.001
    lin = np.asarray(rope_inv_freq(8, 10000.0, RopeScaling("linear", factor=2.0)))
    np.testing.assert_allclose(lin, inv / 2, rtol=1e-6)
    # llama3, original 64, low 1, high 4: wavelength 2 pi kept (< 16), 2 pi * 10 smoothed, longer ones / 4
    l3 = np.asarray(rope_inv_freq(8, 10000.0, RopeScaling("llama3", factor=4.0, original_max_position_embeddings=64,
                                                          low_freq_factor=1.0, high_freq_factor=4.0)))
    sm = (64 / (2 * np.pi * 10) - 1) / 3
    np.testing.assert_allclose(l3, [1.0, (1 - sm) * 0.1 / 4 + sm * 0.1, 0.01 / 4, 0.001 / 4], rtol=1e-5)
    # dynamic: the default below the threshold, then theta * (f L / M - (f - 1))^(d / (d - 2))
    dyn = RopeScaling("dynamic", factor=2.0, max_position_embeddings=16)
    np.testing.assert_array_equal(np.asarray(rope_inv_freq(8, 1e4, dyn, jnp.arange(16)[None])),
                                  np.asarray(rope_inv_freq(8, 1e4, None)))
    base = 1e4 * (2 * 24 / 16 - 1) ** (8 / 6)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(8, 1e4, dyn, jnp.arange(24)[None])),
                               1.0 / base ** (np.arange(0, 8, 2) / 8), rtol=1e-5)
    # yarn, original 256, beta 32/1: correction range floor(0.105)=0 .. ceil(1.61)=2, ramp 0, 1/2, 1, 1
    yarn = np.asarray(rope_inv_freq(8, 1e4, RopeScaling("yarn", factor=4.0, original_max_position_embeddings=256)))
    ramp = np.array([0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(yarn, inv / 4 * ramp + inv * (1 - ramp), rtol=1e-5)


def test_errors(tmp_path):
    src = os.path.join(ARCH, "gpt2", "base")
    with pytest.raises(CheckpointFormatError, match="model_type 'gpt2' is not supported"):
        jm.load_model(src)
    dst = str(tmp_path / "mixtral")
    shutil.copytree(os.path.join(ARCH, "mixtral", "base"), dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["num_local_experts"] = 5
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    with pytest.raises(CheckpointFormatError, match=r"experts\.4\.w1\.weight' is missing"):
        jm.load_model(dst)
    base = json.load(open(os.path.join(ARCH, "llama", "base", "config.json")))
    for rope, msg in (({"rope_type": "longrope", "factor": 2.0}, r"rope_type 'longrope' is not supported by "
                       r"jmerge.models; supported: default, linear, dynamic, llama3, yarn"),
                      ({"rope_type": "linear"}, r"rope_type 'linear' needs 'factor'"),
                      ({"full_attention": {"rope_type": "default"}}, "per layer type"),
                      ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5")):
        with pytest.raises(CheckpointFormatError, match=msg) as e:
            jm.DecoderConfig.from_dict({**base, "rope_parameters": rope}, source="c.json")
        assert str(e.value).startswith("c.json: ") and "\n" not in str(e.value)
    with pytest.raises(CheckpointFormatError, match="rope_type 'su' is not supported"):
        jm.DecoderConfig.from_dict({**base, "rope_scaling": {"type": "su", "factor": 2.0}})
    with pytest.raises(CheckpointFormatError, match="hidden activation 'relu' is not supported"):
        jm.DecoderConfig.from_dict({**base, "hidden_act": "relu"})


def test_public_docstrings():
    """The rule of tests/test_docstrings.py, for jmerge.models (not in its module list)."""
    for name in jm.__all__:
        obj = getattr(jm, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.cleandoc(obj.__doc__ or "")
            assert doc and doc.splitlines()[0].strip(), name
            assert "References:" in doc, name


SHARD_SCRIPT = textwrap.dedent(r"""
    import chex
    chex.set_n_cpu_devices(8)
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jmerge.models as jm
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("expert", "model"))
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 64, size=(2, 10)), jnp.int32)
    for arch in sys.argv[1:]:
        m = jm.load_model(f"tests/data/arch/{arch}/base", jnp.float32)
        ref = np.asarray(jax.jit(lambda m, i: m(i))(m, ids))
        sm = jm.shard_model(m, mesh, model_axis="model", expert_axis="expert")
        specs = jm.param_specs(m, mesh, model_axis="model", expert_axis="expert")
        q = sm.layers[0].self_attn.q_proj.weight[...]
        assert q.sharding.spec == P("model", None), q.sharding
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (4, 16)
        if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
            g = sm.layers[0].mlp.experts.gate[...]
            assert g.sharding.spec == P("expert", "model", None), g.sharding
        assert len(m.layers[0].self_attn.q_proj.weight[...].sharding.device_set) == 1  # input untouched
        out = np.asarray(jax.jit(lambda m, i: m(i))(sm, ids))
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        print(arch, "sharded rel err", err, flush=True)
        assert err <= 1e-5, (arch, err)
    print("OK")
""")


def test_sharded_forward_equals_unsharded():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_impls_give_same_logits(arch):
    """The MoE forward through the dispatch kernel (``moe_impl="ragged"``, the CPU default; ``"pallas"`` in
    the interpreter) equals the dense one-hot reference (``"dense"``) in float32 (observed <= 8e-7 relative)."""
    path = os.path.join(ARCH, arch, "base")
    ids, mask = _ids_mask()
    out = {}
    for impl in ("auto", "ragged", "pallas", "dense"):
        m = jm.load_model(path, jnp.float32, moe_impl=impl)
        assert m.layers[0].mlp.impl == impl
        out[impl] = np.asarray(jax.jit(lambda m, i, a: m(i, a))(m, jnp.asarray(ids), jnp.asarray(mask)))
    keep = mask.astype(bool)
    for impl in ("ragged", "pallas"):
        assert _rel(out[impl][keep], out["dense"][keep]) <= 1e-5, (arch, impl)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(out["auto"], out["ragged"])
    with pytest.raises(ValueError, match="impl must be one of"):
        jm.load_model(path, jnp.float32, moe_impl="sparse")
