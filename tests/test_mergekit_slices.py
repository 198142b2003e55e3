"""`slices` configs with per-tensor methods, interpreted as mergekit 0.1.5 interprets them.

mergekit's rules (its ``MergePlanner`` and ``ConfigReader``), restated here to build the references:

* output layer ``k`` of a slice of ``n`` layers merges layer ``start + k`` of every source of that slice,
  with gradients evaluated at ``t = k / (n - 1)``, and ``t = 1`` for a one-layer slice;
* embeddings merge with the first slice's sources and parameters, the final norm and the head with the
  last slice's (its first ``len(first slice's sources)`` sources), both at ``t = 0``;
* a per-model parameter comes from the source's ``parameters``, else the slice's, else the top level; a
  level whose filters all miss the tensor is skipped; shared parameters (``t``, ``lambda``) come from the
  slice, else the top level; the base is the slice's ``base_model``, else the top-level one.

References are NumPy from these rules (slerp and linear, written from the formulas; these run without
torch) and mergekit itself, run in-process on CPU with ``dtype: float32`` (tolerance 1e-6).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import jmerge
from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import ConfigError, load_config, parse_config
from jmerge.pipeline import LAYER_SUB, input_paths, plan_jobs, plan_summary, run_merge

TOL = 1e-6


def _read(path) -> dict:
    with open_checkpoint(str(path)) as r:
        return {k: r.get(k).astype(np.float64) for k in r.keys()}


def _jmerge(text: str, tmp_path, name: str) -> dict:
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    out = tmp_path / f"jm-{name}"
    run_merge(load_config(str(cfg)), str(out), quiet=True)
    return _read(out)


def _mergekit(text: str, tmp_path, name: str) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run_merge
    out = tmp_path / f"mk-{name}"
    mk_run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                 MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False))
    return _read(out)


def _assert_close(got: dict, ref: dict, tol: float = TOL) -> None:
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    for k in ref:
        err = float(np.max(np.abs(got[k] - ref[k])))
        assert err <= tol, f"{k}: max |jmerge - reference| = {err:.3g}"


def _layer(name: str, i: int) -> str:
    return LAYER_SUB.sub(lambda m: f"{m.group(1)}{i}{m.group(3)}", name, count=1)


def _gradient(values, t):
    """A mergekit gradient at t: piecewise linear over evenly spaced anchors."""
    s = t * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (s - i0)) * values[i0] + (s - i0) * values[i1]


def _slerp(t, a, b, threshold=0.9995, eps=1e-8):
    """Spherical interpolation of two tensors as flat vectors (Shoemake); linear when nearly collinear."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.clip(np.sum((a / (na if na > eps else 1.0)) * (b / (nb if nb > eps else 1.0))), -1.0, 1.0))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


# ----------------------------------------------------------------------------------------------
# gradient-slerp, as mergekit's example is written: slices + slerp + per-filter `t` gradients


SELF_ATTN_T = [0.0, 0.5, 0.3, 1.0]
MLP_T = [0.9, 0.3, 0.8, 0.2]
FALLBACK_T = 0.5


def _slerp_cfg(base, ft):
    return f"""\
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {ft}
        layer_range: [0, 3]
  - sources:
      - model: {base}
        layer_range: [1, 2]
      - model: {ft}
        layer_range: [2, 3]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: {SELF_ATTN_T}
    - filter: mlp
      value: {MLP_T}
    - value: {FALLBACK_T}
dtype: float32
"""


def _t_of(name, t):
    if "self_attn" in name:
        return _gradient(SELF_ATTN_T, t)
    if "mlp" in name:
        return _gradient(MLP_T, t)
    return FALLBACK_T


def _slerp_reference(base, ft) -> dict:
    b, f = _read(base), _read(ft)
    # output layer -> (base layer, model layer, t): slice 0 is 3 layers (t = 0, 0.5, 1), slice 1 one layer (t = 1)
    layout = {0: (0, 0, 0.0), 1: (1, 1, 0.5), 2: (2, 2, 1.0), 3: (1, 2, 1.0)}
    ref = {}
    for name in b:
        li = jmerge.layer_index(name)
        if li is None:  # embeddings, final norm, head: t = 0
            ref[name] = _slerp(_t_of(name, 0.0), b[name], f[name])
        elif li == 0:
            for out, (bl, fl, t) in layout.items():
                ref[_layer(name, out)] = _slerp(_t_of(name, t), b[_layer(name, bl)], f[_layer(name, fl)])
    return ref


