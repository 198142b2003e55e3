"""Compute dtype: a mergekit config's ``dtype`` is the dtype of the arithmetic, as in mergekit 0.1.5.

``jmerge merge`` computes in the config's ``dtype`` (without one, in the inputs' dtype); bf16/fp16 are
emulated (float32 arithmetic rounded to the dtype where torch rounds), so the numbers are mergekit's
within one step of the dtype. ``--compute-float32`` (``run_merge(compute_float32=True)``) computes in
float32; ``jmerge.merge`` computes in float32 unless given ``compute_dtype``; float64 is refused.

References are independent: a NumPy transcription of mergekit's bf16 TIES (rounding after every torch
operation), mergekit 0.1.5 run in-process (its unstable ``argsort``/``topk`` made stable, so that ties
at the top-k threshold are broken as jmerge breaks them: lowest flat index first), and ml_dtypes casts.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

import jmerge
from jmerge.cli import main
from jmerge.core.state import round_to
from jmerge.io.safetensors import open_checkpoint

NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
MANTISSA = {"bfloat16": 7, "float16": 10}


def _read(path):
    with open_checkpoint(str(path)) as r:
        return {k: r.get(k) for k in r.keys()}


def _f32(tree):
    return {k: np.asarray(v).astype(np.float32) for k, v in tree.items()}


def _rnd(x, dtype):
    return np.asarray(x, np.float32).astype(NP[dtype]).astype(np.float32)


def _beyond_one_step(a, b, dtype):
    """Entries where ``a`` and ``b`` differ by more than one step of ``dtype`` at their magnitude."""
    step = np.maximum(np.abs(a), np.abs(b)) * 2.0 ** -MANTISSA[dtype] + 2.0 ** -24
    return np.abs(a - b) > step


def _write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


# --------------------------------------------------------------------------------------------
# The rounding itself


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_to_is_the_cast_even_inside_a_fusion(dtype):
    rng = np.random.default_rng(0)
    # magnitudes 1e-36 .. 1e37 (float32 subnormals excluded: XLA:CPU flushes them to zero)
    x = (rng.choice([-1, 1], 200_000) * rng.uniform(1, 2, 200_000) * np.logspace(-36, 37, 200_000)).astype(np.float32)
    x = np.concatenate([x, np.float32([65504, 65519, 65520, -7e4, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 0.0, -0.0,
                                       np.inf, -np.inf])])
    with np.errstate(over="ignore"):  # float16 overflows to inf, as intended
        want = (x * np.float32(3)).astype(NP[dtype]).astype(np.float32) * np.float32(0.5)
    # XLA may drop a cast pair inside a fusion; round_to must round anyway
    got = np.asarray(jax.jit(lambda v: round_to(v * 3.0, dtype) * 0.5)(x))
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def _reduce_precision_count(compute_dtype):
    b = {"w": jnp.ones((8, 4)), "v": jnp.ones((6,))}
    ms = [{"w": jnp.full((8, 4), 1.5), "v": jnp.full((6,), 0.5)}, {"w": jnp.full((8, 4), 0.5), "v": jnp.ones((6,))}]
    method = jmerge.ties(density=0.5, weight=jmerge.PerModel([1.0, 0.7]))
    jaxpr = jax.make_jaxpr(lambda b, ms: jmerge.merge(method, b, ms, compute_dtype=compute_dtype))(b, ms)
    return str(jaxpr).count("reduce_precision")


def test_float32_mode_has_no_rounding_and_bf16_mode_has():
    assert _reduce_precision_count(None) == 0
    assert _reduce_precision_count("float32") == 0
    assert _reduce_precision_count("bfloat16") > 0


def test_ties_emulation_writes_no_full_size_intermediate():
    """The rounding fuses into TIES' passes: as in float32 (tests/test_xla_workarounds.py), the bf16
    emulation reads the models and writes only its output."""
    from jmerge.core import LeafProgram

    from .test_xla_workarounds import N, SHAPE, _full_size_buffers, _hlo

    b = jnp.zeros(SHAPE, jnp.bfloat16)
    ms = tuple(jnp.ones(SHAPE, jnp.bfloat16) for _ in range(3))
    method = jmerge.ties(density=0.2)
    prog = LeafProgram(method, compute_dtype="bfloat16")
    hp = {k: jnp.float32(v) for k, v in method.defaults.items()}
    txt = _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)
    assert "reduce-precision" in txt
    assert _full_size_buffers(txt, N) == []


# --------------------------------------------------------------------------------------------
# Python API


def _numpy_mergekit_ties_bf16(base, models, weights, density):
    """mergekit's TIES (``normalize: true``) in bf16, transcribed to NumPy: torch rounds each operation's
    result to bf16; its reductions accumulate in float32 and round once. Ties at the top-k threshold:
    lowest flat index first (a stable sort)."""
    r = lambda x: _rnd(x, "bfloat16")
    b = r(base)
    w = r(np.float32(weights))
    deltas = []
    for m, wt in zip(models, w):
        tau = r(r(m) - b)
        k = max(1, int(density * tau.size))
        keep = np.zeros(tau.size, bool)
        keep[np.argsort(-np.abs(tau).ravel(), kind="stable")[:k]] = True
        deltas.append(r(tau * keep.reshape(tau.shape) * wt))
    d = np.stack(deltas)
    sign = np.where(r(d.sum(0)) >= 0, 1.0, -1.0)
    agree = np.sign(d) == sign
    mixed = r(np.where(agree, d, 0).sum(0))
    div = r(np.where(agree, w.reshape(-1, *[1] * b.ndim), 0).sum(0))
    mixed = r(mixed / np.where(div == 0, 1, div))
    return r(b + mixed)


def _random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_normal((48, 40)) * 0.05 * scale).astype(np.float32),
            "b": (rng.standard_normal((40,)) * 0.05 * scale).astype(np.float32)}


def test_api_default_is_float32_and_bf16_option_is_mergekits_bf16_ties():
    base = _random_tree(0)
    models = [{k: v + 0.01 * _random_tree(s)[k] for k, v in base.items()} for s in (1, 2, 3)]
    weights, density = [1.0, 0.7, 0.3], 0.4
    method = jmerge.ties(density=density, weight=jmerge.PerModel(weights), normalize_by="weight", rounding="floor")
    f32 = _f32(jmerge.merge(method, base, models))
    for opt in (None, "float32"):
        np.testing.assert_array_equal(_f32(jmerge.merge(method, base, models, compute_dtype=opt))["w"], f32["w"])
    bf = _f32(jmerge.merge(method, base, models, compute_dtype="bfloat16", out_dtype=jnp.float32))
    for k in base:
        want = _numpy_mergekit_ties_bf16(base[k], [m[k] for m in models], weights, density)
        np.testing.assert_array_equal(bf[k], want, err_msg=k)
    # the emulation matters: the float32 result rounded once differs from the bf16 computation
    assert any(not np.array_equal(_rnd(f32[k], "bfloat16"), bf[k]) for k in base)


def test_api_emulation_keeps_hyperparameters_traced():
    base = _random_tree(0)
    models = [{k: v + 0.01 * _random_tree(s)[k] for k, v in base.items()} for s in (1, 2)]
    method = jmerge.ties(density=0.5)
    before = jmerge.trace_count()
    outs = [jmerge.merge(method, base, models, hparams={"weight": jmerge.PerModel([1.0, w])}, compute_dtype="float16")
            for w in (0.3, 0.6, 0.9)]
    assert jmerge.trace_count() - before <= len(base)  # one compile per leaf shape, not per value
    assert not np.array_equal(np.asarray(outs[0]["w"]), np.asarray(outs[2]["w"]))


def test_api_float64_is_refused():
    base = _random_tree(0)
    with pytest.raises(jmerge.MergeInputError, match="float64"):
        jmerge.merge(jmerge.task_arithmetic(), base, [base], compute_dtype="float64")
    with pytest.raises(jmerge.MergeInputError, match="not supported"):
        jmerge.merge(jmerge.task_arithmetic(), base, [base], compute_dtype="int8")


# --------------------------------------------------------------------------------------------
# The CLI: dtype is the compute dtype; --compute-float32


def _ties_config(tiny_base, tiny_fts, **extra):
    return {"merge_method": "ties", "base_model": tiny_base,
            "models": [{"model": f, "parameters": {"weight": w, "density": d}}
                       for f, w, d in zip(tiny_fts, (1.0, 0.7, 0.5), (0.5, 0.3, 0.7))], **extra}


def test_cli_computes_in_dtype_and_compute_float32_computes_in_float32(tiny_base, tiny_fts, tmp_path):
    cfg = _write_config(tmp_path / "ties.yml", _ties_config(tiny_base, tiny_fts))
    assert main(["merge", cfg, str(tmp_path / "default"), "--quiet"]) == 0
    assert main(["merge", cfg, str(tmp_path / "f32"), "--quiet", "--compute-float32"]) == 0
    cfg32 = _write_config(tmp_path / "ties32.yml", _ties_config(tiny_base, tiny_fts, dtype="float32",
                                                                out_dtype="bfloat16"))
    assert main(["merge", cfg32, str(tmp_path / "dtype32"), "--quiet"]) == 0
    default, f32, dtype32 = (_read(tmp_path / d) for d in ("default", "f32", "dtype32"))
    base, fts = _read(tiny_base), [_read(f) for f in tiny_fts]
    plan = jmerge.load_config(cfg)
    api_bf16 = jmerge.merge(plan.build(), base, fts, hparams=plan.hparams, compute_dtype="bfloat16")
    api_f32 = jmerge.merge(plan.build(), base, fts, hparams=plan.hparams)
    differs = 0
    for k in base:
        assert default[k].dtype == f32[k].dtype == base[k].dtype
        # the pipeline's default is the in-memory merge computed in the inputs' dtype (bf16) ...
        np.testing.assert_array_equal(default[k].astype(np.float32), np.asarray(api_bf16[k]).astype(np.float32))
        # ... and --compute-float32 is the float32 computation, as a config with dtype: float32
        np.testing.assert_array_equal(f32[k].astype(np.float32), np.asarray(api_f32[k]).astype(np.float32))
        np.testing.assert_array_equal(f32[k].astype(np.float32), dtype32[k].astype(np.float32))
        differs += int((default[k] != f32[k]).sum())
    assert differs > 0


def test_cli_dtype_float64_is_refused_or_computed_in_float32(tiny_base, tiny_fts, tmp_path, capsys):
    cfg = _write_config(tmp_path / "ta64.yml", {
        "merge_method": "task_arithmetic", "base_model": tiny_base,
        "models": [{"model": f, "parameters": {"weight": 0.5}} for f in tiny_fts[:2]], "dtype": "float64"})
    assert main(["merge", cfg, str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{cfg}:" in err and ": dtype:" in err and "--compute-float32" in err
    assert not os.path.exists(tmp_path / "o")
    assert main(["merge", cfg, str(tmp_path / "o"), "--quiet", "--compute-float32"]) == 0
    got, base, fts = _read(tmp_path / "o"), _read(tiny_base), [_read(f) for f in tiny_fts[:2]]
    for k in base:
        assert got[k].dtype == np.float64
        b = base[k].astype(np.float32)
        want = b + sum(np.float32(0.5) * (f[k].astype(np.float32) - b) for f in fts)
        np.testing.assert_allclose(got[k], want.astype(np.float64), rtol=1e-6, atol=1e-7, err_msg=k)


def test_cli_float64_inputs_without_dtype_are_refused(tmp_path, capsys):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    for name in ("base", "ft"):
        os.makedirs(tmp_path / name)
        save_file({"layer.weight": rng.standard_normal((4, 6))}, str(tmp_path / name / "model.safetensors"))
    cfg = _write_config(tmp_path / "c.yml", {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                                             "models": [{"model": str(tmp_path / "ft")}]})
    assert main(["merge", cfg, str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "float64" in err and "layer.weight" in err and not os.path.exists(tmp_path / "o")
    assert main(["merge", cfg, str(tmp_path / "o"), "--quiet", "--compute-float32"]) == 0


# --------------------------------------------------------------------------------------------
# mergekit run live with the same dtype


@pytest.fixture
def stable_mergekit(monkeypatch):
    """mergekit's ``run_merge`` with ``torch.argsort`` and ``torch.topk`` stable (ties: lowest index first)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    argsort = torch.argsort

    def stable_argsort(x, *a, **kw):
        return argsort(x, *a, **{**kw, "stable": True})

    def stable_topk(x, k, dim=-1, largest=True, sorted=True):
        idx = argsort(x, dim=dim, descending=largest, stable=True).narrow(dim, 0, k)
        return x.gather(dim, idx), idx

    monkeypatch.setattr(torch, "argsort", stable_argsort)
    monkeypatch.setattr(torch, "topk", stable_topk)

    def run(cfg, out):
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0))
        return _read(out)

    return run


