"""Inputs of merge configs as mergekit users write them: Hub ids (`org/name@rev`, offline cache), `model+lora`
(PEFT adapters applied on read), and whole-config validation before any weight is read or downloaded.

References: LoRA (Hu et al., ICLR 2022) with W' = W + s * B @ A, s = alpha / r (rsLoRA: alpha / sqrt(r));
PEFT `merge_and_unload` and mergekit 0.1.5 `model+lora` run live as oracles; the Hugging Face cache layout
`models--org--name/{refs/<branch>, snapshots/<commit>/...}`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge import io as jio
from jmerge.cli import main
from jmerge.io import CheckpointError, CheckpointReader, CheckpointWriter, open_checkpoint, open_model

HASH_A = "a" * 40
HASH_B = "b" * 40
HIDDEN, INTER, VOCAB, KV, LAYERS = 32, 64, 64, 16, 2


# ------------------------------------------------------------------------------------------------
# builders: tiny Llama-shaped checkpoints and PEFT adapters written with NumPy (no torch)


def _llama_shapes(hidden=HIDDEN, inter=INTER, layers=LAYERS, vocab=VOCAB, kv=KV) -> dict:
    t = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                  p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                  p + "post_attention_layernorm.weight": (hidden,)})
    t.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return t


def _write_model(d, arrays: dict, config: dict, extra_files: dict | None = None) -> str:
    d = str(d)
    with CheckpointWriter(d, [(k, v.shape, v.dtype) for k, v in arrays.items()], fsync=False) as w:
        for k, v in arrays.items():
            w.write(k, v)
        w.write_text("config.json", json.dumps(config))
        for name, text in (extra_files or {}).items():
            w.write_text(name, text)
    return d


def _llama_config(hidden=HIDDEN, inter=INTER, layers=LAYERS, vocab=VOCAB, dtype="float32") -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": dtype}


def _np_llama(d, seed=0, dtype=np.float32, drop=(), shapes=None, layers=LAYERS, **kw) -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    shapes = shapes or _llama_shapes(layers=layers, **kw)
    arrays = {k: (0.1 * rng.standard_normal(s)).astype(np.float32).astype(dtype) for k, s in shapes.items()
              if k not in drop}
    cfg = _llama_config(layers=layers, dtype=np.dtype(dtype).name, **kw)
    return _write_model(d, arrays, cfg, {"tokenizer.json": "{}"}), arrays


def _write_adapter(d, tensors: dict, **config) -> str:
    from safetensors.numpy import save_file
    os.makedirs(d, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False,
           "target_modules": sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}),
           "base_model_name_or_path": "org/tiny", "rank_pattern": {}, "alpha_pattern": {}}
    cfg.update(config)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({("base_model.model." + k): np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(d, "adapter_model.safetensors"))
    return str(d)


def _lora_pair(rng, out_dim, in_dim, r):
    return (0.1 * rng.standard_normal((r, in_dim))).astype(np.float32), \
           (0.1 * rng.standard_normal((out_dim, r))).astype(np.float32)


def _reads_counter(monkeypatch) -> list:
    calls = []
    orig = CheckpointReader.get

    def counting(self, name, out=None):
        calls.append((self.path, name))
        return orig(self, name, out=out)

    monkeypatch.setattr(CheckpointReader, "get", counting)
    return calls


def _cfg(tmp_path, text, name="c.yml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _read_all(path) -> dict:
    with open_checkpoint(str(path)) as r:
        return {k: r.get(k) for k in r.keys()}


# ------------------------------------------------------------------------------------------------
# LoRA against a NumPy reference of W + s * B @ A (runs without torch)


def test_lora_numpy_reference_linear_embedding_patterns_bias_and_modules_to_save(tmp_path):
    base, w = _np_llama(tmp_path / "base", seed=1)
    rng = np.random.default_rng(7)
    t, expect_s = {}, {}
    for i in range(LAYERS):
        for mod, (o, n) in {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
                            "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}.items():
            name = f"model.layers.{i}.{mod}"
            r = 2 if mod == "mlp.down_proj" else 4           # rank_pattern {"down_proj": 2}
            alpha = 3 if mod == "self_attn.o_proj" else 8    # alpha_pattern {"o_proj": 3}
            a, b = _lora_pair(rng, o, n, r)
            t[f"{name}.lora_A.weight"], t[f"{name}.lora_B.weight"] = a, b
            expect_s[f"{name}.weight"] = (alpha / r, b, a, False)
    ea, eb = (0.1 * rng.standard_normal((4, VOCAB))).astype(np.float32), \
             (0.1 * rng.standard_normal((HIDDEN, 4))).astype(np.float32)
    t["model.embed_tokens.lora_embedding_A"], t["model.embed_tokens.lora_embedding_B"] = ea, eb
    expect_s["model.embed_tokens.weight"] = (2.0, eb, ea, True)
    head = (0.1 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)
    t["lm_head.weight"] = head  # modules_to_save: replaces the model's tensor
    ad = _write_adapter(tmp_path / "lora", t, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3},
                        modules_to_save=["lm_head"])
    with open_model(f"{base}+{ad}") as r:
        assert sorted(r.targets) == sorted(list(expect_s) + ["lm_head.weight"])
        assert r.keys() == list(w) and r.shape("lm_head.weight") == (VOCAB, HIDDEN)
        for k in w:
            got = r.get(k)
            if k in expect_s:
                s, b, a, emb = expect_s[k]
                d = b.astype(np.float64) @ a.astype(np.float64)
                ref = w[k].astype(np.float64) + s * (d.T if emb else d)
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=k)
                assert np.abs(got - w[k]).max() > 1e-3, k  # the adapter really changes it
            elif k == "lm_head.weight":
                np.testing.assert_array_equal(got, head)
            else:
                np.testing.assert_array_equal(got, w[k])
        # reading into a caller's buffer (how the pipeline reads) gives the same values
        k = "model.layers.1.self_attn.q_proj.weight"
        buf = np.empty(r.nbytes(k), np.uint8)
        np.testing.assert_array_equal(r.get(k, out=buf), r.get(k))


def test_lora_numpy_reference_rslora_fan_in_fan_out_bias_and_bf16(tmp_path):
    rng = np.random.default_rng(3)
    # GPT-2-like Conv1D weights, stored (in, out): c_attn (32, 96) non-square, c_proj (32, 32) square
    w = {"transformer.h.0.attn.c_attn.weight": rng.standard_normal((32, 96)) * 0.1,
         "transformer.h.0.attn.c_attn.bias": rng.standard_normal(96) * 0.1,
         "transformer.h.0.attn.c_proj.weight": rng.standard_normal((32, 32)) * 0.1}
    w = {k: v.astype(np.float32).astype(ml_dtypes.bfloat16) for k, v in w.items()}
    base = _write_model(tmp_path / "gpt2", w, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                               "n_layer": 1, "n_embd": 32})
    a1, b1 = _lora_pair(rng, 96, 32, 8)
    a2, b2 = _lora_pair(rng, 32, 32, 8)
    bias = (0.1 * rng.standard_normal(96)).astype(np.float32)
    ad = _write_adapter(tmp_path / "lora", {
        "transformer.h.0.attn.c_attn.lora_A.weight": a1, "transformer.h.0.attn.c_attn.lora_B.weight": b1,
        "transformer.h.0.attn.c_attn.lora_B.bias": bias,
        "transformer.h.0.attn.c_proj.lora_A.weight": a2, "transformer.h.0.attn.c_proj.lora_B.weight": b2,
    }, r=8, lora_alpha=16, use_rslora=True, fan_in_fan_out=True, lora_bias=True)
    s = 16 / math.sqrt(8)
    with open_model(f"{base}+{ad}") as r:
        for k, delta in (("transformer.h.0.attn.c_attn.weight", (b1.astype(np.float64) @ a1).T),
                         ("transformer.h.0.attn.c_proj.weight", (b2.astype(np.float64) @ a2).T),
                         ("transformer.h.0.attn.c_attn.bias", bias.astype(np.float64))):
            got = r.get(k)
            assert got.dtype == ml_dtypes.bfloat16
            ref = w[k].astype(np.float64) + s * delta  # one rounding to bf16 of the exact sum
            ulp = np.abs(ref) * 2.0 ** -8 + 1e-30
            assert np.all(np.abs(got.astype(np.float64) - ref) <= ulp), k
            # and at most one bf16 step away from the correctly rounded sum
            assert np.mean(got == ref.astype(np.float32).astype(ml_dtypes.bfloat16)) > 0.98, k
    # fan_in_fan_out: false in the config: PEFT still reads a Conv1D layer (in, out) (it warns and sets it),
    # so the square c_proj's update is transposed all the same
    ad2 = _write_adapter(tmp_path / "lora2", {"transformer.h.0.attn.c_proj.lora_A.weight": a2,
                                              "transformer.h.0.attn.c_proj.lora_B.weight": b2},
                         r=8, lora_alpha=8, fan_in_fan_out=False)
    with open_model(f"{base}+{ad2}") as r:
        np.testing.assert_allclose(r.delta("transformer.h.0.attn.c_proj.weight"), (b2 @ a2).T, rtol=1e-6, atol=1e-7)


def test_adapter_for_another_base_is_one_clear_error_and_nothing_written(tmp_path, capsys):
    base, _ = _np_llama(tmp_path / "base", seed=1)
    other, _ = _np_llama(tmp_path / "other", seed=2, hidden=48)
    rng = np.random.default_rng(0)
    t = {}
    for i in range(LAYERS):
        a, b = _lora_pair(rng, HIDDEN, HIDDEN, 4)
        t[f"model.layers.{i}.self_attn.q_proj.lora_A.weight"], t[f"model.layers.{i}.self_attn.q_proj.lora_B.weight"] = a, b
    a, b = _lora_pair(rng, HIDDEN, HIDDEN, 4)
    t["model.layers.0.self_attn.qkv_proj.lora_A.weight"], t["model.layers.0.self_attn.qkv_proj.lora_B.weight"] = a, b
    ad = _write_adapter(tmp_path / "lora", t, base_model_name_or_path="org/base-32")
    with pytest.raises(CheckpointError) as e:
        open_model(f"{other}+{ad}")
    msg = str(e.value)
    assert "\n" not in msg and "does not fit model" in msg and "org/base-32" in msg
    assert "other shapes" in msg and "model.layers.0.self_attn.q_proj.weight: model (48, 48)" in msg
    # the adapter's file and tensors are named
    assert os.path.join(ad, "adapter_model.safetensors") in msg
    assert "(from base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight @ " in msg
    assert "missing from the model (model.layers.0.self_attn.qkv_proj.weight)" in msg
    # through the CLI: exit 1, one line, nothing written, no tensor read
    p = _cfg(tmp_path, f"merge_method: linear\nmodels:\n  - model: {other}+{ad}\n    parameters: {{weight: 1.0}}\n"
             f"  - model: {other}\n    parameters: {{weight: 1.0}}\n")
    before = sorted(os.listdir(tmp_path))
    assert main(["merge", p, str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit model" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before


def test_unsupported_adapters_are_refused(tmp_path):
    base, _ = _np_llama(tmp_path / "base")
    rng = np.random.default_rng(0)
    a, b = _lora_pair(rng, HIDDEN, HIDDEN, 4)
    lt = {"model.layers.0.self_attn.q_proj.lora_A.weight": a, "model.layers.0.self_attn.q_proj.lora_B.weight": b}
    dora = _write_adapter(tmp_path / "dora", lt, use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA adapters are not supported"):
        open_model(f"{base}+{dora}")
    binonly = tmp_path / "bin"
    binonly.mkdir()
    shutil.copy(os.path.join(dora, "adapter_config.json"), binonly)
    (binonly / "adapter_model.bin").write_bytes(b"pickle")
    with open(binonly / "adapter_config.json", "r+") as f:
        c = json.load(f)
        c["use_dora"] = False
        f.seek(0), f.truncate(), json.dump(c, f)
    with pytest.raises(CheckpointError, match="adapter_model.bin.*safetensors only"):
        open_model(f"{base}+{binonly}")
    with pytest.raises(CheckpointError, match=r"not a PEFT adapter directory"):
        open_model(f"{base}+{tmp_path}")
    with pytest.raises(CheckpointError, match="one '\\+'"):
        open_model(f"{base}+{dora}+{dora}")
    wrong_r = _write_adapter(tmp_path / "wrong_r", lt, r=8)
    with pytest.raises(CheckpointError, match="r=8 but its lora A has rank 4"):
        open_model(f"{base}+{wrong_r}")


# ------------------------------------------------------------------------------------------------
# LoRA against PEFT's merge_and_unload() and mergekit live (torch)


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory):
    """(base dir, fine-tuned dir, {adapter name: (dir, peft-merged state dict)}), float32, built with torch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "ft")
    adapters = {}
    kinds = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj", "embed_tokens"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
        "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                       modules_to_save=["lm_head"]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kw in kinds.items():
            torch.manual_seed(len(name))
            base = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
            pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
            if name == "rslora":
                with torch.no_grad():
                    pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
            pm.save_pretrained(root / f"lora_{name}")
            fresh = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
            merged = PeftModel.from_pretrained(fresh, root / f"lora_{name}").merge_and_unload()
            adapters[name] = (str(root / f"lora_{name}"),
                              {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()})
    return str(root / "base"), str(root / "ft"), adapters


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["plain", "rslora"])
def test_lora_matches_peft_merge_and_unload(peft_models, kind):
    base, _, adapters = peft_models
    ad, ref = adapters[kind]
    base_w = _read_all(base)
    changed = 0
    with open_model(f"{base}+{ad}") as r:
        assert set(r.keys()) == set(ref)
        for k in r.keys():
            got = r.get(k)
            np.testing.assert_allclose(got, ref[k], rtol=0, atol=1e-6, err_msg=k)
            changed += bool(np.abs(ref[k] - base_w[k]).max() > 1e-4)
    assert changed >= (15 if kind == "plain" else 7)


