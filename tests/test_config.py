"""mergekit YAML config parsing: fields, method/parameter mapping, gradients and filters, errors with locations."""

from __future__ import annotations

import numpy as np
import pytest

import jmerge
from jmerge.mergekit import ConfigError, MERGEKIT_METHODS, parse_config
from jmerge import Gradient, PerModel, Rules


def _interp_ref(values, t):
    """mergekit gradient: piecewise-linear over evenly spaced anchors, written out by hand."""
    n = len(values)
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


FULL = """\
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters:
      weight: 0.7
      density: [0.2, 0.8]
  - model: ft2
    parameters:
      weight:
        - filter: self_attn
          value: 0.1
        - filter: mlp
          value: [1.0, 0.0]
        - value: 0.5
  - model: base
parameters:
  density: 0.4
  lambda: 0.9
  normalize: true
  int8_mask: true
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
chat_template: "{{ messages }}"
name: my-merge
seed: 7
"""


def test_every_field_parses_and_maps():
    plan = parse_config(FULL, "full.yml")
    c = plan.config
    assert (c.merge_method, c.base_model, c.dtype, c.out_dtype, c.tokenizer_source, c.chat_template, c.name,
            c.seed) == ("ties", "base", "float32", "bfloat16", "base", "{{ messages }}", "my-merge", 7)
    assert plan.method_name == "ties" and plan.base == "base"
    assert plan.models == ["ft1", "ft2"]  # the base listed among the models is not a task vector
    # mergekit ties, normalize: true -> disjoint mean normalised by the agreeing weights; floor rounding
    assert plan.factory_kwargs["reduce"] == "mean" and plan.factory_kwargs["normalize_by"] == "weight"
    assert plan.factory_kwargs["rounding"] == "floor" and plan.factory_kwargs["scope"] == "tensor"
    assert plan.hparams["scale"] == 0.9  # lambda
    dens = plan.hparams["density"]
    assert isinstance(dens, PerModel) and dens.specs[0] == Gradient([0.2, 0.8]) and dens.specs[1] == 0.4
    w = plan.hparams["weight"]
    assert isinstance(w, PerModel) and w.specs[0] == 0.7 and isinstance(w.specs[1], Rules)
    assert plan.build() == jmerge.ties(**plan.factory_kwargs)


def test_gradients_and_filters_resolve_like_mergekit():
    plan = parse_config(FULL, "full.yml")
    method = plan.build()
    n_layers = 5
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}" for i in range(n_layers) for m in ("self_attn.q_proj.weight", "mlp.up_proj.weight",
                                                                   "input_layernorm.weight")]
    tree = {n: 0 for n in names}
    per = jmerge.prepare_leaf_hparams(method, tree, 2, plan.hparams, num_layers=n_layers)
    paths = jmerge.leaves_with_paths(tree)[0]
    got = dict(zip(paths, per))
    for n in names:
        li = jmerge.layer_index(n)
        t = 0.0 if li is None else li / (n_layers - 1)  # non-layer tensors take t = 0
        exp_density = [_interp_ref([0.2, 0.8], t), 0.4]
        if "self_attn" in n:
            w2 = 0.1
        elif "mlp" in n:
            w2 = _interp_ref([1.0, 0.0], t)
        else:
            w2 = 0.5  # the entry without a filter
        np.testing.assert_allclose(got[n]["trim.density"], exp_density, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[n]["elect_sign.weight"], [0.7, w2], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[n]["scale.scale"], 0.9, rtol=1e-6)


def test_first_matching_filter_wins_even_before_a_default():
    cfg = """\
merge_method: task_arithmetic
base_model: b
models:
  - model: m
parameters:
  weight:
    - filter: mlp
      value: 2.0
    - value: 3.0
    - filter: self_attn
      value: 4.0
"""
    plan = parse_config(cfg)
    tree = {"model.layers.0.mlp.w": 0, "model.layers.0.self_attn.q": 0, "lm_head.weight": 0}
    per = jmerge.prepare_leaf_hparams(plan.build(), tree, 1, plan.hparams)
    got = {p: float(d["weighted_sum.weight"]) for p, d in zip(jmerge.leaves_with_paths(tree)[0], per)}
    # mergekit: the filterless entry matches everything, so the later self_attn entry never applies
    assert got == {"model.layers.0.mlp.w": 2.0, "model.layers.0.self_attn.q": 3.0, "lm_head.weight": 3.0}