def _live_config(method, base, fts):
    models = [{"model": f, "parameters": {"weight": w}} for f, w in zip(fts, (1.0, 0.6, 0.3))]
    return {
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": f, "parameters": {"weight": w, "density": d}}
                            for f, w, d in zip(fts, (1.0, 0.7, 0.5), (0.5, 0.3, 0.7))]},
        "linear": {"merge_method": "linear", "models": models},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": models,
                            "parameters": {"lambda": 0.9}},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": f} for f in fts],
                "parameters": {"select_topk": 0.5}},
    }[method]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["ties", "linear", "task_arithmetic", "slerp"])
def test_live_mergekit_same_dtype(method, dtype, stable_mergekit, tiny_base, tiny_fts, tmp_path):
    cfg = {**_live_config(method, tiny_base, tiny_fts), "dtype": dtype}
    want = stable_mergekit(cfg, tmp_path / "mk")
    assert main(["merge", _write_config(tmp_path / "c.yml", cfg), str(tmp_path / "jm"), "--quiet"]) == 0
    got = _read(tmp_path / "jm")
    assert set(got) == set(want)
    equal = total = 0
    for k in want:
        a, b = got[k].astype(np.float32), want[k].astype(np.float32)
        assert got[k].dtype == np.dtype(NP[dtype]), k
        bad = np.flatnonzero(_beyond_one_step(a, b, dtype))
        assert bad.size == 0, f"{method} {dtype} {k}: {bad.size} entries, e.g. {a.ravel()[bad[:3]]} vs {b.ravel()[bad[:3]]}"
        equal += int((a == b).sum())
        total += a.size
    # the emulation rounds where torch rounds: nearly every entry is bit-identical (measured: all of them
    # for TIES and task arithmetic; linear and slerp add in another order, ~1e-3 of entries one step apart)
    assert equal >= 0.995 * total, f"{method} {dtype}: {total - equal}/{total} entries differ"


def test_live_mergekit_sce_bf16_every_entry(stable_mergekit, tiny_base, tiny_fts, tmp_path):
    """SCE's variance top-k sets tensor-wide task weights, so the goldens exclude tensors with a tie at the
    threshold; with mergekit's top-k made stable every entry is compared."""
    cfg = {**_live_config("sce", tiny_base, tiny_fts), "dtype": "bfloat16"}
    want = stable_mergekit(cfg, tmp_path / "mk")
    assert main(["merge", _write_config(tmp_path / "c.yml", cfg), str(tmp_path / "jm"), "--quiet"]) == 0
    got = _read(tmp_path / "jm")
    for k in want:
        a, b = got[k].astype(np.float32), want[k].astype(np.float32)
        assert not _beyond_one_step(a, b, "bfloat16").any(), k
