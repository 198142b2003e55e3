"""jmerge.models: JAX decoders (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE) loaded from the tiny bf16
checkpoints of tests/data/arch give transformers' logits and hidden states on the same weights (float32:
<= 1e-4 relative; bfloat16: <= 2e-2 relative), with and without left padding; MoE checkpoints read as stored
(per-expert names) and fused (transformers 5 ``gate_up_proj``) give identical models; moe_ffn equals a
per-token NumPy loop; a model sharded over 8 simulated CPU devices gives the unsharded logits."""

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
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe"]
B, T, PAD = 2, 10, 3


def _ids_mask():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
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
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager")
    return torch, model.eval()


def _hf_run(torch, model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
                    output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def _variant(arch, tmp_path):
    """The checkpoint directory of ``arch``; ``qwen2_moe_norm`` is Qwen2-MoE with ``norm_topk_prob: true``."""
    if arch != "qwen2_moe_norm":
        return os.path.join(ARCH, arch, "base")
    dst = str(tmp_path / arch)
    shutil.copytree(os.path.join(ARCH, "qwen2_moe", "base"), dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["norm_topk_prob"] = True
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


@pytest.mark.parametrize("arch", ARCHS + ["qwen2_moe_norm"])
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
    teacher forcing no token flips)."""
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
            err = _rel(np.asarray(y, np.float32)[keep], ref_h[i + 1][keep])
            assert err <= 1.5e-2, (arch, m is not None, "layer", i, err)
        head = model.embed_tokens[...] if model.lm_head is None else model.lm_head[...]
        lg = jnp.einsum("bth,vh->btv", jnp.asarray(ref_h[n], jnp.bfloat16), head)
        assert _rel(np.asarray(lg, np.float32)[keep], ref[keep]) <= 1.5e-2
        logits, hidden = model(jnp.asarray(ids), am, output_hidden_states=True)
        assert logits.dtype == jnp.bfloat16 and len(hidden) == n + 1
        if arch not in ("mixtral", "qwen2_moe"):
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


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
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
        if arch in ("mixtral", "qwen2_moe"):
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
    r = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, "qwen2", "mixtral", "qwen2_moe"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
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
