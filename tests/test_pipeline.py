"""Out-of-core pipeline: results vs NumPy references, whole-model statistics pass, tied embeddings, dtypes,
atomic output, compile reuse."""

from __future__ import annotations

import glob
import os

import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import parse_config
from jmerge.pipeline import plan_summary, run_merge


def _read_all(path):
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}, {k: r.dtype(k) for k in r.keys()}


def _interp(values, t):
    s = t * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (s - i0)) * values[i0] + (s - i0) * values[i1]


def test_task_arithmetic_matches_numpy_with_gradients_and_filters(tiny_base, tiny_fts, tmp_path):
    cfg = f"""
merge_method: task_arithmetic
base_model: {tiny_base}
models:
  - model: {tiny_fts[0]}
    parameters:
      weight: [0.2, 1.0]
  - model: {tiny_fts[1]}
    parameters:
      weight:
        - filter: mlp
          value: 0.6
        - value: -0.3
  - model: {tiny_fts[2]}
    parameters: {{weight: 0.5}}
parameters:
  lambda: 0.8
dtype: float32
out_dtype: float32
"""
    plan = parse_config(cfg)
    out = tmp_path / "out"
    info = run_merge(plan, str(out), quiet=True)
    got, dts = _read_all(out)
    base, _ = _read_all(tiny_base)
    fts = [_read_all(p)[0] for p in tiny_fts]
    assert set(got) == set(base) and info["tensors"] == len(base)
    n_layers = jmerge.count_layers(list(base))
    for k, b in base.items():
        assert dts[k] == np.float32
        li = jmerge.layer_index(k)
        t = 0.0 if li is None else li / (n_layers - 1)
        w = [_interp([0.2, 1.0], t), 0.6 if "mlp" in k else -0.3, 0.5]
        b32 = b.astype(np.float32)
        ref = b32 + np.float32(0.8) * sum(np.float32(wi) * (f[k].astype(np.float32) - b32) for wi, f in zip(w, fts))
        np.testing.assert_allclose(got[k], ref, rtol=1e-6, atol=1e-7, err_msg=k)
    # aux files and model card
    assert os.path.isfile(out / "config.json") and "task_arithmetic" in (out / "README.md").read_text()
    assert "lambda: 0.8" in (out / "README.md").read_text()


def test_out_of_core_equals_in_memory_including_global_stats(tiny_base, tiny_fts, tmp_path, monkeypatch):
    # scope: global needs the whole-model statistics pass (global top-k)
    import jmerge.pipeline.executor as ex
    passes = []
    stream = ex._stream
    monkeypatch.setattr(ex, "_stream", lambda *a, **k: (passes.append(1), stream(*a, **k))[1])
    cfg = f"""
merge_method: ties
base_model: {tiny_base}
models:
  - model: {tiny_fts[0]}
  - model: {tiny_fts[1]}
  - model: {tiny_fts[2]}
parameters: {{density: 0.3, weight: 1.0}}
scope: global
"""
    plan = parse_config(cfg)
    run_merge(plan, str(tmp_path / "o"), quiet=True, window=2)
    # finished searches skip their phases: the sample pass, counting passes until the k-th key is found
    # (a few on smooth data), the merge pass -- not one read per phase of the method
    n_phases = len(plan.build().stats)
    assert 3 <= len(passes) < n_phases, (len(passes), n_phases)
    got, dts = _read_all(tmp_path / "o")
    base, bdt = _read_all(tiny_base)
    fts = [_read_all(p)[0] for p in tiny_fts]
    ref = jmerge.merge(plan.build(), base, fts, hparams=plan.hparams, compute_dtype="bfloat16")  # as `jmerge merge`
    for k in base:
        assert dts[k] == bdt[k]
        np.testing.assert_array_equal(got[k].astype(np.float32), np.asarray(ref[k]).astype(np.float32), err_msg=k)
    # global top-k keeps ~30% of each task's entries over the whole model, not per tensor: the merged delta
    # is nonzero somewhere it would not be with per-tensor trimming, and differs from the per-tensor result
    plan_t = parse_config(cfg.replace("scope: global", ""))
    run_merge(plan_t, str(tmp_path / "t"), quiet=True)
    got_t, _ = _read_all(tmp_path / "t")
    assert any(not np.array_equal(got[k], got_t[k]) for k in base)