@pytest.mark.peers
def test_lora_merge_through_config_matches_peft_and_mergekit(peft_models, tmp_path, monkeypatch):
    base, ft, adapters = peft_models
    ad, ref = adapters["plain"]
    # relative `model+lora` parts are found next to the config, as plain model paths are
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    os.symlink(base, cfg_dir / "base")
    os.symlink(ad, cfg_dir / "lora")
    text = ("merge_method: linear\ndtype: float32\nmodels:\n  - model: base+lora\n    parameters: {weight: 1.0}\n"
            f"  - model: {ft}\n    parameters: {{weight: 3.0}}\n")
    p = _cfg(cfg_dir, text)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", p, str(tmp_path / "jm"), "--quiet"]) == 0
    got, ftw = _read_all(tmp_path / "jm"), _read_all(ft)
    for k in ref:
        np.testing.assert_allclose(got[k], (ref[k] + 3.0 * ftw[k]) / 4.0, rtol=0, atol=1e-6, err_msg=k)
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    mk_cfg = yaml.safe_load(text.replace("base+lora", f"{base}+{ad}"))
    run_merge(MergeConfiguration.model_validate(mk_cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, lora_merge_cache=str(tmp_path / "mkcache"),
                           write_model_card=False, out_shard_size=2**40))
    mk = _read_all(tmp_path / "mk")
    assert set(mk) == set(got)
    for k in mk:
        np.testing.assert_allclose(got[k], mk[k], rtol=0, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------------
# Hugging Face Hub ids, resolved offline from a pre-filled cache


def _hub_put(cache, repo_id: str, commit: str, src_dir: str, refs=()) -> str:
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(folder, "snapshots", commit)
    shutil.copytree(src_dir, snap)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with org/tiny (main -> A, v2 -> B), org/tiny-lora (main), org/pickled (.bin only); offline."""
    pytest.importorskip("huggingface_hub")
    cache = str(tmp_path / "hub")
    src_a, wa = _np_llama(tmp_path / "src_a", seed=10)
    src_b, wb = _np_llama(tmp_path / "src_b", seed=11)
    snap_a = _hub_put(cache, "org/tiny", HASH_A, src_a, refs=("main",))
    snap_b = _hub_put(cache, "org/tiny", HASH_B, src_b, refs=("v2",))
    rng = np.random.default_rng(5)
    a, b = _lora_pair(rng, HIDDEN, HIDDEN, 4)
    lora = _write_adapter(tmp_path / "src_lora", {"model.layers.1.self_attn.o_proj.lora_A.weight": a,
                                                  "model.layers.1.self_attn.o_proj.lora_B.weight": b})
    _hub_put(cache, "org/tiny-lora", "c" * 40, lora, refs=("main",))
    pk = tmp_path / "src_pk"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(_llama_config()))
    (pk / "pytorch_model.bin").write_bytes(b"pickle")
    _hub_put(cache, "org/pickled", "d" * 40, str(pk), refs=("main",))
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "a": (snap_a, wa), "b": (snap_b, wb), "lora": (a, b)}


def test_hub_ids_and_revisions_resolve_from_the_cache(hub, tmp_path, monkeypatch):
    snap_a, wa = hub["a"]
    snap_b, wb = hub["b"]
    k = "model.layers.0.mlp.up_proj.weight"
    with open_model("org/tiny") as r:
        assert os.path.realpath(r.dir) == os.path.realpath(snap_a)
        np.testing.assert_array_equal(r.get(k), wa[k])
    for spec in ("org/tiny@v2", f"org/tiny@{HASH_B}"):
        with open_model(spec) as r:
            assert os.path.realpath(r.dir) == os.path.realpath(snap_b), spec
            np.testing.assert_array_equal(r.get(k), wb[k])
    # HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", os.path.dirname(hub["cache"]))
    assert jio.hub_cache_dir() == hub["cache"]
    with open_model("org/tiny@v2") as r:
        np.testing.assert_array_equal(r.get(k), wb[k])
    # a local path wins over a Hub id of the same name
    local, wl = _np_llama(tmp_path / "work" / "org" / "tiny", seed=12)
    monkeypatch.chdir(tmp_path / "work")
    with open_model("org/tiny") as r:
        np.testing.assert_array_equal(r.get(k), wl[k])
    # a revision on a local path is a mistake, not silently ignored
    with pytest.raises(CheckpointError, match="applies to Hugging Face Hub ids only"):
        open_model("org/tiny@v2")


def test_hub_model_plus_hub_lora(hub):
    snap_a, wa = hub["a"]
    a, b = hub["lora"]
    k = "model.layers.1.self_attn.o_proj.weight"
    with open_model("org/tiny+org/tiny-lora") as r:
        ref = wa[k].astype(np.float64) + 2.0 * (b.astype(np.float64) @ a)
        np.testing.assert_allclose(r.get(k), ref, rtol=0, atol=1e-6)
        assert os.path.realpath(r.dir) == os.path.realpath(snap_a)


def test_hub_merge_through_the_cli(hub, tmp_path, capsys):
    _, wa = hub["a"]
    _, wb = hub["b"]
    p = _cfg(tmp_path, "merge_method: task_arithmetic\nbase_model: org/tiny\nmodels:\n"
             "  - model: org/tiny@v2\n    parameters: {weight: 0.5}\n")
    assert main(["merge", p, str(tmp_path / "out"), "--quiet"]) == 0
    got = _read_all(tmp_path / "out")
    for k in wa:
        np.testing.assert_allclose(got[k], wa[k] + 0.5 * (wb[k] - wa[k]), rtol=0, atol=1e-6, err_msg=k)
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")  # aux files come from the base's snapshot
    assert main(["merge", p, str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "output tensors:" in capsys.readouterr().out


def test_hub_id_without_huggingface_hub_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when it is not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        open_model("org/name@main")
    msg = str(e.value)
    assert "\n" not in msg and "'org/name@main'" in msg and 'pip install "jmerge[hub]"' in msg


def test_hub_id_not_cached_offline_one_line_nothing_written(hub, tmp_path, capsys):
    cache_before = sorted(os.walk(hub["cache"]))
    with pytest.raises(CheckpointError) as e:
        open_model("org/missing@v1")
    msg = str(e.value)
    assert "\n" not in msg and "'org/missing@v1'" in msg and hub["cache"] in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download org/missing --revision v1" in msg
    p = _cfg(tmp_path, "merge_method: task_arithmetic\nbase_model: org/tiny\nmodels:\n  - model: org/missing\n")
    before = sorted(os.listdir(tmp_path))
    assert main(["merge", p, str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'org/missing'" in err and hub["cache"] in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before and sorted(os.walk(hub["cache"])) == cache_before


def test_hub_unreachable_and_pickle_only_and_missing_package(hub, monkeypatch):
    with pytest.raises(CheckpointError, match=r"only PyTorch pickle weights.*safetensors only"):
        open_model("org/pickled")
    # downloads on, but the Hub endpoint refuses connections: one line, no traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        open_model("org/elsewhere")
    msg = str(e.value)
    assert "\n" not in msg and "'org/elsewhere'" in msg and "could not be reached" in msg and hub["cache"] in msg
    # cached ids still work while the Hub is unreachable
    with open_model("org/tiny") as r:
        assert len(r.keys()) == len(hub["a"][1])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r'pip install "jmerge\[hub\]"'):
        open_model("org/tiny")


class _FakeHub:
    """Stubs of the Hub API (no network): one remote repo per id, downloads recorded and copied into the cache."""

    def __init__(self, monkeypatch, cache, tmp_path):
        import types

        import huggingface_hub as hf
        self.types, self.cache, self.tmp, self.repos, self.downloads = types, cache, tmp_path, {}, []
        real = hf.snapshot_download

        def snapshot_download(repo_id, **kw):
            if kw.get("local_files_only"):
                return real(repo_id, **kw)
            self.downloads.append((repo_id, tuple(kw.get("allow_patterns") or ())))
            return _hub_put(self.cache, repo_id, "e" * 40, self.repos[repo_id]["dir"], refs=("main",))

        def meta(api, repo_id, revision=None):
            w = self.repos[repo_id]["weights"]
            if not w:
                raise hf.errors.NotASafetensorsRepoError(repo_id)
            return types.SimpleNamespace(
                weight_map={k: "model.safetensors" for k in w},
                files_metadata={"model.safetensors": types.SimpleNamespace(tensors={
                    k: types.SimpleNamespace(dtype="F32", shape=list(v.shape)) for k, v in w.items()})})

        def info(api, repo_id, revision=None, **kw):
            return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f)
                                                   for f in sorted(os.listdir(self.repos[repo_id]["dir"]))])

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
        monkeypatch.setattr(hf.HfApi, "get_safetensors_metadata", meta)
        monkeypatch.setattr(hf.HfApi, "model_info", info)
        monkeypatch.setattr(hf, "hf_hub_download",
                            lambda repo_id, filename, **kw: os.path.join(self.repos[repo_id]["dir"], filename))

    def add(self, repo_id, seed, **kw):
        d, w = _np_llama(self.tmp / ("remote_" + repo_id.replace("/", "_")), seed=seed, **kw)
        self.repos[repo_id] = {"dir": d, "weights": w}
        return w

    def add_pickled(self, repo_id):
        d = self.tmp / ("remote_" + repo_id.replace("/", "_"))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(_llama_config()))
        (d / "pytorch_model.bin").write_bytes(b"pickle")
        self.repos[repo_id] = {"dir": str(d), "weights": {}}


def test_hub_validation_reads_remote_headers_and_downloads_nothing_on_error(hub, tmp_path, monkeypatch):
    """Online and not cached: the config is validated from remote safetensors headers; a mismatch stops the
    merge before any weight is downloaded (the Hub API is stubbed; no network)."""
    fake = _FakeHub(monkeypatch, hub["cache"], tmp_path)
    fake.add("org/remote", seed=20, inter=80)  # another intermediate size than org/tiny
    reads = _reads_counter(monkeypatch)
    p = _cfg(tmp_path, "merge_method: task_arithmetic\nbase_model: org/tiny\nmodels:\n  - model: org/remote\n")
    with pytest.raises(jmerge.MergeInputError) as e:
        jmerge.pipeline.run_merge(jmerge.load_config(p), str(tmp_path / "out"), quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "shaped unlike the base" in msg and "(80, 32) vs (64, 32)" in msg
    assert fake.downloads == [] and reads == [] and not (tmp_path / "out").exists()


def test_hub_download_after_validation_and_pickle_refusal(hub, tmp_path, monkeypatch):
    fake = _FakeHub(monkeypatch, hub["cache"], tmp_path)
    wr = fake.add("org/remote", seed=21)
    _, wa = hub["a"]
    p = _cfg(tmp_path, "merge_method: task_arithmetic\nbase_model: org/tiny\nmodels:\n  - model: org/remote\n"
             "parameters: {lambda: 0.5}\n")
    jmerge.pipeline.run_merge(jmerge.load_config(p), str(tmp_path / "out"), quiet=True)
    assert len(fake.downloads) == 1 and fake.downloads[0][0] == "org/remote"
    assert "*.safetensors" in fake.downloads[0][1] and not any(".bin" in x for x in fake.downloads[0][1])
    got = _read_all(tmp_path / "out")
    for k in wa:
        np.testing.assert_allclose(got[k], wa[k] + 0.5 * (wr[k] - wa[k]), rtol=0, atol=1e-6, err_msg=k)
    # now cached: the same id opens offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open_model("org/remote") as r:
        np.testing.assert_array_equal(r.get("model.norm.weight"), wr["model.norm.weight"])
    # a Hub repo with pickle weights only is refused before anything is downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake.add_pickled("org/pickled-remote")
    for headers_only in (True, False):
        with pytest.raises(CheckpointError, match=r"only PyTorch pickle weights.*safetensors only"):
            open_model("org/pickled-remote", headers_only=headers_only)
    assert len(fake.downloads) == 1


# ------------------------------------------------------------------------------------------------
# validation of the whole config before any tensor is read


def test_validation_reports_every_problem_before_reading_any_tensor(tmp_path, monkeypatch, capsys):
    base, _ = _np_llama(tmp_path / "base", seed=0)
    bad_shape, _ = _np_llama(tmp_path / "wide", seed=1, inter=80)
    missing, _ = _np_llama(tmp_path / "short", seed=2, drop=("model.layers.1.mlp.up_proj.weight", "model.norm.weight"))
    deep, _ = _np_llama(tmp_path / "deep", seed=3, layers=3)
    reads = _reads_counter(monkeypatch)
    p = _cfg(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n"
             + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                       for m in (bad_shape, missing, deep)))
    plan = jmerge.load_config(p)
    with pytest.raises(jmerge.MergeInputError) as e:
        jmerge.pipeline.run_merge(plan, str(tmp_path / "out"), quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: 3 problems with the inputs")
    assert f"model '{bad_shape}' has 6 tensor(s) shaped unlike the base" in msg and "(80, 32) vs (64, 32)" in msg
    assert f"2 tensor(s) of the base are missing from model '{missing}'" in msg
    assert "'model.layers.1.mlp.up_proj.weight'" in msg
    assert f"model '{deep}' has 3 layers (config.json) but the base has 2" in msg
    assert reads == [] and not (tmp_path / "out").exists()
    # the dry run validates the same way: exit 1, one line
    assert main(["merge", p, str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shaped unlike the base" in err and "missing from model" in err
    assert reads == []


def test_validation_checks_hyperparameters_before_reading(tmp_path, monkeypatch):
    base, _ = _np_llama(tmp_path / "base", seed=0)
    ft, _ = _np_llama(tmp_path / "ft", seed=1)
    reads = _reads_counter(monkeypatch)
    p = _cfg(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
             "    parameters: {weight: 1.0, density: [0.5, 1.5]}\n")
    try:
        plan = jmerge.load_config(p)
    except jmerge.MergeInputError:
        pytest.skip("the config stage already rejects this density")
    with pytest.raises(jmerge.MergeInputError, match="density"):
        jmerge.pipeline.run_merge(plan, str(tmp_path / "out"), quiet=True)
    assert reads == [] and not (tmp_path / "out").exists()


def test_local_paths_with_plus_or_at_and_missing_paths(tmp_path):
    odd, w = _np_llama(tmp_path / "my+model@v1", seed=4)
    with open_model(odd) as r:  # an existing path is never split
        np.testing.assert_array_equal(r.get("model.norm.weight"), w["model.norm.weight"])
    with pytest.raises(CheckpointError, match="not found"):
        open_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not found"):
        open_model(str(tmp_path / "nope") + "+" + str(tmp_path / "nolora"))