@pytest.mark.parametrize("name", sorted(MERGEKIT_METHODS))
def test_every_mergekit_method_maps_to_an_available_jmerge_method(name):
    spec = MERGEKIT_METHODS[name]
    if spec.jm not in jmerge.available_methods():
        pytest.skip(f"jmerge method {spec.jm} not available yet")
    models = "  - model: a\n  - model: b\n" if spec.max_models != 1 else "  - model: a\n"
    extra = "parameters:\n  t: 0.3\n" if name in ("slerp", "nearswap") else ""
    plan = parse_config(f"merge_method: {name}\nbase_model: base\nmodels:\n{models}{extra}")
    assert plan.method_name == spec.jm
    assert isinstance(plan.build(), jmerge.Transform)


def test_defaults_follow_mergekit_not_jmerge():
    # jmerge's ties defaults to density 0.2; mergekit's to 1.0 (no trimming), lambda 1
    plan = parse_config("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n")
    assert plan.hparams["density"] == 1.0 and plan.hparams["scale"] == 1.0
    plan = parse_config("merge_method: dare_ties\nbase_model: b\nmodels:\n  - model: m\n")
    assert plan.factory_kwargs["rescale"] == "l1" and plan.factory_kwargs["reduce"] == "sum"
    plan = parse_config("merge_method: della\nbase_model: b\nmodels:\n  - model: m\n"
                        "parameters: {normalize: false, rescale: false}\n")
    assert plan.factory_kwargs["rescale"] == "none" and plan.factory_kwargs["reduce"] == "sum"
    plan = parse_config("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    assert plan.base is None and plan.factory_kwargs == {"normalize": True}
    plan = parse_config("merge_method: nuslerp\nmodels:\n  - model: a\n  - model: b\n"
                        "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n")
    assert plan.factory_kwargs == {"flatten": False, "row_wise": True, "base_relative": False}


def test_jmerge_native_method_and_extras():
    plan = parse_config("merge_method: magmax\nbase_model: b\nmodels:\n  - model: m\n  - model: n\n"
                        "parameters: {scale: 0.25}\nseed: 3\n")
    assert plan.method_name == "magmax" and plan.hparams == {"scale": 0.25} and plan.seed == 3


def test_passthrough_slices():
    cfg = """\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
  - sources:
      - model: b
        layer_range: [1, 3]
"""
    plan = parse_config(cfg)
    assert plan.slices == [("a", 0, 2), ("b", 1, 3)] and plan.build() is None


def _err(text, match):
    with pytest.raises(ConfigError, match=match) as ei:
        parse_config(text, "c.yml")
    return str(ei.value)


def test_unknown_method_lists_methods_with_location():
    msg = _err("models:\n  - model: a\nmerge_method: tiez\n", r"^c\.yml:3:15: merge_method: unknown merge method 'tiez'")
    assert "ties" in msg and "task_arithmetic" in msg and "slerp" in msg


def test_unknown_parameter_location_and_allowed():
    msg = _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      densty: 0.3\n",
               r"^c\.yml:6:7: .*unknown parameter 'densty'")
    assert "density" in msg and "weight" in msg


def test_unknown_field_and_missing_models():
    _err("merge_method: ties\nbase_model: b\nmodles:\n  - model: m\n", r"^c\.yml:3:1: .*unknown field 'modles'")
    _err("merge_method: ties\nbase_model: b\n", r"^c\.yml:1:15: .*missing `models`")
    _err("merge_method: ties\nmodels:\n  - model: m\n", r"needs `base_model`")
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - parameters: {weight: 1}\n",
         r"^c\.yml:4:5: models\.0: missing required field 'model'")
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    colour: red\n",
         r"^c\.yml:5:5: .*unknown field 'colour'")


def test_wrong_types_are_located():
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      weight: heavy\n",
         r"^c\.yml:6:15: .*cannot use 'heavy'")
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\nparameters:\n  density: [0.1, x]\n",
         r"^c\.yml:6:12: .*mixed list")
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\nparameters:\n  normalize: [0, 1]\n",
         r"^c\.yml:6:14: .*fixed option")
    _err("merge_method: ties\nbase_model: b\nmodels: 3\n", r"^c\.yml:3:9: models")
    _err("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\nseed: abc\n", r"^c\.yml:5:7: seed")
    _err("merge_method: [\n", r"^c\.yml:\d+:\d+: not valid YAML")


def test_model_count_limits():
    _err("merge_method: slerp\nbase_model: b\nmodels:\n  - model: x\n  - model: y\nparameters: {t: 0.5}\n",
         r"at most 1 model")
    _err("merge_method: slerp\nbase_model: b\nmodels:\n  - model: x\n", r"needs parameter 't'")
