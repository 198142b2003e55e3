"""Architecture awareness, outputs and mergekit-yaml CLI compatibility of `jmerge merge`.

Tiny checkpoints of each architecture are built here with transformers (random weights, float32 unless
said otherwise). References are independent of jmerge: transformers' own loading (its v5 conversion of
MoE experts, its per-layer attention types), a frankenmodel assembled layer by layer in torch, and
mergekit 0.1.5 run in-process on the same inputs.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import yaml

from jmerge.cli import main, parse_size
from jmerge.io import open_checkpoint
from jmerge.mergekit.arch import ARCHITECTURES, ModelView, find_architecture, model_tensor_name, output_config

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DIMS = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _config(arch: str, **over):
    import transformers as T
    if arch == "llama":
        return T.LlamaConfig(**DIMS, **over)
    if arch == "mistral":
        return T.MistralConfig(**DIMS, **over)
    if arch == "qwen2":  # tied, first two layers full attention, last two sliding
        return T.Qwen2Config(**DIMS, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                             max_window_layers=2, **over)
    if arch == "gemma2":  # tied, alternating sliding / full
        return T.Gemma2Config(**DIMS, head_dim=8, sliding_window=4, **over)
    if arch == "gemma3":  # Gemma-3 text model, explicit mixed layer types
        return T.Gemma3TextConfig(**DIMS, head_dim=8, sliding_window=4, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"], **over)
    if arch == "gpt2":  # tied wte, Conv1D weights, transformer.h.N, n_layer
        return T.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, **over)
    if arch == "mixtral":
        return T.MixtralConfig(**DIMS, num_local_experts=3, num_experts_per_tok=2, **over)
    if arch == "qwen2_moe":  # decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense
        return T.Qwen2MoeConfig(**DIMS, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=3,
                                num_experts_per_tok=2, decoder_sparse_step=2, **over)
    raise ValueError(arch)


def _model_cls(arch: str):
    import transformers as T
    return {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM,
            "gemma2": T.Gemma2ForCausalLM, "gemma3": T.Gemma3ForCausalLM, "gpt2": T.GPT2LMHeadModel,
            "mixtral": T.MixtralForCausalLM, "qwen2_moe": T.Qwen2MoeForCausalLM}[arch]


def _build(arch: str, path: str, seed: int, dtype=None):
    """A tiny model with non-degenerate weights (N(0, 0.2) everywhere, norms around 1), saved as transformers does."""
    torch = _torch()
    torch.manual_seed(seed)
    m = _model_cls(arch)(_config(arch)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name and arch not in ("gemma2", "gemma3"):  # Gemma norms scale by 1 + w
                p.add_(1.0)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(path)
    return m


def _load(path):
    import transformers as T
    m, info = T.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    return m.eval(), info


def _tensors(path):
    with open_checkpoint(path) as r:
        return {k: r.get(k).astype(np.float32) for k in r.keys()}


def _write(tmp, name, cfg) -> str:
    p = os.path.join(str(tmp), name)
    with open(p, "w") as f:
        f.write(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny checkpoints: three Mixtrals, two Qwen2-MoE, a Llama and a Mistral of the same shapes."""
    _torch()
    d = tmp_path_factory.mktemp("arch")
    out = {}
    for arch, n in (("mixtral", 3), ("qwen2_moe", 2), ("llama", 1), ("mistral", 1)):
        out[arch] = [str(d / f"{arch}{i}") for i in range(n)]
        for i, p in enumerate(out[arch]):
            _build(arch, p, seed=10 * len(out) + i)
    return out