def test_gradient_slerp_slices_match_numpy(tiny_base, tiny_fts, tmp_path):
    text = _slerp_cfg(tiny_base, tiny_fts[0])
    got = _jmerge(text, tmp_path, "slerp")
    _assert_close(got, _slerp_reference(tiny_base, tiny_fts[0]))
    cfg = json.loads((tmp_path / "jm-slerp" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4


def test_dry_run_lists_gradient_values_per_layer_in_layer_order(tiny_base, tiny_fts, tmp_path):
    s = plan_summary(parse_config(_slerp_cfg(tiny_base, tiny_fts[0]), "g.yml"))
    # layers 0..3 sit at t = 0, 0.5, 1 (slice 0) and t = 1 (slice 1, one layer)
    attn = [_gradient(SELF_ATTN_T, t) for t in (0, 0.5, 1, 1)]
    mlp = [_gradient(MLP_T, t) for t in (0, 0.5, 1, 1)]
    fmt = lambda v: "[" + ", ".join(f"{x:.6g}" for x in v) + "] per layer"
    assert f"model.layers.*.self_attn.q_proj.weight x4 (64, 64) bfloat16->float32 t={fmt(attn)}" in s, s
    assert f"model.layers.*.mlp.up_proj.weight x4 (128, 64) bfloat16->float32 t={fmt(mlp)}" in s, s
    assert "model.layers.*.input_layernorm.weight x4 (64,) bfloat16->float32 t=0.5\n" in s, s
    assert "slices (2, 4 layers):" in s and "layers 3-3 <- " in s, s


def test_gradient_slerp_slices_match_mergekit(tiny_base, tiny_fts, tmp_path):
    text = _slerp_cfg(tiny_base, tiny_fts[0])
    _assert_close(_jmerge(text, tmp_path, "slerp"), _mergekit(text, tmp_path, "slerp"))


# ----------------------------------------------------------------------------------------------
# linear: per-source, per-slice and top-level parameters; slices with different source counts


def _linear_cfg(base, fts):
    return f"""\
merge_method: linear
parameters:
  weight: 1.0
slices:
  - sources:
      - model: {fts[0]}
        layer_range: [0, 1]
        parameters:
          weight:
            - filter: mlp
              value: [2.0, 3.0]
      - model: {fts[1]}
        layer_range: [2, 3]
  - sources:
      - model: {fts[1]}
        layer_range: [0, 2]
        parameters: {{weight: 0.25}}
      - model: {base}
        layer_range: [1, 3]
      - model: {fts[2]}
        layer_range: [1, 3]
    parameters:
      weight: [0.5, 1.5]
dtype: float32
"""


def _linear_reference(base, fts) -> dict:
    b, f1, f2, f3 = _read(base), *[_read(p) for p in fts]

    def lin(parts):
        w = sum(wi for wi, _ in parts)
        return sum(wi * x for wi, x in parts) / w

    ref = {}
    for name in b:
        li = jmerge.layer_index(name)
        if li is None and "embed" in name:  # first slice's sources at t = 0: ft1's filter misses -> top 1.0
            ref[name] = lin([(1.0, f1[name]), (1.0, f2[name])])
        elif li is None:  # last slice's first two sources (the first slice has two) at t = 0
            ref[name] = lin([(0.25, f2[name]), (0.5, b[name])])
        elif li == 0:
            # slice 0, one layer, t = 1: ft1 layer 0 (mlp: gradient end 3.0, else the top level 1.0), ft2 layer 2
            w1 = 3.0 if "mlp" in name else 1.0
            ref[_layer(name, 0)] = lin([(w1, f1[_layer(name, 0)]), (1.0, f2[_layer(name, 2)])])
            # slice 1, two layers at t = 0 and 1: ft2 (own 0.25), base and ft3 (slice gradient 0.5 -> 1.5)
            for k, sw in ((0, 0.5), (1, 1.5)):
                ref[_layer(name, 1 + k)] = lin([(0.25, f2[_layer(name, k)]), (sw, b[_layer(name, 1 + k)]),
                                                (sw, f3[_layer(name, 1 + k)])])
    return ref


def test_linear_slices_per_level_parameters_match_numpy(tiny_base, tiny_fts, tmp_path):
    got = _jmerge(_linear_cfg(tiny_base, tiny_fts), tmp_path, "linear")
    _assert_close(got, _linear_reference(tiny_base, tiny_fts))


def test_linear_slices_match_mergekit(tiny_base, tiny_fts, tmp_path):
    text = _linear_cfg(tiny_base, tiny_fts)
    _assert_close(_jmerge(text, tmp_path, "linear"), _mergekit(text, tmp_path, "linear"))


# ----------------------------------------------------------------------------------------------
# TIES: per-slice base_model, per-slice and per-source parameters, gradients and filters


@pytest.fixture
def noisy_models(tiny_base, tiny_fts, tmp_path):
    """float32 copies of the tiny fixtures with small distinct offsets per entry.

    bf16 task vectors have many equal magnitudes, and mergekit's top-k keeps an arbitrary subset of the
    entries tied at the threshold (see peers.md); distinct magnitudes make the selection unique.
    """
    from safetensors.numpy import save_file
    rng = np.random.default_rng(10)
    out = []
    for i, src in enumerate([tiny_base, *tiny_fts]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        t = {k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in _read(src).items()}
        save_file(t, str(d / "model.safetensors"))
        shutil.copy(os.path.join(src, "config.json"), d / "config.json")
        out.append(str(d))
    return out


def _ties_cfg(base, f1, f2, f3):
    return f"""\
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  lambda: 0.9
  density: 0.6
  weight: 0.45
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {f1}
        layer_range: [1, 3]
        parameters:
          weight: [0.3, 1.3]
          density:
            - filter: mlp
              value: 0.4
      - model: {f2}
        layer_range: [0, 2]
    parameters:
      weight:
        - filter: self_attn
          value: 0.7
      density: [0.3, 0.9]
  - sources:
      - model: {f3}
        layer_range: [2, 3]
      - model: {f1}
        layer_range: [0, 1]
        parameters: {{weight: 0.65}}
      - model: {base}
        layer_range: [1, 2]
    base_model: {f3}
    parameters:
      lambda:
        - filter: layers.2.
          value: 1.1
        - value: 1.2
      weight:
        - filter: layers.2.
          value: 0.55
dtype: float32
"""


def test_ties_slices_per_slice_base_and_parameters_match_mergekit(noisy_models, tmp_path):
    text = _ties_cfg(*noisy_models)
    _assert_close(_jmerge(text, tmp_path, "ties"), _mergekit(text, tmp_path, "ties"))


def test_ties_slices_hyperparameters_per_tensor(noisy_models):
    """The per-tensor values the planner attaches, read by hand from the config (mergekit's precedence)."""
    plan = parse_config(_ties_cfg(*noisy_models), "t.yml")
    paths = input_paths(plan)
    readers = [open_checkpoint(p) for p in paths]
    try:
        hp = {j.out_name: j.op.hparams for j in plan_jobs(plan, readers, paths) if hasattr(j.op, "hparams")}
    finally:
        for r in readers:
            r.close()
    # layer 1 = slice 0 at t = 1: ft1 weight 1.3 (own gradient), ft2 0.7 (slice filter); ft1's density
    # filter misses self_attn -> slice gradient 0.9; lambda from the top level
    q1 = hp["model.layers.1.self_attn.q_proj.weight"]
    assert np.allclose(q1["weight"].specs, [1.3, 0.7]) and np.allclose(q1["density"].specs, [0.9, 0.9])
    assert q1["scale"] == 0.9
    m0 = hp["model.layers.0.mlp.up_proj.weight"]  # t = 0: ft1 0.3 / density 0.4; ft2 top weight 0.45
    assert np.allclose(m0["weight"].specs, [0.3, 0.45]) and np.allclose(m0["density"].specs, [0.4, 0.3])
    # layer 2 = slice 1 (base ft3): models ft1 (own weight) and base, whose input is its layer 1: the
    # slice's `layers.2.` filter misses it (per-model filters see input names) -> top 0.45; lambda, a
    # shared parameter, sees the output name: the slice's `layers.2.` entry
    q2 = hp["model.layers.2.self_attn.q_proj.weight"]
    assert np.allclose(q2["weight"].specs, [0.65, 0.45]) and np.allclose(q2["density"].specs, [0.6, 0.6])
    assert q2["scale"] == 1.1
    # final norm: the last slice at t = 0 (lambda fallback 1.2); embeddings: the first slice (top 0.9)
    assert hp["model.norm.weight"]["scale"] == 1.2 and hp["model.embed_tokens.weight"]["scale"] == 0.9
    assert np.allclose(hp["model.norm.weight"]["weight"].specs, [0.65, 0.45])


# ----------------------------------------------------------------------------------------------
# errors: one line, the YAML location, nothing written


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unequal_source_ranges_are_refused(tiny_base, tiny_fts):
    cfg = f"""\
merge_method: slerp
base_model: {tiny_base}
parameters: {{t: 0.5}}
slices:
  - sources:
      - model: {tiny_base}
        layer_range: [0, 3]
      - model: {tiny_fts[0]}
        layer_range: [0, 2]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "c.yml")
    assert _one_line(e).startswith("c.yml:6:7: slices.0.sources: every source of a slice must span the same number "
                                   "of layers; got [3, 2]")


def test_base_must_be_a_source_of_its_slice(tiny_base, tiny_fts):
    cfg = f"""\
merge_method: ties
base_model: {tiny_base}
slices:
  - sources:
      - model: {tiny_fts[0]}
        layer_range: [0, 3]
      - model: {tiny_fts[1]}
        layer_range: [0, 3]
"""
    with pytest.raises(ConfigError, match=r"^c\.yml:5:7: slices\.0\.sources: the base model '.*' is not a source"):
        parse_config(cfg, "c.yml")
    with pytest.raises(ConfigError, match=r"^c\.yml:9:17: slices\.0\.base_model: the base model"):
        parse_config(cfg + f"    base_model: {tiny_fts[2]}\n", "c.yml")


@pytest.mark.parametrize("method", ["slerp", "passthrough"])
def test_out_of_range_layer_range_is_an_error_before_reading(method, tiny_base, tiny_fts, tmp_path, monkeypatch):
    second = "" if method == "passthrough" else f"      - model: {tiny_fts[0]}\n        layer_range: [1, 4]\n"
    first = "[0, 3]" if method != "passthrough" else "[1, 4]"
    cfg = (f"merge_method: {method}\nbase_model: {tiny_base}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
           f"      - model: {tiny_base}\n        layer_range: {first}\n{second}")
    if method == "passthrough":
        cfg = cfg.replace("parameters: {t: 0.5}\n", "").replace(f"base_model: {tiny_base}\n", "")
    path = tmp_path / "c.yml"
    path.write_text(cfg)
    where = "c.yml:5:22: slices.0.sources.0" if method == "passthrough" else "c.yml:9:22: slices.0.sources.1"
    plan = load_config(str(path))  # the config itself is valid; the models have 3 layers

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read")

    from jmerge.io.safetensors import CheckpointReader
    monkeypatch.setattr(CheckpointReader, "get", no_reads)
    out = tmp_path / "out"
    for run in (lambda: run_merge(plan, str(out), quiet=True), lambda: plan_summary(plan)):
        with pytest.raises(jmerge.MergeInputError) as e:
            run()
        msg = _one_line(e)
        assert f"{where}.layer_range: layer_range [1, 4] is out of range: model '" in msg, msg
        assert "has 3 layers (config.json num_hidden_layers); give an end of at most 3." in msg, msg
        assert not out.exists()


def test_filters_that_leave_a_required_parameter_unset_name_the_tensor(tiny_base, tiny_fts, tmp_path):
    cfg = f"""\
merge_method: slerp
base_model: {tiny_base}
slices:
  - sources:
      - model: {tiny_base}
        layer_range: [0, 3]
      - model: {tiny_fts[0]}
        layer_range: [0, 3]
    parameters:
      t:
        - filter: self_attn
          value: 0.3
"""
    plan = parse_config(cfg, "c.yml")
    with pytest.raises(jmerge.MergeInputError) as e:
        run_merge(plan, str(tmp_path / "o"), quiet=True)
    msg = _one_line(e)
    assert "c.yml:4:5: slices.0: no setting of 't' applies to tensor '" in msg, msg
    assert not (tmp_path / "o").exists()
