"""mergekit's example configs on tiny models of every supported architecture, against mergekit 0.1.5.

Each case ``(example, arch)`` is ``tests/data/examples/<example>/<arch>/config.yml``: a config of the same
structure as mergekit's ``examples/<example>.yml`` (method, parameters, filters, gradients, slices,
tokenizer and dtype settings), written by ``scripts/make_example_goldens.py`` for the fixtures of
``scripts/make_arch_models.py`` (``tests/data/arch/<arch>/``), next to mergekit's output
``model.safetensors`` (goldens made with a stable top-k tie order, see that script).

* ``test_matches_mergekit``: ``jmerge merge`` on the config, every tensor compared with the golden
  (same names after mapping per-expert MoE tensors to transformers 5's fused ``mlp.experts.*``, same
  shapes, same stored dtype). Tolerance: one step of the config's ``dtype`` at the larger magnitude,
  ``|a - b| <= eps(dtype) * max(|a|, |b|) + tiny(dtype)`` (``eps`` = 2^-10 for float16, 2^-7 for
  bfloat16; ``tiny`` the smallest subnormal); for ``dtype: float32`` cases (``*-f32``)
  ``|a - b| <= 1e-6``. The stored dtype must be the config's. Runs without torch.
* ``test_config``: ``config.json`` has the config's dtype; where slices change the depth, mergekit's
  layer count (the sum of the slices' ranges), and layer-indexed fields (``layer_types``) follow the
  layers they were copied from (mergekit 0.1.5 leaves them alone and fails saving the config).
* ``test_loads_and_runs``: the output loads with ``AutoModelForCausalLM`` and a forward pass gives
  finite logits (needs torch + transformers).

Cases that fail today because a feature of issue 10 is missing are ``xfail(strict=True,
raises=AssertionError)`` from the ``XFAIL`` table below (a crash still fails); remove an entry when its
feature lands (strict: an unexpected pass fails).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import yaml

from jmerge.cli import main
from jmerge.io.safetensors import open_checkpoint

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
GOLD = os.path.join(REPO, "tests", "data", "examples")
ARCH = os.path.join(REPO, "tests", "data", "arch")

EXAMPLES = ("arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties",
            "linear-f32", "ties-f32")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "mixtral", "qwen2_moe")

# (example | "*", arch | "*", test | "*") -> reason, test one of "tensors", "config", "forward"; matched
# most specific first. Each entry must be checked to fail for its reason only (e.g. jmerge's output
# equals mergekit's output of the same config with `dtype: float32` and `out_dtype` = the config's
# dtype). Remove an entry when its feature lands (strict: XPASS fails). Empty: every case passes.
XFAIL: dict[tuple[str, str, str], str] = {}

# Deliberate departures from mergekit 0.1.5: (example, arch) -> {tensor: why}; these tensors are compared
# with the last slice's model instead of the golden. mergekit has no Qwen2-MoE definition and infers
# one in which every non-layer tensor is a "pre" weight taken from the first slice's model (and the
# config keeps the input depth); jmerge treats Qwen2-MoE like Qwen2/Llama: the final norm and lm_head
# come with the last layers.
_LAST = "post weights follow the last slice (mergekit 0.1.5's inferred Qwen2-MoE takes the first)"
DEPARTURES: dict[tuple[str, str], dict[str, str]] = {
    ("orcamini-platy-44layer", "qwen2_moe"): {"model.norm.weight": _LAST, "lm_head.weight": _LAST},
}


def _xfail_reason(example: str, arch: str, test: str) -> str | None:
    for key in ((example, arch, test), (example, arch, "*"), (example, "*", test), ("*", arch, test),
                (example, "*", "*"), ("*", arch, "*"), ("*", "*", test)):
        if key in XFAIL:
            return XFAIL[key]
    return None


def _cases(test: str) -> list:
    out = []
    for ex in EXAMPLES:
        for arch in ARCHS:
            if not os.path.isfile(os.path.join(GOLD, ex, arch, "config.yml")):
                continue
            reason = _xfail_reason(ex, arch, test)
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
            out.append(pytest.param(ex, arch, id=f"{ex}-{arch}", marks=marks))
    return out


def _cfg(example: str, arch: str) -> dict:
    with open(os.path.join(GOLD, example, arch, "config.yml")) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """``merged(example, arch) -> output dir`` of ``jmerge merge`` on the case's config (once per case).

    A merge that does not succeed fails the test with ``pytest.fail`` (not an ``AssertionError``), so
    it is never taken for one of the expected mismatches of ``XFAIL``."""
    root = tmp_path_factory.mktemp("examples")
    outputs: dict[tuple[str, str], str] = {}

    def run(example: str, arch: str) -> str:
        if (example, arch) not in outputs:
            out = os.path.join(root, f"{example}-{arch}")
            shutil.rmtree(out, ignore_errors=True)
            cwd = os.getcwd()
            os.chdir(REPO)  # configs name models relative to the repo root
            try:
                rc = main(["merge", os.path.join(GOLD, example, arch, "config.yml"), out, "--quiet"])
            except BaseException as e:  # noqa: BLE001 - report any crash as a failure, see above
                pytest.fail(f"jmerge merge {example}/{arch} raised {type(e).__name__}: {e}")
            finally:
                os.chdir(cwd)
            if rc != 0:
                pytest.fail(f"jmerge merge {example}/{arch} exited with {rc}")
            outputs[(example, arch)] = out
        return outputs[(example, arch)]

    return run


# transformers 5 keeps MoE experts fused (mergekit 0.1.5 reads and writes them so); checkpoints on
# disk may have them one by one.
_MIXTRAL = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_QWEN_MOE = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _fuse_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert MoE tensors -> ``<layer>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first)
    and ``<layer>.mlp.experts.down_proj`` ``[E, H, I]``; Mixtral's router ``block_sparse_moe.gate`` ->
    ``mlp.gate``. Names that are already fused pass through."""
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for name, t in tensors.items():
        m = _MIXTRAL.match(name) or _QWEN_MOE.match(name)
        if m:
            layer, e, p = m.group(1), int(m.group(2)), _PART[m.group(3)]
            parts.setdefault(layer, {}).setdefault(p, {})[e] = t
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for layer, d in parts.items():
        n = len(d["gate"])
        assert set(d["gate"]) == set(d["up"]) == set(d["down"]) == set(range(n)), layer
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([d["gate"][e], d["up"][e]], axis=0) for e in range(n)])
        out[f"{layer}.mlp.experts.down_proj"] = np.stack([d["down"][e] for e in range(n)])
    return out


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> float32 values, name -> stored dtype name) with MoE experts fused."""
    with open_checkpoint(path) as r:
        vals = _fuse_experts({k: np.asarray(r.get(k)) for k in r.keys()})
    return {k: v.astype(np.float32) for k, v in vals.items()}, {k: str(v.dtype) for k, v in vals.items()}


_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}  # one step (ulp) at 1.0
_TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133}  # the smallest subnormal


def _reference(example: str, arch: str) -> dict[str, np.ndarray]:
    """mergekit's tensors, with the ``DEPARTURES`` of this case taken from the last slice's model."""
    gold, _ = _read(os.path.join(GOLD, example, arch, "model.safetensors"))
    dep = DEPARTURES.get((example, arch), {})
    if dep:
        last, _ = _read(os.path.join(REPO, _cfg(example, arch)["slices"][-1]["sources"][0]["model"]))
        gold.update({k: last[k] for k in dep})
    return gold


@pytest.mark.parametrize(("example", "arch"), _cases("tensors"))
def test_matches_mergekit(example, arch, merged):
    cfg = _cfg(example, arch)
    dtype = cfg.get("dtype", "bfloat16")
    out_dtype = cfg.get("out_dtype") or dtype  # fixtures are bf16 (the default when a config sets none)
    got, got_dt = _read(merged(example, arch))
    gold = _reference(example, arch)
    assert sorted(got) == sorted(gold), (
        f"tensor names differ: only jmerge {sorted(set(got) - set(gold))[:4]}, "
        f"only mergekit {sorted(set(gold) - set(got))[:4]}")
    # stored dtype: the config's (mergekit's arcee_fusion writes float32 whatever `dtype` says: its 0/1
    # mask is float32 and promotes the result; the values are the inputs', exact in the config dtype)
    wrong = sorted(k for k in got if got_dt[k] != out_dtype)
    assert not wrong, f"{len(wrong)} tensors not stored as {out_dtype}, e.g. {wrong[0]}: {got_dt[wrong[0]]}"
    bad: list[str] = []
    worst = 0.0
    for k in sorted(gold):
        a, b = got[k], gold[k]
        assert a.shape == b.shape, f"{k}: shape {a.shape} vs mergekit {b.shape}"
        diff = np.abs(a - b)
        if dtype == "float32":
            tol = np.full(a.shape, 1e-6, np.float32)
        else:
            tol = _EPS[dtype] * np.maximum(np.abs(a), np.abs(b)) + _TINY[dtype]
        over = np.flatnonzero(diff > tol)
        worst = max(worst, float(diff.max(initial=0.0)))
        if over.size:
            i = over[np.argmax(diff.ravel()[over])]
            bad.append(f"{k}: {over.size}/{a.size} entries, e.g. jmerge {a.ravel()[i]:.6g} vs "
                       f"mergekit {b.ravel()[i]:.6g}")
    assert not bad, f"{example}/{arch} ({dtype}): {len(bad)}/{len(gold)} tensors beyond one {dtype} step " \
                    f"(max |diff| {worst:.3g}):\n  " + "\n  ".join(bad[:8])


def _depth_key(config: dict) -> str:
    return "n_layer" if config.get("model_type") == "gpt2" else "num_hidden_layers"


def _slice_layers(cfg: dict) -> list[tuple[str, int]]:
    """(model, layer index) of every output layer of a ``slices:`` config, in order (first source)."""
    return [(s["sources"][0]["model"], i) for s in cfg.get("slices", [])
            for i in range(*s["sources"][0]["layer_range"])]


@pytest.mark.parametrize(("example", "arch"), _cases("config"))
def test_config(example, arch, merged):
    """config.json: the config's dtype; where slices change the depth, mergekit's layer count (the sum of
    the slices' ranges) and layer-indexed fields (``layer_types``) that follow the copied layers."""
    cfg = _cfg(example, arch)
    with open(os.path.join(merged(example, arch), "config.json")) as f:
        out = json.load(f)
    want_dtype = cfg.get("out_dtype") or cfg.get("dtype") or "bfloat16"
    assert out.get("dtype", out.get("torch_dtype")) == want_dtype
    layers = _slice_layers(cfg)
    if not layers:
        return
    srcs: dict[str, dict] = {}
    for model, _ in layers:
        if model not in srcs:
            with open(os.path.join(REPO, model, "config.json")) as f:
                srcs[model] = json.load(f)
    key = _depth_key(out)
    assert out[key] == len(layers), f"{key} = {out[key]}, the slices give {len(layers)} layers"
    gold_cfg = os.path.join(GOLD, example, arch, "config.json")
    if os.path.isfile(gold_cfg) and arch != "qwen2_moe":  # see DEPARTURES: mergekit keeps Qwen2-MoE's depth
        with open(gold_cfg) as f:
            assert json.load(f)[key] == len(layers), "golden config.json disagrees with the slices"
    for field in ("layer_types",):
        if any(field in c for c in srcs.values()):
            want = [srcs[m][field][i] for m, i in layers]
            assert out.get(field) == want, f"{field} = {out.get(field)}; the copied layers have {want}"


@pytest.mark.parametrize("arch", [a for a in ("mixtral", "qwen2_moe")
                                  if os.path.isfile(os.path.join(GOLD, "orcamini-platy-44layer", a,
                                                                 "model.safetensors"))])
def test_expert_fusion_matches_mergekit(arch):
    """The harness's per-expert -> fused mapping is mergekit's: its passthrough copies layers 0-2 of ft1."""
    ft1, _ = _read(os.path.join(ARCH, arch, "ft1"))
    with open_checkpoint(os.path.join(ARCH, arch, "ft1")) as r:
        assert not any(k.endswith("gate_up_proj") for k in r.keys())  # on disk: one tensor per expert
    gold, _ = _read(os.path.join(GOLD, "orcamini-platy-44layer", arch, "model.safetensors"))
    names = [k for k in gold if k.startswith("model.layers.0.mlp.")]
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.gate.weight"} <= set(names)
    for k in names:
        np.testing.assert_array_equal(ft1[k], gold[k], err_msg=k)


@pytest.mark.parametrize(("example", "arch"), _cases("forward"))
def test_loads_and_runs(example, arch, merged):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = merged(example, arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 17, 30, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert tuple(logits.shape) == (1, ids.shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    # the weights transformers loaded are the ones jmerge wrote, and none was left to initialisation
    got, _ = _read(out)
    sd = model.state_dict()
    assert set(got) <= set(sd), f"not loaded: {sorted(set(got) - set(sd))[:4]}"
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(sd) - set(got) <= tied, f"not in the output: {sorted(set(sd) - set(got) - tied)[:4]}"
    for name, t in got.items():
        np.testing.assert_array_equal(sd[name].float().numpy(), t, err_msg=name)