# -- the table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ARCHITECTURES, ids=lambda s: s.name)
def test_table_matches_transformers_configs(spec):
    """Every list with one entry per layer in the transformers config is a per-layer field of the table."""
    _torch()
    import transformers as T
    cls = T.AutoConfig.for_model(spec.model_types[0]).__class__
    cfg = cls(**{spec.num_layers_key: 5}).to_dict()
    cfg["architectures"] = [spec.architectures[0]]
    assert find_architecture(cfg) is spec and cfg[spec.num_layers_key] == 5
    per_layer = {k for k, v in cfg.items() if isinstance(v, list) and len(v) == 5 and k != "architectures"}
    assert per_layer <= set(spec.per_layer_fields), per_layer
    for k in spec.layer_index_fields:
        assert isinstance(cfg[k], list)
    if spec.experts is not None:
        assert any(isinstance(cfg.get(k), int) for k in spec.experts.count_keys)


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=lambda s: s.name)
def test_table_matches_mergekit_definitions(spec):
    """Layer prefix, layer-count field and tied head agree with mergekit's own architecture definitions."""
    pytest.importorskip("mergekit")
    from mergekit.architecture.json_definitions import NAME_TO_ARCH
    if spec.architectures[0] not in NAME_TO_ARCH:
        pytest.skip(f"mergekit has no JSON definition of {spec.architectures[0]} (it infers it from the model)")
    mk = NAME_TO_ARCH[spec.architectures[0]][0].modules["default"].architecture
    assert mk.num_layers_config_key() == spec.num_layers_key
    d = mk.definition
    assert all(w.name.startswith(spec.layer_prefix + ".${layer_index}.") for w in d.layer_templates.weights)
    assert [w.name for w in d.pre_weights] == list(spec.embeddings)
    head = [w for w in d.post_weights if w.name == "lm_head.weight"]
    assert (spec.head is not None) == bool(head)
    if head and head[0].tied_names:
        assert set(spec.tied_to) <= set(head[0].tied_names)
    names = {w.name for w in d.layer_templates.weights}
    if spec.experts is not None:  # mergekit merges the fused transformers-5 tensors
        assert {f"{spec.layer_prefix}.${{layer_index}}.mlp.experts.gate_up_proj",
                f"{spec.layer_prefix}.${{layer_index}}.mlp.experts.down_proj"} <= names


# -- MoE naming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_view_is_the_transformers_model_layout(models, arch):
    """The view's names and values are exactly the state dict transformers 5 builds from the checkpoint."""
    path = models[arch][0]
    m, info = _load(path)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    with open_checkpoint(path) as r:
        v = ModelView(r, find_architecture(r.config))
        assert "model.layers.1.mlp.experts.gate_up_proj" in v.keys()
        assert not any("block_sparse_moe" in k or ".experts.0." in k for k in v.keys())
        assert set(v.keys()) == set(sd)
        assert {model_tensor_name(k, v.spec) for k in r.keys()} == set(sd)  # per on-disk name, as filters see it
        for k in v.keys():
            got = v.get(k)
            assert got.shape == sd[k].shape and v.nbytes(k) == got.nbytes, k
            np.testing.assert_array_equal(got, sd[k], err_msg=k)
        buf = np.empty(v.nbytes("model.layers.1.mlp.experts.down_proj"), np.uint8)  # read into a caller's buffer
        np.testing.assert_array_equal(v.get("model.layers.1.mlp.experts.down_proj", out=buf),
                                      sd["model.layers.1.mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def mixtral_runs(models, tmp_path_factory):
    """mergekit 0.1.5 and jmerge on the same Mixtral configs (float32): linear and TIES with `filter: mlp`."""
    pytest.importorskip("mergekit")
    from mergekit.common import parse_kmb
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    d = tmp_path_factory.mktemp("mixtral_runs")
    base, a, b = models["mixtral"]
    cfgs = {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.3}]}},
            {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}}]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.9}]}},
            {"model": b, "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.6}, {"value": 0.9}]}}]},
    }
    runs = {}
    for name, cfg in cfgs.items():
        mk, jm = str(d / f"mk_{name}"), str(d / f"jm_{name}")
        run_merge(MergeConfiguration.model_validate(cfg), mk,
                  options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=0,
                                       out_shard_size=parse_kmb("20K")))
        assert main(["merge", _write(d, f"{name}.yml", cfg), jm, "--quiet", "--out-shard-size", "20K"]) == 0
        runs[name] = (mk, jm)
    return runs


