"""LoRA extraction (``jmerge lora extract``) and LoRA merging (``merge_loras`` / ``jmerge lora merge``) on the tiny
Llama checkpoints of ``tests/data/arch/llama`` (bf16): references are the fine-tunes themselves, NumPy SVDs
(Eckart-Young), PEFT's own loading and ``merge_and_unload``, and mergekit-extract-lora's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jmerge.cli import main
from jmerge.core import MergeInputError
from jmerge.core.hparams import PerModel
from jmerge.io import CheckpointError, open_model
from jmerge.lora import extract_lora, merge_loras

D = os.path.join(os.path.dirname(__file__), "data", "arch", "llama")
BASE, FT = os.path.join(D, "base"), [os.path.join(D, f"ft{i}") for i in (1, 2, 3)]
P = "base_model.model."


def f32(x):
    return np.asarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def full_adapters(tmp_path_factory):
    """Full-rank float32 adapters of ft1..ft3."""
    d = tmp_path_factory.mktemp("full")
    return [extract_lora(BASE, ft, d / f"a{i}", rank="full", dtype="float32").out_dir for i, ft in enumerate(FT)]


def _products(adapter_dir):
    """{model tensor: B @ A (float64) * scale} of an adapter, and its full tensors."""
    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    prods, full = {}, {}
    for k, v in t.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len(P):-len(".lora_A.weight")]
            r = cfg["rank_pattern"].get(mod, cfg["r"])
            alpha = cfg["alpha_pattern"].get(mod, cfg["lora_alpha"])
            b = t[k.replace("lora_A", "lora_B")]
            prods[mod + ".weight"] = b.astype(np.float64) @ v.astype(np.float64) * (alpha / r)
        elif "lora_" not in k:
            full[k[len(P):]] = v
    return prods, full, cfg


def test_full_rank_reproduces_finetune(full_adapters):
    base = open_model(BASE)
    for ft, a in zip(FT, full_adapters):
        f = open_model(ft)
        applied = open_model(f"{BASE}+{a}")
        prods, full, cfg = _products(a)
        assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8  # (8, 16): full rank 8
        assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head", "norm", "input_layernorm",
                                               "post_attention_layernorm"}
        assert len(prods) == 28 and len(full) == 11
        for k in f.keys():
            w_ft = f.get(k)
            if k in prods:  # the factors' product is the update, to float32 rounding
                d = f32(w_ft) - f32(base.get(k))
                assert np.abs(prods[k] - d).max() <= 1e-5 * np.abs(d).max(), k
            # applied with jmerge's LoraReader (float32 sum rounded once to bf16): the fine-tune, bit for bit
            np.testing.assert_array_equal(f32(applied.get(k)), f32(w_ft), err_msg=k)
            assert applied.dtype(k) == w_ft.dtype


def test_rank_r_error_is_the_truncation_error(tmp_path):
    r = 3
    res = extract_lora(BASE, FT[0], tmp_path / "a", rank=r, dtype="float32")
    prods, _, cfg = _products(res.out_dir)
    assert cfg["r"] == r and cfg["rank_pattern"] == {}
    base, f = open_model(BASE), open_model(FT[0])
    worse = 0
    for k, p in prods.items():
        d = f32(f.get(k)).astype(np.float64) - f32(base.get(k))
        s = np.linalg.svd(d, compute_uv=False)
        dropped = float(np.sum(s[r:] ** 2))
        err2 = float(np.sum((d - p) ** 2))
        assert err2 == pytest.approx(dropped, rel=1e-4, abs=1e-12), k  # Eckart-Young
        assert res.residual[k] ** 2 == pytest.approx(dropped, rel=1e-4), k
        assert np.linalg.matrix_rank(p, tol=1e-6 * s[0]) == r
        # any other rank-r approximation is worse: truncate a perturbed SVD
        u, s2, vh = np.linalg.svd(d + 1e-2 * np.random.default_rng(0).standard_normal(d.shape) * s[0], full_matrices=False)
        worse += float(np.sum((d - (u[:, :r] * s2[:r]) @ vh[:r]) ** 2)) > err2
    assert worse == len(prods)
    assert 0 < res.relative_error < 1


def test_adapter_loads_in_peft(full_adapters, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 8, 12, 60]])
    for ft, a in ((FT[0], full_adapters[0]),
                  (FT[1], extract_lora(BASE, FT[1], tmp_path / "r4", rank=4, dtype="float32").out_dir)):
        model = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        pm = PeftModel.from_pretrained(model, a)
        ref = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
        with torch.no_grad():
            got, want = pm(ids).logits.numpy(), ref(ids).logits.numpy()
        merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
        applied = open_model(f"{BASE}+{a}")
        base = open_model(BASE)
        for k, v in merged.items():  # PEFT's merge == jmerge's LoraReader update, in float32
            d = applied.delta(k)
            want_w = f32(base.get(k)) + d if d is not None else f32(applied.get(k))
            np.testing.assert_allclose(v, want_w, rtol=0, atol=1e-6, err_msg=k)
        if a == full_adapters[0]:  # full rank: the fine-tune's logits
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        else:  # rank 4: not the fine-tune, but close to it compared with the base
            with torch.no_grad():
                b0 = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)(ids).logits.numpy()
            assert 0 < np.abs(got - want).max() < np.abs(b0 - want).max()


def test_matches_mergekit_extract_lora(tmp_path):
    pytest.importorskip("mergekit")
    pytest.importorskip("torch")
    r = 4
    mk = tmp_path / "mk"
    proc = subprocess.run([sys.executable, "-c", "from mergekit.scripts.extract_lora import main; main()",
                           "--model", FT[0], "--base-model", BASE, "--out-path", str(mk), "--max-rank", str(r)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = extract_lora(BASE, FT[0], tmp_path / "jm", rank=r).out_dir  # stored in the fine-tune's dtype, like mergekit
    t_mk = load_file(os.path.join(mk, "adapter_model.safetensors"))
    t_jm = load_file(os.path.join(ours, "adapter_model.safetensors"))
    assert {k: v.shape for k, v in t_mk.items()} == {k: v.shape for k, v in t_jm.items()}
    assert {k: v.dtype for k, v in t_mk.items()} == {k: v.dtype for k, v in t_jm.items()}
    c_mk = json.load(open(os.path.join(mk, "adapter_config.json")))
    c_jm = json.load(open(os.path.join(ours, "adapter_config.json")))
    for key in ("r", "lora_alpha", "rank_pattern", "task_type", "peft_type", "use_rslora", "fan_in_fan_out"):
        assert c_jm[key] == c_mk[key], key
    assert set(c_jm["target_modules"]) == set(c_mk["target_modules"])
    assert set(c_jm["modules_to_save"]) == set(c_mk["modules_to_save"])
    p_mk, full_mk, _ = _products(mk)
    p_jm, full_jm, _ = _products(ours)
    for k in full_mk:
        np.testing.assert_array_equal(f32(full_jm[k]), f32(full_mk[k]), err_msg=k)
    for k in p_mk:  # the factors differ by signs/rotations; the products agree up to bf16 rounding
        rel = np.linalg.norm(p_jm[k] - p_mk[k]) / np.linalg.norm(p_mk[k])
        assert rel < 2e-2, (k, rel)


def test_merge_loras_task_arithmetic_full_rank(full_adapters, tmp_path):
    res = merge_loras(BASE, full_adapters, tmp_path / "m", "task_arithmetic", rank="full")
    base, fts = open_model(BASE), [open_model(f) for f in FT]
    applied = open_model(f"{BASE}+{res.out_dir}")
    prods, full, _ = _products(res.out_dir)
    for k in base.keys():
        w = f32(base.get(k))
        ref = w + sum(f32(f.get(k)) - w for f in fts)  # task arithmetic of the fine-tunes, weights 1
        if k in prods:
            assert np.abs(w + prods[k] - ref).max() <= 1e-5 * np.abs(ref).max(), k
            got = f32(applied.get(k))  # rounded once to bf16: at most one bf16 step from the reference
            ulp = np.spacing(np.abs(ref).astype(np.float32)) * 2.0 ** 16
            assert np.all(np.abs(got - ref) <= ulp + 1e-12), k
        else:
            np.testing.assert_array_equal(f32(full[k]), ref.astype(base.dtype(k)).astype(np.float32), err_msg=k)


def test_merge_loras_weights_and_rank(full_adapters, tmp_path):
    r, wts = 2, [0.5, -0.25]
    res = merge_loras(BASE, full_adapters[:2], tmp_path / "m", "task_arithmetic", rank=r,
                      hparams={"weight": PerModel(wts)})
    prods, _, cfg = _products(res.out_dir)
    assert cfg["r"] == r
    base, fts = open_model(BASE), [open_model(f) for f in FT[:2]]
    for k, p in prods.items():
        w = f32(base.get(k)).astype(np.float64)
        d = sum(c * (f32(f.get(k)) - w) for c, f in zip(wts, fts))
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert np.abs(p - best).max() <= 1e-4 * s[0], k  # the unique best rank-r approximation
        assert res.residual[k] ** 2 == pytest.approx(float(np.sum(s[r:] ** 2)), rel=1e-4)


def test_cli_extract_and_merge(tmp_path, capsys):
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    assert main(["lora", "extract", BASE, FT[0], str(a1), "--rank", "8", "--dtype", "float32"]) == 0
    assert main(["lora", "extract", BASE, FT[1], str(a2), "--max-rank", "8"]) == 0
    assert load_file(str(a2 / "adapter_model.safetensors"))[
        P + "model.layers.0.mlp.up_proj.lora_A.weight"].dtype.name == "bfloat16"
    out = tmp_path / "ties"
    assert main(["lora", "merge", BASE, str(out), "--adapters", str(a1), str(a2), "--method", "ties",
                 "--rank", "4", "--density", "0.5"]) == 0
    p_t, _, cfg = _products(str(out))
    assert cfg["r"] == 4 and len(p_t) == 28
    ta = tmp_path / "ta"
    assert main(["lora", "merge", BASE, str(ta), "--adapters", str(a1), str(a2), "--rank", "4"]) == 0
    p_a, _, _ = _products(str(ta))
    assert all(np.linalg.matrix_rank(p_t[k], tol=1e-6 * np.abs(p_t[k]).max()) <= 4 for k in p_t)
    assert max(np.abs(p_t[k] - p_a[k]).max() for k in p_t) > 1e-3  # TIES is not task arithmetic
    capsys.readouterr()
    assert main(["lora", "extract", BASE, FT[0], str(a1), "--rank", "8"]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_rank_larger_than_matrix(tmp_path, full_adapters, capsys):
    with pytest.raises(MergeInputError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*rank 9.*min\(out, in\) = 8"):
        extract_lora(BASE, FT[0], tmp_path / "x", rank=9)
    with pytest.raises(MergeInputError, match=r"k_proj\.weight.*rank 9"):
        merge_loras(BASE, full_adapters, tmp_path / "y", rank=9)
    assert main(["lora", "extract", BASE, FT[0], str(tmp_path / "z"), "--rank", "17"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 17" in err and "layers.0.mlp.down_proj.weight" in err
    res = extract_lora(BASE, FT[0], tmp_path / "c", rank=9, clamp_rank=True)  # mergekit's clamping
    assert _products(res.out_dir)[2]["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    assert sorted(os.listdir(tmp_path)) == ["c"]  # nothing written on error


def test_adapter_for_another_base(full_adapters, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(os.path.join(full_adapters[1], "adapter_model.safetensors"))
    k = P + "model.layers.2.mlp.gate_proj.lora_A.weight"
    t[k] = np.concatenate([t[k], t[k][:, :4]], axis=1)  # an adapter trained on a model with hidden size 20
    save_file(t, str(bad / "adapter_model.safetensors"))
    with open(os.path.join(full_adapters[1], "adapter_config.json")) as f:
        (bad / "adapter_config.json").write_text(f.read())
    with pytest.raises(CheckpointError, match=rf"{bad}.*model\.layers\.2\.mlp\.gate_proj\.weight: model \(32, 16\)"):
        merge_loras(BASE, [full_adapters[0], str(bad)], tmp_path / "m", rank=4)
    assert main(["lora", "merge", BASE, str(tmp_path / "m"), "--adapters", full_adapters[0], str(bad),
                 "--rank", "4"]) == 1
    assert "gate_proj.weight" in capsys.readouterr().err
    other = os.path.join(os.path.dirname(D), "gpt2", "ft1")
    with pytest.raises(MergeInputError, match="hold different tensors"):
        extract_lora(BASE, other, tmp_path / "g", rank=2)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import jmerge.lora.extract as ex

    calls = []

    def boom(d, r):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(d, r)

    real = ex.low_rank_factors
    monkeypatch.setattr(ex, "low_rank_factors", boom)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        extract_lora(BASE, FT[0], tmp_path / "out", rank=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["keep"]


def test_biases_embed_lora_and_peft(tmp_path):
    """Qwen2 (q/k/v biases, tied head): modules with a bias are saved whole (PEFT's lora_bias would break
    merge_and_unload of the bias-free ones), the tied head is saved next to the embedding (PEFT replaces modules one
    by one) with ensure_weight_tying; Llama with --embed-lora: lora_embedding_A/B load in PEFT."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    arch = os.path.dirname(D)
    for name, kw in [("qwen2", {}), ("llama", {"embed_lora": True})]:
        b, f = os.path.join(arch, name, "base"), os.path.join(arch, name, "ft1")
        with _no_warning():
            res = extract_lora(b, f, tmp_path / name, rank="full", dtype="float32", **kw)
        kinds = {e.name: e.kind for e in res.entries}
        cfg = json.load(open(os.path.join(res.out_dir, "adapter_config.json")))
        if name == "qwen2":
            assert kinds["model.layers.0.self_attn.q_proj.bias"] == kinds["model.layers.0.self_attn.q_proj.weight"] == "full"
            assert cfg["lora_bias"] is False and "q_proj" not in cfg["target_modules"] and "q_proj" in cfg["modules_to_save"]
            assert kinds["lm_head.weight"] == "full" and "lm_head" in cfg["modules_to_save"]
            assert cfg["ensure_weight_tying"] is True
            saved = load_file(os.path.join(res.out_dir, "adapter_model.safetensors"))
            np.testing.assert_array_equal(saved[P + "lm_head.weight"], f32(open_model(f).get("model.embed_tokens.weight")))
        else:
            assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["lm_head.weight"] == "lora"
            assert "ensure_weight_tying" not in cfg
        ref = open_model(f)
        applied = open_model(f"{b}+{res.out_dir}")
        for k in ref.keys():
            np.testing.assert_array_equal(f32(applied.get(k)), f32(ref.get(k)), err_msg=k)
        pm = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32),
                                       res.out_dir)
        ids = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 8, 12, 60]])
        ft_model = transformers.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)
        with torch.no_grad():
            np.testing.assert_allclose(pm(ids).logits.numpy(), ft_model(ids).logits.numpy(), rtol=0, atol=1e-4)
        merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
        want = {k: v.numpy() for k, v in ft_model.state_dict().items()}
        assert {k for k in want if np.abs(merged[k] - want[k]).max() > 1e-6} == set()  # the tied head included


