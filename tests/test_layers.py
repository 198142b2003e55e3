"""Tests of LiNeS and layer swapping against NumPy references written from the papers' formulas."""

import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge import Rules
from jmerge.methods.layers import layer_swap, lines, lines_scale, select_model
from jmerge import MergeInputError

L = 5


def make(T, seed=0):
    r = np.random.default_rng(seed)
    base = {"model": {"embed_tokens": {"weight": r.normal(size=(11, 4)).astype(np.float32)},
                      "layers": {str(i): {"mlp": {"w": r.normal(size=(4, 3)).astype(np.float32)},
                                          "norm": {"s": r.normal(size=(7,)).astype(ml_dtypes.bfloat16)}}
                                 for i in range(L)},
                      "norm": {"weight": r.normal(size=(4,)).astype(np.float32)}},
            "lm_head": {"weight": r.normal(size=(3, 4, 5)).astype(np.float32)}}
    import jax
    models = [jax.tree.map(lambda b: (b.astype(np.float32) + r.normal(size=b.shape)).astype(b.dtype), base)
              for _ in range(T)]
    return base, models


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, p) if isinstance(v, dict) else {p: v})
    return out


def expected_position(path):
    if ".layers." in path:
        return int(path.split(".layers.")[1].split(".")[0]) / (L - 1)
    return 1.0 if path.startswith("lm_head") or path.startswith("model.norm") else 0.0


def close(o, exp, dtype):
    if dtype == np.float32:
        np.testing.assert_allclose(np.asarray(o), exp, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(o, np.float32), exp.astype(dtype).astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("alpha,beta,scale", [(0.0, 1.0, 1.0), (0.3, 0.5, 0.8)])
def test_lines_matches_reference(alpha, beta, scale):
    base, models = make(3, seed=1)
    w = [0.5, 1.0, 2.0]
    out = flat(jmerge.merge(lines(alpha, beta, scale), base, models, hparams={"weight": jmerge.PerModel(w)}))
    fb, fms = flat(base), [flat(m) for m in models]
    for p, b in fb.items():
        tau = sum(wi * (fm[p].astype(np.float64) - b.astype(np.float64)) for wi, fm in zip(w, fms))
        exp = b.astype(np.float64) + scale * (alpha + beta * expected_position(p)) * tau
        assert out[p].dtype == b.dtype
        close(out[p], exp, b.dtype)


def test_lines_position_override_and_chain_after_other_merge():
    base, models = make(2, seed=2)
    # override the position of every leaf to 0.5 with Rules: uniform factor alpha + beta/2
    out = flat(jmerge.merge(lines(0.2, 0.6), base, models, hparams={"layer_position": Rules([], default=0.5)}))
    fb, fms = flat(base), [flat(m) for m in models]
    for p, b in fb.items():
        tau = sum(fm[p].astype(np.float64) - b.astype(np.float64) for fm in fms)
        close(out[p], b.astype(np.float64) + 0.5 * tau, b.dtype)
    # lines_scale chains after any aggregation (here a plain mean)
    m = jmerge.chain(jmerge.weighted_sum(1.0, normalize=True), lines_scale(0.0, 1.0))
    out = flat(jmerge.merge(m, base, models))
    p = "model.layers.1.mlp.w"
    tau = np.mean([fm[p] - fb[p] for fm in fms], axis=0)
    close(out[p], fb[p] + 0.25 * tau, np.float32)


@pytest.mark.parametrize("k,k_top,nonlayer", [(2, None, None), (1, 2, 1), (0, 1, -1)])
def test_layer_swap_matches_reference(k, k_top, nonlayer):
    base, models = make(2, seed=3)
    out = flat(jmerge.merge(layer_swap(k, outer=0, inner=1, nonlayer=nonlayer, k_top=k_top), base, models))
    kt = k if k_top is None else k_top
    fb, fms = flat(base), [flat(m) for m in models]
    for p, b in fb.items():
        if ".layers." in p:
            l = int(p.split(".layers.")[1].split(".")[0])
            src = 0 if (l < k or l >= L - kt) else 1
        else:
            src = 0 if nonlayer is None else nonlayer
        exp = b if src == -1 else fms[src][p]
        close(out[p], exp.astype(np.float64), b.dtype)


def test_layer_swap_num_layers_and_errors():
    base, models = make(2, seed=4)
    # with num_layers=8 declared, layers 0..4 are all "bottom or middle": only layer 0 from outer (k=1)
    out = flat(jmerge.merge(layer_swap(1, num_layers=8), base, models))
    fms = flat(models[0]), flat(models[1])
    close(out["model.layers.0.mlp.w"], fms[0]["model.layers.0.mlp.w"].astype(np.float64), np.float32)
    close(out["model.layers.4.mlp.w"], fms[1]["model.layers.4.mlp.w"].astype(np.float64), np.float32)
    with pytest.raises(MergeInputError):
        jmerge.merge(layer_swap(), base, models[:1])
    # select_model with per-leaf Rules
    out = flat(jmerge.merge(select_model(), base, models,
                            hparams={"source": Rules([("mlp", 1), ("lm_head", -1)], default=0)}))
    fb = flat(base)
    close(out["model.layers.2.mlp.w"], fms[1]["model.layers.2.mlp.w"].astype(np.float64), np.float32)
    close(out["lm_head.weight"], fb["lm_head.weight"].astype(np.float64), np.float32)
    close(out["model.norm.weight"], fms[0]["model.norm.weight"].astype(np.float64), np.float32)


def test_registered():
    for name in ["lines", "layer_swap"]:
        assert name in jmerge.available_methods()