@pytest.mark.parametrize("name", ["linear", "ties"])
def test_mixtral_filter_mlp_matches_mergekit(mixtral_runs, name):
    """`filter: mlp` reaches the experts and the router; names, shapes and values equal mergekit's (<= 1e-6)."""
    mk, jm = mixtral_runs[name]
    want, got = _tensors(mk), _tensors(jm)
    assert set(got) == set(want)
    assert "model.layers.0.mlp.experts.gate_up_proj" in got and "model.layers.0.mlp.gate.weight" in got
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
    m, info = _load(jm)  # transformers 5 loads the fused layout as is
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_mixtral_filter_really_selects_experts(models, mixtral_runs):
    """The linear merge's expert tensors follow the `mlp` weights (0.8/0.2), attention the others (0.3/0.7)."""
    _, a, b = models["mixtral"]
    ta, tb = _tensors(mixtral_runs["linear"][1]), {}
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        va, vb = ModelView(ra, find_architecture(ra.config)), ModelView(rb, find_architecture(rb.config))
        for k, w in (("model.layers.1.mlp.experts.gate_up_proj", 0.8), ("model.layers.1.mlp.gate.weight", 0.8),
                     ("model.layers.1.self_attn.q_proj.weight", 0.3)):
            tb[k] = w * va.get(k) + (1 - w) * vb.get(k)
            np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=1e-6, err_msg=k)


# -- depth changes --------------------------------------------------------------------------------

SLICES = [(0, 3), (1, 4)]  # 4 layers -> 6: output layer i comes from source layer SRC[i]
SRC = [0, 1, 2, 1, 2, 3]


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3", "gpt2", "qwen2_moe", "mixtral"])
def test_frankenmerge_changes_depth_and_loads(arch, tmp_path):
    """Passthrough 4 -> 6 layers from a bf16 model with `dtype: float32`: config dtype, depth and per-layer
    fields follow; transformers loads it with no missing key, and its logits equal a frankenmodel assembled
    layer by layer in torch with the expected per-layer settings."""
    torch = _torch()
    src = _build(arch, str(tmp_path / "src"), seed=5, dtype=torch.bfloat16)
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(tmp_path / "src"), "layer_range": list(r)}]} for r in SLICES]}
    out = tmp_path / "out"
    assert main(["merge", _write(tmp_path, "c.yml", cfg), str(out), "--quiet"]) == 0
    cj = json.loads((out / "config.json").read_text())
    key = find_architecture(cj).num_layers_key
    assert cj[key] == 6 and cj["dtype"] == "float32"

    scfg = src.config
    exp = _config(arch).to_dict()
    exp[key] = 6
    if "layer_types" in exp:
        exp["layer_types"] = [scfg.layer_types[j] for j in SRC]
        assert cj["layer_types"] == exp["layer_types"]
    if arch == "qwen2_moe":  # source layers 0 and 2 are dense (step 2): output layers 0, 2, 4
        exp.update(mlp_only_layers=[0, 2, 4], decoder_sparse_step=1)
        assert cj["mlp_only_layers"] == [0, 2, 4] and cj["decoder_sparse_step"] == 1
    m, info = _load(str(out))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    def frankenmodel(layer_types=None):
        c = type(scfg).from_dict({k: v for k, v in exp.items() if k != "transformers_version"})
        if layer_types is not None:
            c.layer_types = layer_types
        c._attn_implementation = "eager"
        ref = _model_cls(arch)(c).eval()
        sd = src.float().state_dict()
        new = {}
        for k in ref.state_dict():  # layer i of the frankenmodel is layer SRC[i] of the source
            m = re.match(r"^(.*?\.(?:layers|h)\.)(\d+)(\..*)$", k)
            new[k] = sd[f"{m.group(1)}{SRC[int(m.group(2))]}{m.group(3)}"] if m else sd[k]
        ref.load_state_dict(new)
        return ref

    ids = torch.arange(12).remainder(64)[None]
    with torch.no_grad():
        got = m(ids).logits.numpy()
        want = frankenmodel()(ids).logits.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        if "layer_types" in exp and len(set(exp["layer_types"])) > 1:  # the check is sensitive to layer types
            wrong = frankenmodel(["full_attention"] * 6)(ids).logits.numpy()
            assert np.abs(wrong - want).max() > 1e-3


