"""Expert surgery (jmerge.models.experts, `jmerge experts`): expert load ignores padding and sums to
tokens x top_k; pruning experts no token routes to leaves the logits unchanged (jmerge and transformers, Mixtral
as stored and Qwen2-MoE fused with norm_topk_prob); a forced expert equals the dense Llama built from that
expert's weights; switched-off experts get no token; bad `keep` values are one-line errors, nothing written.
Qwen3-MoE (norm_topk_prob true) is pruned as stored (transformers 5's `num_local_experts`) and fused with the Hub's
`num_experts` key, logits unchanged in jmerge and transformers."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jmerge.models as jm
from jmerge.cli import main

ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch")
MIXTRAL = os.path.join(ARCH, "mixtral", "base")
# token ids on which every layer of the tiny Mixtral (4 experts, top-2) leaves an expert unused
UNUSED_IDS = np.array([[60, 41, 45, 57]], np.int32)
QWEN_IDS = np.array([[54, 19, 10, 21]], np.int32)
QWEN3 = os.path.join(ARCH, "qwen3_moe", "base")
QWEN3_IDS = np.array([[27, 55, 37, 6]], np.int32)  # every layer of the tiny Qwen3-MoE leaves an expert unused


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_expert_load_counts_tokens_not_padding():
    m = jm.load_model(MIXTRAL, jnp.float32)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 3
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    _, counts = m(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), output_expert_counts=True)
    counts = np.asarray(counts)
    assert counts.shape == (4, 4) and (counts.sum(axis=1) == (4 + 7) * 2).all()
    alone = jm.expert_load(m, [ids[:1, 3:], ids[1:]])
    np.testing.assert_array_equal(counts, alone)
    with_pad = np.asarray(m(jnp.asarray(ids), None, jnp.asarray(pos), output_expert_counts=True)[1])
    assert with_pad.sum() == 14 * 2 * 4 and not (with_pad == counts).all()  # padding would be counted


@pytest.mark.parametrize("path", [MIXTRAL, QWEN3], ids=["mixtral", "qwen3_moe"])
def test_switched_off_expert_gets_no_token(path):
    m = jm.load_model(path, jnp.float32)
    ids = np.random.default_rng(1).integers(4, 64, size=(2, 9)).astype(np.int32)
    mask = jm.expert_mask(m.config, off={0: [1], 2: [0, 3]})
    logits, counts = m(jnp.asarray(ids), expert_mask=jnp.asarray(mask), output_expert_counts=True)
    counts = np.asarray(counts)
    assert counts[0, 1] == 0 and counts[2, 0] == counts[2, 3] == 0
    assert (counts.sum(axis=1) == 18 * 2).all()
    full = np.asarray(jm.load_model(path, jnp.float32)(jnp.asarray(ids)))
    assert _rel(logits, full) > 1e-3  # switching experts off changes the model: the mask is applied


def _dense_from_expert(dst, e):
    """A Llama checkpoint whose MLPs are expert ``e`` of each Mixtral layer (attention, norms, embeddings shared)."""
    from safetensors.numpy import save_file

    from jmerge.io import open_checkpoint
    os.makedirs(dst)
    r = open_checkpoint(MIXTRAL)
    out = {}
    for k in r.keys():
        if ".block_sparse_moe." not in k:
            out[k] = r.get(k)
    cfg = dict(r.config)
    for i in range(cfg["num_hidden_layers"]):
        for src, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"model.layers.{i}.mlp.{name}.weight"] = r.get(f"model.layers.{i}.block_sparse_moe.experts.{e}.{src}.weight")
    r.close()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                "output_router_logits"):
        cfg.pop(key, None)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False, attention_bias=False)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def test_forced_expert_equals_dense_model(tmp_path):
    """Forcing expert e in every layer gives the logits of the dense Llama made of expert e's FFNs (loaded
    through jmerge's dense path), and each forced layer equals a NumPy SwiGLU of that expert."""
    m = jm.load_model(MIXTRAL, jnp.float32)
    ids = np.random.default_rng(2).integers(4, 64, size=(2, 8)).astype(np.int32)
    for e in (0, 3):
        dense_dir = str(tmp_path / f"dense{e}")
        _dense_from_expert(dense_dir, e)
        dense = jm.load_model(dense_dir, jnp.float32)
        mask = jm.expert_mask(m.config, force=[e])
        forced, counts = m(jnp.asarray(ids), expert_mask=jnp.asarray(mask), output_expert_counts=True)
        assert (np.asarray(counts)[:, e] == 16).all() and np.asarray(counts).sum() == 16 * 4
        ref = np.asarray(dense(jnp.asarray(ids)))
        assert _rel(forced, ref) <= 1e-5, e
        assert _rel(m(jnp.asarray(ids)), ref) > 1e-3  # routing normally differs from the forced expert
    # one layer against NumPy from the formula
    layer = m.layers[1]
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    allowed = np.zeros(4, bool)
    allowed[2] = True
    got = np.asarray(layer.mlp(jnp.asarray(x), allowed=jnp.asarray(allowed)))
    g = x @ np.asarray(layer.mlp.experts.gate[...])[2].T
    u = x @ np.asarray(layer.mlp.experts.up[...])[2].T
    want = (g / (1 + np.exp(-g)) * u) @ np.asarray(layer.mlp.experts.down[...])[2].T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prune_unused_experts_keeps_logits(tmp_path):
    m = jm.load_model(MIXTRAL, jnp.float32)
    load = jm.expert_load(m, [UNUSED_IDS])
    assert ((load == 0).sum(axis=1) >= 1).all(), load  # the precondition: an unused expert in every layer
    out = str(tmp_path / "pruned")
    kept = jm.prune_experts(MIXTRAL, out, 3, load=load)
    assert all(load[i, e] == 0 for i in range(4) for e in range(4) if e not in kept[i])
    assert all(len(k) == 3 for k in kept)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "generation_config.json"))
    from jmerge.io import open_checkpoint
    r, src = open_checkpoint(out), open_checkpoint(MIXTRAL)
    assert r.shape("model.layers.0.block_sparse_moe.gate.weight") == (3, 16)
    assert not any(".experts.3." in k for k in r.keys())
    for i in range(4):  # renumbered experts are the kept ones, bit-exact; router rows too
        for new, old in enumerate(kept[i]):
            np.testing.assert_array_equal(r.get(f"model.layers.{i}.block_sparse_moe.experts.{new}.w2.weight"),
                                          src.get(f"model.layers.{i}.block_sparse_moe.experts.{old}.w2.weight"))
        np.testing.assert_array_equal(r.get(f"model.layers.{i}.block_sparse_moe.gate.weight"),
                                      src.get(f"model.layers.{i}.block_sparse_moe.gate.weight")[kept[i]])
    r.close()
    src.close()
    pruned = jm.load_model(out, jnp.float32)
    a, b = np.asarray(m(jnp.asarray(UNUSED_IDS))), np.asarray(pruned(jnp.asarray(UNUSED_IDS)))
    assert _rel(b, a) <= 1e-6, _rel(b, a)
    other = np.random.default_rng(5).integers(4, 64, size=(2, 9)).astype(np.int32)
    assert _rel(pruned(jnp.asarray(other)), m(jnp.asarray(other))) > 1e-3  # the pruning did remove experts

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf0 = transformers.AutoModelForCausalLM.from_pretrained(MIXTRAL, dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.tensor(UNUSED_IDS, dtype=torch.long)
        lp, l0 = hf(input_ids=t).logits.numpy(), hf0(input_ids=t).logits.numpy()
    assert _rel(lp, b) <= 1e-4 and _rel(lp, l0) <= 1e-5, (_rel(lp, b), _rel(lp, l0))


def test_prune_qwen2_moe_fused_layout(tmp_path):
    """Qwen2-MoE with norm_topk_prob (renormalised weights), experts stored fused as transformers 5 writes
    them: pruning the unused experts keeps the logits; the shared expert and its gate are untouched."""
    from tests.test_models import _fused_copy
    src = str(tmp_path / "qwen_fused")
    _fused_copy(os.path.join(ARCH, "qwen2_moe", "base"), src, "qwen2_moe")
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["norm_topk_prob"] = True
    json.dump(cfg, open(cfg_path, "w"))
    m = jm.load_model(src, jnp.float32)
    load = jm.expert_load(m, [QWEN_IDS])
    assert ((load == 0).sum(axis=1) >= 1).all(), load
    out = str(tmp_path / "pruned")
    jm.prune_experts(src, out, 3, load=load)
    assert json.load(open(os.path.join(out, "config.json")))["num_experts"] == 3
    from jmerge.io import open_checkpoint
    r = open_checkpoint(out)
    assert r.shape("model.layers.0.mlp.experts.gate_up_proj") == (3, 32, 16)
    assert r.shape("model.layers.0.mlp.gate.weight") == (3, 16)
    assert r.shape("model.layers.0.mlp.shared_expert_gate.weight") == (1, 16)
    r.close()
    a = np.asarray(m(jnp.asarray(QWEN_IDS)))
    b = np.asarray(jm.load_model(out, jnp.float32)(jnp.asarray(QWEN_IDS)))
    assert _rel(b, a) <= 1e-6


@pytest.mark.parametrize("layout", ["stored", "fused_hub_key"])
def test_prune_qwen3_moe(layout, tmp_path):
    """Qwen3-MoE: experts no token routes to are pruned with the logits unchanged (renormalised top-k weights),
    as transformers 5 stores it (per-expert tensors, ``num_local_experts``) and fused with the Hub's
    ``num_experts`` key; the key present is the one updated; transformers loads the output with the same logits."""
    from jmerge.io import open_checkpoint
    from tests.test_models import _fused_copy
    src = QWEN3
    if layout != "stored":
        src = str(tmp_path / "fused")
        _fused_copy(QWEN3, src, "qwen3_moe")
        cfg = json.load(open(os.path.join(src, "config.json")))
        cfg["num_experts"] = cfg.pop("num_local_experts")
        json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    m = jm.load_model(src, jnp.float32)
    load = jm.expert_load(m, [QWEN3_IDS])
    assert ((load == 0).sum(axis=1) >= 1).all(), load
    out = str(tmp_path / "pruned")
    kept = jm.prune_experts(src, out, 3, load=load)
    assert all(load[i, e] == 0 for i in range(4) for e in range(4) if e not in kept[i])
    cfg = json.load(open(os.path.join(out, "config.json")))
    key = "num_local_experts" if layout == "stored" else "num_experts"
    assert cfg[key] == 3 and len([k for k in cfg if k in ("num_local_experts", "num_experts")]) == 1
    r, s = open_checkpoint(out), open_checkpoint(src)
    assert r.shape("model.layers.0.mlp.gate.weight") == (3, 16)
    for i in range(4):
        np.testing.assert_array_equal(r.get(f"model.layers.{i}.mlp.gate.weight"),
                                      s.get(f"model.layers.{i}.mlp.gate.weight")[kept[i]])
        if layout == "stored":
            for new, old in enumerate(kept[i]):
                np.testing.assert_array_equal(r.get(f"model.layers.{i}.mlp.experts.{new}.up_proj.weight"),
                                              s.get(f"model.layers.{i}.mlp.experts.{old}.up_proj.weight"))
        else:
            np.testing.assert_array_equal(r.get(f"model.layers.{i}.mlp.experts.gate_up_proj"),
                                          s.get(f"model.layers.{i}.mlp.experts.gate_up_proj")[kept[i]])
    r.close()
    s.close()
    a = np.asarray(m(jnp.asarray(QWEN3_IDS)))
    b = np.asarray(jm.load_model(out, jnp.float32)(jnp.asarray(QWEN3_IDS)))
    assert _rel(b, a) <= 1e-6, _rel(b, a)
    other = np.random.default_rng(5).integers(4, 64, size=(2, 9)).astype(np.int32)
    assert _rel(jm.load_model(out, jnp.float32)(jnp.asarray(other)), m(jnp.asarray(other))) > 1e-3

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_experts == 3
    with torch.no_grad():
        lp = hf(input_ids=torch.tensor(QWEN3_IDS, dtype=torch.long)).logits.numpy()
    assert _rel(lp, b) <= 1e-4, _rel(lp, b)


def test_keep_lists_and_errors(tmp_path):
    out = str(tmp_path / "p")
    kept = jm.prune_experts(MIXTRAL, out, [[3, 0]])  # one list: every layer; renumbered in ascending order
    assert kept == [[0, 3]] * 4
    from jmerge.io import open_checkpoint
    r, src = open_checkpoint(out), open_checkpoint(MIXTRAL)
    np.testing.assert_array_equal(r.get("model.layers.2.block_sparse_moe.experts.1.w1.weight"),
                                  src.get("model.layers.2.block_sparse_moe.experts.3.w1.weight"))
    r.close()
    src.close()
    bad = str(tmp_path / "bad")
    load = np.ones((4, 4))
    for keep, msg in ((5, r"keep=5 is more than the 4 experts"), (1, r"keep=1 is below num_experts_per_tok=2"),
                      ([[0]], r"below num_experts_per_tok=2"), ([[0, 4]], r"expert 4 of layer 0 out of range"),
                      ([[0, 1], [0, 1, 2], [0, 1], [0, 1]], "same number of experts"),
                      ([[0, 0]], "lists an expert twice")):
        with pytest.raises(ValueError, match=msg):
            jm.prune_experts(MIXTRAL, bad, keep, load=load)
        assert not os.path.exists(bad) and not [f for f in os.listdir(tmp_path) if f.startswith(".bad")]
    with pytest.raises(ValueError, match="needs the expert load"):
        jm.prune_experts(MIXTRAL, bad, 3)
    with pytest.raises(ValueError, match="no expert left"):
        jm.expert_mask(jm.load_model(MIXTRAL).config, off=[0, 1, 2, 3])


def test_cli_stats_and_prune(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    text = tmp_path / "t.txt"
    text.write_text("hello world\nthe quick brown fox\n\nanother line of text\n")
    assert main(["experts", "stats", MIXTRAL, "--text", str(text)]) == 0
    outp = capsys.readouterr().out
    assert "layer" in outp and "expert" in outp
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "hello world", "task": "a"}\n{"text": "the quick brown fox", "task": "b"}\n')
    png = tmp_path / "load.png"
    assert main(["experts", "stats", MIXTRAL, "--jsonl", str(jl), "--task-field", "task", "--png", str(png)]) == 0
    outp = capsys.readouterr().out
    assert "task a" in outp and "task b" in outp
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        assert "matplotlib" in outp and not png.exists()
    out = tmp_path / "pruned"
    assert main(["experts", "prune", MIXTRAL, str(out), "--keep", "3", "--text", str(text)]) == 0
    assert json.load(open(out / "config.json"))["num_local_experts"] == 3
    assert main(["experts", "prune", MIXTRAL, str(tmp_path / "p2"), "--keep", "0,2"]) == 0
    assert main(["experts", "prune", MIXTRAL, str(tmp_path / "p3"), "--keep", "7", "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep=7 is more than the 4 experts" in err
    assert not (tmp_path / "p3").exists()
    assert main(["experts", "prune", MIXTRAL, str(tmp_path / "p4"), "--keep", "3"]) == 2
    assert "--text" in capsys.readouterr().err


def test_heatmap_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from jmerge.demo.heatmap import expert_heatmap
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    msg = expert_heatmap({"": np.ones((2, 4))}, str(tmp_path / "h.png"))
    assert "matplotlib is not installed" in msg and "jmerge[demo]" in msg and not os.listdir(tmp_path)


def test_prune_warns_without_renormalised_weights(tmp_path):
    """Qwen2-MoE's default (norm_topk_prob false): the routing weights are probabilities over all experts, so
    pruning changes the logits even for unused experts; prune_experts says so."""
    src = os.path.join(ARCH, "qwen2_moe", "base")
    m = jm.load_model(src, jnp.float32)
    load = jm.expert_load(m, [QWEN_IDS])
    with pytest.warns(UserWarning, match="norm_topk_prob is false"):
        jm.prune_experts(src, str(tmp_path / "p"), 3, load=load)
    b = jm.load_model(str(tmp_path / "p"), jnp.float32)(jnp.asarray(QWEN_IDS))
    assert _rel(b, m(jnp.asarray(QWEN_IDS))) > 1e-4  # the warning is about a real change