GPT2 = os.path.join(os.path.dirname(__file__), "data", "tiny")


def test_gpt2_conv1d_extract_loads_in_peft(tmp_path):
    """GPT-2's Conv1D weights are (in, out): lora_A (r, in), lora_B (out, r), B @ A = the update transposed,
    fan_in_fan_out: true; the tied head (wte) is saved next to wte. Full rank: PEFT gives the fine-tune's logits."""
    base_dir, ft_dir = os.path.join(GPT2, "gpt2_base"), os.path.join(GPT2, "gpt2_ft1")
    res = extract_lora(base_dir, ft_dir, tmp_path / "full", rank="full", dtype="float32")
    cfg = json.load(open(os.path.join(res.out_dir, "adapter_config.json")))
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is True
    assert sorted(cfg["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert {"wte", "wpe", "lm_head"} <= set(cfg["modules_to_save"]) and "ensure_weight_tying" not in cfg
    t = load_file(os.path.join(res.out_dir, "adapter_model.safetensors"))
    base, ft = open_model(base_dir), open_model(ft_dir)
    m = "transformer.h.0.attn.c_attn"
    assert t[f"{P}{m}.lora_A.weight"].shape == (64, 64) and t[f"{P}{m}.lora_B.weight"].shape == (192, 64)
    for mod in ("transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"):
        d = f32(ft.get(f"{mod}.weight")).astype(np.float64) - f32(base.get(f"{mod}.weight"))
        prod = t[f"{P}{mod}.lora_B.weight"].astype(np.float64) @ t[f"{P}{mod}.lora_A.weight"]
        assert np.abs(prod.T - d).max() <= 1e-5 * np.abs(d).max(), mod
    np.testing.assert_array_equal(t[P + "lm_head.weight"], f32(ft.get("transformer.wte.weight")))
    applied = open_model(f"{base_dir}+{res.out_dir}")  # jmerge's reader: Conv1D transposed, the tied head ignored
    for k in ft.keys():
        np.testing.assert_array_equal(f32(applied.get(k)), f32(ft.get(k)), err_msg=k)
    # rank 4: Eckart-Young on the transposed update; c_attn (64, 192) refuses rank 65, naming the tensor
    r4 = extract_lora(base_dir, ft_dir, tmp_path / "r4", rank=4, dtype="float32")
    d = f32(ft.get(f"{m}.weight")).astype(np.float64) - f32(base.get(f"{m}.weight"))
    s = np.linalg.svd(d, compute_uv=False)
    assert r4.residual[f"{m}.weight"] ** 2 == pytest.approx(float(np.sum(s[4:] ** 2)), rel=1e-4)
    with pytest.raises(MergeInputError, match=r"transformer\.h\.0\.attn\.c_attn\.weight.*rank 65.*= 64"):
        extract_lora(base_dir, ft_dir, tmp_path / "x", rank=65)

    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 8, 12, 60]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32)
    for a, exact in ((res.out_dir, True), (r4.out_dir, False)):
        pm = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), a)
        with torch.no_grad():
            got, want = pm(ids).logits.numpy(), ref(ids).logits.numpy()
        if exact:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
            merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
            for k, v in ref.state_dict().items():
                np.testing.assert_allclose(merged[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)
        else:
            with torch.no_grad():
                b0 = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits.numpy()
            assert 0 < np.abs(got - want).max() < np.abs(b0 - want).max()


def test_tied_embed_lora_falls_back_to_saved_embeddings(tmp_path):
    b, f = os.path.join(GPT2, "tied_base"), os.path.join(GPT2, "tied_ft1")
    with pytest.warns(UserWarning, match="ties its output head.*saved whole"):
        res = extract_lora(b, f, tmp_path / "a", rank="full", dtype="float32", embed_lora=True)
    kinds = {e.name: e.kind for e in res.entries}
    assert kinds["model.embed_tokens.weight"] == kinds["lm_head.weight"] == "full"
    # a layer's (vocab, hidden) MLP weight is not mistaken for the head (tiny: intermediate size = vocab = 128)
    assert kinds["model.layers.0.mlp.gate_proj.weight"] == "lora"


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)