def test_output_config_index_fields_unit():
    """Qwen-MoE dense/sparse pattern and per-layer lists per output layer, from mixed sources."""
    a = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_hidden_layers": 4,
         "decoder_sparse_step": 2, "mlp_only_layers": [], "layer_types": ["f0", "f1", "f2", "f3"], "dtype": "bfloat16"}
    b = dict(a, decoder_sparse_step=1, mlp_only_layers=[1], layer_types=["g0", "g1", "g2", "g3"])
    out = output_config(a, dtype="float16", layer_sources=[(a, 3), (b, 1), (b, 2), (a, 0)])
    assert out["num_hidden_layers"] == 4 and out["dtype"] == out["torch_dtype"] == "float16"
    assert out["layer_types"] == ["f3", "g1", "g2", "f0"]
    assert out["mlp_only_layers"] == [1, 3] and out["decoder_sparse_step"] == 1  # a:3 sparse, b:1 listed, a:0 dense
    assert a["num_hidden_layers"] == 4 and a["dtype"] == "bfloat16"  # input untouched
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "n_layer": 2, "model_type": "gpt2"}
    assert output_config(gpt2, layer_sources=[(gpt2, 0)] * 3)["n_layer"] == 3


# -- mixed architectures --------------------------------------------------------------------------

def test_mixed_architectures_need_allow_crimes(models, tmp_path, capsys, monkeypatch):
    llama, mistral = models["llama"][0], models["mistral"][0]
    p = _write(tmp_path, "c.yml", {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": llama, "parameters": {"weight": 0.5}}, {"model": mistral, "parameters": {"weight": 0.5}}]})
    import jmerge.io.safetensors as st
    real_get = st.CheckpointReader.get

    def no_reads(self, name, out=None):
        raise AssertionError(f"tensor {name} read before the architecture check")

    monkeypatch.setattr(st.CheckpointReader, "get", no_reads)
    for extra in ([], ["--dry-run"]):
        assert main(["merge", p, str(tmp_path / "out"), "--quiet", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--allow-crimes" in err
        assert "LlamaForCausalLM" in err and "MistralForCausalLM" in err and llama in err and mistral in err
    assert sorted(os.listdir(tmp_path)) == ["c.yml"]
    monkeypatch.setattr(st.CheckpointReader, "get", real_get)
    assert main(["merge", p, str(tmp_path / "out"), "--quiet", "--allow-crimes"]) == 0
    got, x, y = _tensors(str(tmp_path / "out")), _tensors(llama), _tensors(mistral)
    np.testing.assert_allclose(got["model.norm.weight"], 0.5 * x["model.norm.weight"] + 0.5 * y["model.norm.weight"],
                               rtol=0, atol=1e-6)


# -- outputs --------------------------------------------------------------------------------------

def test_out_shard_size_units(mixtral_runs):
    """`20K` = 20,000 bytes per shard in both tools (mergekit's writer sums numel x itemsize), greedy fill."""
    pytest.importorskip("mergekit")
    from mergekit.common import parse_kmb
    for s in ("5B", "20K", "3M", "1000"):
        assert parse_size(s) == parse_kmb(s)
    assert parse_size("5b") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8
    for d in mixtral_runs["linear"]:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        shards = {}
        with open_checkpoint(d) as r:
            for k in r.keys():
                shards.setdefault(wm[k], []).append(r.nbytes(k))
        assert len(shards) >= 4
        for sizes in shards.values():
            assert sum(sizes) <= 20_000 or len(sizes) == 1  # a tensor larger than the limit gets its own shard
    with open(os.path.join(mixtral_runs["linear"][1], "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open_checkpoint(mixtral_runs["linear"][1]) as r:  # jmerge: no shard could have taken the next tensor
        files = sorted(set(index["weight_map"].values()))
        per = {f: sum(r.nbytes(k) for k in r.keys() if index["weight_map"][k] == f) for f in files}
        firsts = {f: next(r.nbytes(k) for k in r.keys() if index["weight_map"][k] == f) for f in files}
    for f, g in zip(files, files[1:]):
        assert per[f] + firsts[g] > 20_000


def test_outputs_config_card_generation_config(models, tmp_path):
    _torch()
    base, ft = models["mixtral"][:2]
    text = (f"# a comment kept verbatim\nmerge_method: task_arithmetic\nbase_model: {base}\n"
            f"models:\n  - model: {ft}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    p = _write(tmp_path, "c.yml", text)
    out = tmp_path / "out"
    assert main(["merge", p, str(out), "--quiet"]) == 0
    assert (out / "mergekit_config.yml").read_text() == text
    assert text.strip() in (out / "README.md").read_text()
    with open(os.path.join(base, "generation_config.json"), "rb") as f:
        assert (out / "generation_config.json").read_bytes() == f.read()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["merge", p, str(tmp_path / "nocard"), "--quiet", "--no-write-model-card"]) == 0
    files = os.listdir(tmp_path / "nocard")
    assert "README.md" not in files and "mergekit_config.yml" not in files and "config.json" in files


# -- the command line -----------------------------------------------------------------------------

def _mergekit_flags():
    click = pytest.importorskip("click")
    pytest.importorskip("mergekit")
    from mergekit.scripts.run_yaml import main as mk_main
    out = []
    for prm in mk_main.params:
        if isinstance(prm, click.Option):
            for o in prm.opts + prm.secondary_opts:
                out.append((o, prm))
    return out


def _value(opt, prm, tmp):
    if prm.is_flag or prm.count:
        return []
    return [{"--out-shard-size": "2B", "--device": "cpu", "--lora-merge-dtype": "float32",
             "--transformers-cache": str(tmp), "--lora-merge-cache": str(tmp)}.get(opt, "3")]


def test_every_mergekit_flag_is_accepted(monkeypatch, tmp_path):
    import jmerge.cli.merge as cm
    from jmerge.cli.common import apply_mergekit_options
    flags = _mergekit_flags()
    from mergekit.options import MergeOptions
    assert {prm.name for _, prm in flags} == set(MergeOptions.model_fields)  # every option of mergekit-yaml
    seen = []
    monkeypatch.setattr(cm, "run", lambda a: seen.append(a) or 0)
    for opt, prm in flags:
        assert main(["merge", "c.yml", "out", opt, *_value(opt, prm, tmp_path)]) == 0, opt
    assert len(seen) == len(flags)
    a = seen[[o for o, _ in flags].index("--random-seed")]
    assert a.seed == 3
    a = seen[[o for o, _ in flags].index("--cuda")]
    assert apply_mergekit_options(a) is None and a.device == "gpu"
    a = seen[[o for o, _ in flags].index("--out-shard-size")]
    assert a.out_shard_size == 2 * 10**9
    a = seen[[o for o, _ in flags].index("--unsafe-truncate-embeddings")]
    assert "not supported" in apply_mergekit_options(a)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    a = seen[[o for o, _ in flags].index("--transformers-cache")]
    assert apply_mergekit_options(a) is None and os.environ["HF_HUB_CACHE"] == str(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    a = seen[[o for o, _ in flags].index("-v")]
    assert a.verbose == 1


def test_mergekit_flags_in_help(capsys):
    flags = _mergekit_flags()
    assert main(["merge", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for opt, _ in flags:
        assert opt in text, opt
    assert "no-op" in text or "accepted and ignored" in text
    assert "thousand/million/billion" in text


def test_noop_flags_change_nothing_and_jmerge_yaml(models, tmp_path):
    """A mergekit-yaml style command line (no-op flags included) writes the same bytes as plain `jmerge merge`."""
    from jmerge.cli.merge import yaml_main
    a, b = models["mixtral"][1:]
    p = _write(tmp_path, "c.yml", {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": 0.25}}, {"model": b, "parameters": {"weight": 0.75}}]})
    assert main(["merge", p, str(tmp_path / "plain"), "--quiet"]) == 0
    assert yaml_main([p, str(tmp_path / "mk"), "--lazy-unpickle", "--low-cpu-memory", "--clone-tensors",
                      "--trust-remote-code", "--safe-serialization", "--copy-tokenizer", "--random-seed", "0",
                      "--out-shard-size", "5B", "-v", "--write-threads", "2", "-j", "2", "--async-write",
                      "--quiet"]) == 0
    for f in ("model.safetensors", "config.json", "mergekit_config.yml"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "mk" / f).read_bytes(), f
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["jmerge-yaml"] == "jmerge.cli.merge:yaml_main"