def test_tied_embeddings_and_missing_head(tiny_tied, tmp_path):
    base, fts = tiny_tied
    cfg = f"merge_method: linear\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {f}\n" for f in fts)
    run_merge(parse_config(cfg), str(tmp_path / "o"), quiet=True)
    got, _ = _read_all(tmp_path / "o")
    want, _ = _read_all(fts[0])
    assert set(got) == set(want) and "lm_head.weight" not in got
    f = [_read_all(p)[0] for p in fts]
    k = "model.embed_tokens.weight"
    ref = ((f[0][k].astype(np.float32) + f[1][k].astype(np.float32)) / 2).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got[k].astype(np.float32), ref.astype(np.float32))


def test_untied_output_from_tied_model_uses_embeddings(tiny_base, tiny_tied, tmp_path):
    # base has lm_head; the tied model does not: its head is its input embedding
    tb, tfts = tiny_tied
    with open_checkpoint(tiny_base) as r:
        if r.shape("model.embed_tokens.weight") != open_checkpoint(tfts[0]).shape("model.embed_tokens.weight"):
            pytest.skip("tied fixture has another shape")
    cfg = f"merge_method: linear\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_base}\n  - model: {tfts[0]}\n"
    run_merge(parse_config(cfg), str(tmp_path / "o"), quiet=True)
    got, _ = _read_all(tmp_path / "o")
    b, _ = _read_all(tiny_base)
    t, _ = _read_all(tfts[0])
    ref = ((b["lm_head.weight"].astype(np.float32) + t["model.embed_tokens.weight"].astype(np.float32)) / 2)
    np.testing.assert_array_equal(got["lm_head.weight"].astype(np.float32),
                                  ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_failure_mid_merge_leaves_nothing(tiny_base, tiny_fts, tmp_path):
    cfg = f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n"
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_merge(parse_config(cfg), str(out), quiet=True, _fail_after=3)
    assert not out.exists() and glob.glob(str(tmp_path / ".*")) == []


def test_existing_output_is_refused_then_overwritten(tiny_base, tiny_fts, tmp_path):
    cfg = f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(jmerge.MergeInputError, match="already exists"):
        run_merge(parse_config(cfg), str(out), quiet=True)
    assert (out / "keep.txt").exists()
    run_merge(parse_config(cfg), str(out), quiet=True, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_compiled_once_per_shape(tiny_base, tiny_fts, tmp_path):
    cfg = (f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n"
           f"  - model: {tiny_fts[1]}\nparameters:\n  weight: [0.1, 0.9, 0.3]\n  lambda: 0.77\n")
    with open_checkpoint(tiny_base) as r:
        n_shapes = len({(r.shape(k), r.dtype(k)) for k in r.keys()})
        n_tensors = len(r.keys())
    before = jmerge.trace_count()
    run_merge(parse_config(cfg), str(tmp_path / "a"), quiet=True)
    traced = jmerge.trace_count() - before
    assert traced <= n_shapes < n_tensors
    # other hyperparameter values: no new compile
    before = jmerge.trace_count()
    run_merge(parse_config(cfg.replace("0.77", "0.5")), str(tmp_path / "b"), quiet=True)
    assert jmerge.trace_count() == before


def test_sharded_output_and_dry_run_summary(tiny_base, tiny_fts, tmp_path):
    cfg = f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n"
    plan = parse_config(cfg)
    run_merge(plan, str(tmp_path / "o"), quiet=True, max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "o"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    got, _ = _read_all(tmp_path / "o")
    base, _ = _read_all(tiny_base)
    assert set(got) == set(base)
    s = plan_summary(plan)
    assert "model.layers.*.mlp.up_proj.weight x" in s and "peak memory estimate" in s and "output tensors: " in s


def test_passthrough_slices_rename_layers(tiny_base, tiny_fts, tmp_path):
    cfg = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {tiny_base}
        layer_range: [0, 1]
  - sources:
      - model: {tiny_fts[0]}
        layer_range: [1, 3]
"""
    run_merge(parse_config(cfg), str(tmp_path / "o"), quiet=True)
    got, _ = _read_all(tmp_path / "o")
    b, _ = _read_all(tiny_base)
    f, _ = _read_all(tiny_fts[0])
    k = "self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[f"model.layers.0.{k}"], b[f"model.layers.0.{k}"])
    np.testing.assert_array_equal(got[f"model.layers.1.{k}"], f[f"model.layers.1.{k}"])
    np.testing.assert_array_equal(got[f"model.layers.2.{k}"], f[f"model.layers.2.{k}"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["model.norm.weight"], f["model.norm.weight"])
    import json
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 3


def test_integer_tensors_are_copied_not_merged(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": rng.normal(size=(4, 6)).astype(np.float32), "position_ids": np.arange(8, dtype=np.int64) + i},
                  str(d / "model.safetensors"))
        paths.append(str(d))
    cfg = f"merge_method: task_arithmetic\nbase_model: {paths[0]}\nmodels:\n  - model: {paths[1]}\n  - model: {paths[2]}\n"
    plan = parse_config(cfg)
    assert "position_ids x1 (8,) int64->int64" in plan_summary(plan)
    run_merge(plan, str(tmp_path / "o"), quiet=True)
    got, dts = _read_all(tmp_path / "o")
    np.testing.assert_array_equal(got["position_ids"], np.arange(8))
    assert dts["position_ids"] == np.int64
    ws = [_read_all(p)[0]["w"] for p in paths]
    np.testing.assert_allclose(got["w"], ws[1] + ws[2] - ws[0], rtol=1e-6, atol=1e-6)


def test_progress_shows_compiling_as_its_own_phase(tiny_base, tiny_fts, tmp_path):
    import io as _io
    import jmerge.pipeline.executor as ex
    cfg = f"merge_method: ties\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n  - model: {tiny_fts[1]}\n"
    plan = parse_config(cfg)
    stream = _io.StringIO()
    orig = ex.Progress
    ex.Progress = lambda total, disable=False: orig(total, disable=False, stream=stream)
    try:
        run_merge(plan, str(tmp_path / "o"), quiet=False)
    finally:
        ex.Progress = orig
    lines = stream.getvalue().splitlines()
    assert "jmerge: compiling" in lines and "jmerge: merging" in lines and "jmerge: done" in lines
    assert lines.index("jmerge: compiling") < lines.index("jmerge: merging")
    assert "100.0%" in lines[-1]


def _stacked_vs_tuple(name, precision):
    """One leaf merged with the models as a tuple and stacked in one array (as the executor reads them)."""
    import jax
    import jax.numpy as jnp

    from jmerge.core import LeafProgram, infer_views, leaf_key, prepare_leaf_hparams
    from jmerge.methods import METHODS
    try:
        method = METHODS[name]()
    except TypeError:
        pytest.skip(f"{name} needs arguments")
    T = max(method.min_models, min(3, method.max_models or 3))
    path, shape = "model.layers.0.mlp.up_proj.weight", (24, 16)
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    base = (rng.standard_normal(shape) * 0.02).astype(bf16)
    models = np.stack([(base.astype(np.float32) + rng.standard_normal(shape).astype(np.float32) * 2e-3).astype(bf16)
                       for _ in range(T)])
    hp = {k: np.asarray(v, np.float32) for k, v in prepare_leaf_hparams(method, [path], T)[0].items()}
    view = infer_views([path], [shape])[0]
    prog, key = LeafProgram(method, compute_dtype=precision), leaf_key(0, path)
    stats: dict = {}
    for pi, (_, sname, phase) in enumerate(prog.phases):
        a = prog.collect(pi, base, tuple(models), hp, key, stats, view)
        b = prog.collect(pi, base, models, hp, key, stats, view, models_stacked=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        stats.setdefault(sname, {})[phase.name] = prog.finalize(pi, [a], [hp])[0]
    want = prog(base, tuple(models), hp, key, stats, view)
    got = prog(base, models, hp, key, stats, view, models_stacked=True)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16), err_msg=name)


@pytest.mark.parametrize("name", sorted(__import__("jmerge.methods", fromlist=["METHODS"]).METHODS))
def test_models_read_into_one_array_give_the_same_bits(name):
    _stacked_vs_tuple(name, None)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "linear", "slerp"])
def test_models_read_into_one_array_give_the_same_bits_in_bf16(name):
    _stacked_vs_tuple(name, "bfloat16")


def test_models_stacked_needs_model_leaves():
    from jmerge.core import LeafProgram, MergeInputError
    prog = LeafProgram(jmerge.task_arithmetic(), stacked=True)
    with pytest.raises(MergeInputError, match="models_stacked"):
        prog(np.zeros(3, np.float32), np.zeros((2, 3), np.float32), {}, None, models_stacked=True)


@pytest.mark.parametrize("fsync,chunk", [(True, None), (True, 3 * 4096), (False, None)])
def test_writer_direct_io_writes_the_same_bytes_in_any_order(tmp_path, monkeypatch, fsync, chunk):
    """O_DIRECT (with fsync, where the file system allows it) writes every byte as buffered writes do: whole
    blocks direct, edges shared with neighbours or the header assembled, odd sizes, any order, several shards
    sharing one staging buffer (also one of 3 blocks, which most writes pass through in several pieces)."""
    from jmerge.io import safetensors as st
    if chunk is not None:
        monkeypatch.setattr(st, "_DIO_CHUNK", chunk)
    rng = np.random.default_rng(1)
    sizes = [1, 3, 2047, 2048, 2049, 4096, 5000, 1 << 16, 3 * 4096 + 7, 12345, 2, 700_001]
    dts = [np.float32, ml_dtypes.bfloat16, np.uint8, np.float16]
    layout, data = [], {}
    for i, n in enumerate(sizes):
        dt = np.dtype(dts[i % len(dts)])
        a = rng.integers(0, 255, n * dt.itemsize, dtype=np.uint8).view(dt)
        layout.append((f"t{i}", (n,), dt))
        data[f"t{i}"] = a
    out = tmp_path / f"o{int(fsync)}"
    w = st.CheckpointWriter(out, layout, max_shard_bytes=1 << 20, fsync=fsync)
    direct = [d is not None for d in w._direct]
    if any(direct):  # one staging buffer for both shards, of the chunk's size (or the largest file's, when smaller)
        assert len({id(d.bounce) for d in w._direct if d is not None}) == 1
        per_shard = [sum(nb for s, _, nb in w._where.values() if s == i) for i in range(2)]
        assert w._direct[0].bounce.size == (chunk or -(-(max(per_shard) + (1 << 20)) // 4096) * 4096)
    assert len(w.shard_files) == 2
    for k in rng.permutation(list(data)):
        w.write(str(k), data[str(k)])
    w.commit()
    assert (len(set(direct)) == 1) if fsync else not any(direct)  # direct only with fsync, then for every shard
    with open_checkpoint(out) as r:
        for k, a in data.items():
            np.testing.assert_array_equal(r.get(k).view(np.uint8), a.view(np.uint8), err_msg=k)
    # the same layout written buffered, in storage order: identical files byte for byte
    ref = tmp_path / f"ref{int(fsync)}"
    w2 = st.CheckpointWriter(ref, layout, max_shard_bytes=1 << 20, fsync=False)
    for k, a in data.items():
        w2.write(k, a)
    w2.commit()
    for f in w.shard_files:
        assert (out / f).read_bytes() == (ref / f).read_bytes()


def test_writer_falls_back_to_buffered_when_direct_io_is_refused(tmp_path, monkeypatch):
    import errno

    from jmerge.io import safetensors as st

    def refuse(self, data, off):
        raise OSError(errno.EINVAL, "refused")

    layout = [("a", (5000,), np.float32), ("b", (3,), np.float32), ("c", (4096,), np.uint8)]
    vals = {"a": np.arange(5000, dtype=np.float32), "b": np.ones(3, np.float32), "c": np.arange(4096).astype(np.uint8)}
    w = st.CheckpointWriter(tmp_path / "o", layout, fsync=True)
    w.write("b", vals["b"])  # edges only: assembled in memory
    monkeypatch.setattr(st._DirectFile, "_direct", refuse)
    w.write("a", vals["a"])  # refused: the shard turns buffered (header and "b" written first)
    w.write("c", vals["c"])
    w.commit()
    with open_checkpoint(tmp_path / "o") as r:
        for k, v in vals.items():
            np.testing.assert_array_equal(r.get(k), v)
