"""A tensor merged as fixed-size chunks of its flat entries (``jmerge.core.chunks``): the per-tensor TIES trim
as a whole-model top-k over the chunks with the per-tensor count. Results must be bit-identical to the
per-tensor program (and to NumPy's TIES from the paper), in memory and through ``jmerge merge``."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.core import LeafProgram, prepare_leaf_hparams
from jmerge.core import select as sel
from jmerge.core.chunks import chunked_form, merge_chunked
from jmerge.io.safetensors import open_checkpoint
from tests._trees import np_topk

T = 3


def _hp(method, **over):
    """The resolved hyperparameters of one leaf, as the pipeline passes them."""
    return prepare_leaf_hparams(method, ["x"], T, hparams=over)[0]


def _inputs(shape, seed, kind):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape).astype(np.float32)
    if kind == "smooth":
        ms = np.stack([b + 0.01 * rng.standard_normal(shape).astype(np.float32) for _ in range(T)])
    else:  # heavy ties: few distinct magnitudes, half the entries unchanged (exact zeros in tau)
        ms = np.stack([b + np.round(4 * rng.standard_normal(shape)).astype(np.float32) * (rng.random(shape) < 0.5)
                       for _ in range(T)])
    return b.astype(ml_dtypes.bfloat16), ms.astype(ml_dtypes.bfloat16)


def _joined(pieces, last, shape):
    parts = [np.asarray(p) for p in pieces]
    parts[-1] = parts[-1][:last]
    return np.concatenate(parts).reshape(shape)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("rounding", ["round", "floor", "authors"])
def test_tensor_topk_count_is_the_traced_trim_count(rounding):
    dens = np.array([0.0, 1e-9, 1e-7, 0.1, 0.2, 1 / 3, 0.5, 0.55, 0.7, 0.999999, 1.0], np.float32)
    sizes = [1, 2, 7, 1000, 4097, 2 ** 24 + 1, 16777219, 65_536_000, 123_456_789, 2 ** 30 + 3]
    from jmerge.methods.sparsify import _count  # the traced arithmetic of the per-tensor trim
    for n in sizes:
        traced = np.asarray(jax.jit(lambda d, n=n: _count(d, n, rounding))(dens))
        if rounding == "floor":
            traced = np.where(dens > 0, np.maximum(traced, min(1, n)), traced)
        host = sel.tensor_topk_count(dens, n, rounding)
        np.testing.assert_array_equal(host, traced.astype(np.int64), err_msg=f"n={n}")
    # the float32 arithmetic matters: float64 would keep another count here
    d, n = np.float32(0.3), 123_456_789
    assert sel.tensor_topk_count(d, n, "round") != np.round(np.float64(d) * n)


def test_chunked_form_only_for_elementwise_chains_with_a_tensor_trim():
    assert chunked_form(jmerge.ties()) is not None
    assert chunked_form(jmerge.ties(rounding="floor", normalize_by="weight", reduce="sum")) is not None
    form = chunked_form(jmerge.ties(density=0.3))
    assert [n for n, _ in form.steps] == ["trim", "elect_sign", "disjoint_merge", "scale"]
    assert dict(form.step("trim").static)["scope"] == "global" and form.stats
    assert form.hparams == jmerge.ties(density=0.3).hparams  # the same hyperparameters by the same names
    for m in (jmerge.ties(scope="global"), jmerge.task_arithmetic(), jmerge.dare_ties(), jmerge.breadcrumbs_ties(),
              jmerge.della(), jmerge.dare_ties(trim_density=0.2)):
        assert chunked_form(m) is None, m.name
    from jmerge.kernels import backend
    with backend.merge_backend("pallas"):  # methods built here use the fused kernel's route
        assert chunked_form(jmerge.ties()) is None  # the fused kernel's route is per tensor


@pytest.mark.parametrize("rounding", ["round", "floor", "authors"])
@pytest.mark.parametrize("kind", ["smooth", "ties"])
@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_chunks_give_the_bits_of_the_per_tensor_program(rounding, kind, precision):
    method = jmerge.ties(rounding=rounding, normalize_by="weight")
    p, pc = LeafProgram(method), LeafProgram(chunked_form(method))
    key = jax.random.key(0)
    for shape, dens in (((37, 53), 0.2), ((64, 64), [0.0, 0.55, 1.0]), ((5000,), 0.7), ((3, 5, 7), 1e-3)):
        b, ms = _inputs(shape, hash((shape, kind)) % 1000, kind)
        hp = _hp(method, density=jmerge.PerModel(dens) if isinstance(dens, list) else dens,
                 weight=jmerge.PerModel([1.0, 0.5, 2.0]))
        ref = p(b, ms, hp, key, {}, None, compute_dtype=precision, models_stacked=True)
        for chunk in (64, 1000, int(np.prod(shape))):
            pieces, last = merge_chunked(pc, b, ms, hp, key, compute_dtype=precision, chunk=chunk)
            assert len(pieces) == -(-int(np.prod(shape)) // chunk)
            got = _joined(pieces, last, shape)
            assert got.dtype == np.asarray(ref).dtype
            np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=f"{shape} chunk={chunk}")


def test_chunks_radix_fallback_and_per_model_counts_give_the_same_bits(monkeypatch):
    # one counting phase only: searches that have not converged finish with the radix histograms
    monkeypatch.setattr(sel, "_G_PASSES", 1)
    method = jmerge.ties(density=jmerge.PerModel([0.1, 0.35, 0.9]), rounding="floor")
    form = chunked_form(method)
    assert len(form.stats) == 4  # sample, one count, hi, lo
    p, pc = LeafProgram(method), LeafProgram(form)
    b, ms = _inputs((97, 31), 3, "ties")
    hp = _hp(method)
    ref = p(b, ms, hp, jax.random.key(1), {}, None, models_stacked=True)
    pieces, last = merge_chunked(pc, b, ms, hp, jax.random.key(1), chunk=500)
    np.testing.assert_array_equal(_bits(_joined(pieces, last, b.shape)), _bits(ref))


def test_chunks_match_numpy_ties_from_the_paper():
    shape = (50, 41)
    b, ms = _inputs(shape, 7, "ties")
    b32, m32 = b.astype(np.float32), ms.astype(np.float32)
    tau = m32 - b32[None]
    dens, lam = 0.3, 0.9
    k = int(np.round(np.float32(dens) * np.float32(tau[0].size)))
    kept = np.stack([np.where(np_topk(np.abs(tau[t]).ravel(), k).reshape(shape), tau[t], 0) for t in range(T)])
    sign = np.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(kept) == sign) & (kept != 0)
    cnt = agree.sum(0)
    want = b32 + lam * np.where(agree, kept, 0).sum(0) / np.where(cnt == 0, 1, cnt)
    method = jmerge.ties(density=dens, scale=lam)
    pieces, last = merge_chunked(LeafProgram(chunked_form(method)), b, ms, _hp(method), jax.random.key(0),
                                 out_dtype="float32", chunk=256)
    np.testing.assert_allclose(_joined(pieces, last, shape), want, rtol=1e-6, atol=1e-6)


def _read(path):
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _ties_yaml(base, fts, extra=""):
    models = "".join(f"  - model: {f}\n    parameters: {{weight: {w}}}\n" for f, w in zip(fts, (1.0, 0.6, 0.3)))
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
            f"parameters: {{density: 0.35, normalize: true}}\ndtype: bfloat16\n{extra}")


@pytest.mark.parametrize("extra", ["", "parameters: {density: [0.1, 0.9], normalize: false, lambda: 0.8}\n"])
def test_merge_through_chunks_writes_the_same_bytes(tiny_base, tiny_fts, tmp_path, monkeypatch, extra):
    import jmerge.pipeline.executor as ex
    from jmerge.mergekit import parse_config
    from jmerge.pipeline import run_merge
    cfg = _ties_yaml(tiny_base, tiny_fts)
    if extra:
        cfg = cfg.replace("parameters: {density: 0.35, normalize: true}\n", extra)
    run_merge(parse_config(cfg), str(tmp_path / "ref"), quiet=True)
    calls = []
    real = ex.merge_chunked
    monkeypatch.setattr(ex, "merge_chunked", lambda *a, **k: (calls.append(a[1].size), real(*a, **k))[1])
    monkeypatch.setattr(ex, "CHUNK_ENTRIES", 1000)
    with open_checkpoint(tiny_base) as r:
        shapes = {tuple(r.shape(k)) for k in r.keys()}
    for cf32 in (False, True):
        out = tmp_path / f"chunked{cf32}"
        before = jmerge.trace_count()
        run_merge(parse_config(cfg), str(out), quiet=True, compute_float32=cf32)
        # one merge program for every chunked shape (and one per small shape, already compiled for cf32=False)
        assert jmerge.trace_count() - before <= 2 < len(shapes)
        ref_dir = tmp_path / "ref"
        if cf32:
            monkeypatch.setattr(ex, "CHUNK_ENTRIES", 10 ** 12)
            run_merge(parse_config(cfg), str(tmp_path / "ref32"), quiet=True, compute_float32=True)
            monkeypatch.setattr(ex, "CHUNK_ENTRIES", 1000)
            ref_dir = tmp_path / "ref32"
        got, ref = _read(out), _read(ref_dir)
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype, k
            np.testing.assert_array_equal(_bits(got[k]), _bits(ref[k]), err_msg=k)
    with open_checkpoint(tiny_base) as r:
        big = sum(int(np.prod(r.shape(k))) >= 1000 for k in r.keys())
        small = sum(int(np.prod(r.shape(k))) < 1000 for k in r.keys())
    assert big and small and len(calls) == 2 * big  # large tensors went through chunks, small ones did not


@pytest.mark.parametrize("cf32", [False, True])
def test_chunks_streamed_from_the_checkpoints_write_the_same_bytes(cf32, tiny_base, tiny_fts, tmp_path, monkeypatch):
    """Large tensors merged chunk by chunk straight from the files (every pass reads the chunks again; pieces
    written at their entries' place) give the bytes of the per-tensor program, with few chunks in the pool."""
    import jmerge.pipeline.executor as ex
    from jmerge.io.safetensors import CheckpointReader, CheckpointWriter
    from jmerge.mergekit import parse_config
    from jmerge.pipeline import run_merge
    cfg = _ties_yaml(tiny_base, tiny_fts)
    run_merge(parse_config(cfg), str(tmp_path / "ref"), quiet=True, compute_float32=cf32)
    monkeypatch.setattr(ex, "CHUNK_ENTRIES", 1000)
    monkeypatch.setattr(ex, "STREAM_BYTES", 0)
    monkeypatch.setattr(ex, "merge_chunked", lambda *a, **k: pytest.fail("read whole, not streamed"))
    flat_reads, flat_writes = [], []
    real_get, real_write = CheckpointReader.get_flat, CheckpointWriter.write

    def get_flat(self, name, start, stop, out=None):
        flat_reads.append((name, start, stop))
        return real_get(self, name, start, stop, out=out)

    def write(self, name, array, rows=None, flat=None):
        if flat is not None:
            flat_writes.append((name, flat))
        return real_write(self, name, array, rows=rows, flat=flat)

    monkeypatch.setattr(CheckpointReader, "get_flat", get_flat)
    monkeypatch.setattr(CheckpointWriter, "write", write)
    run_merge(parse_config(cfg), str(tmp_path / "got"), quiet=True, compute_float32=cf32, window=2)
    if not cf32:  # the dry run says so, counting the tensors
        from jmerge.pipeline.summary import plan_summary
        with open_checkpoint(tiny_base) as r:
            n_big = sum(int(np.prod(r.shape(k))) >= 1000 for k in r.keys())
        assert f"({n_big} merged chunk by chunk from the checkpoints)" in plan_summary(parse_config(cfg))
    got, ref = _read(tmp_path / "got"), _read(tmp_path / "ref")
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(_bits(got[k]), _bits(ref[k]), err_msg=k)
    with open_checkpoint(tiny_base) as r:
        big = {k: int(np.prod(r.shape(k))) for k in r.keys() if np.prod(r.shape(k)) >= 1000}
    assert big and {n for n, _ in flat_writes} == set(big)
    for k, size in big.items():  # each piece once, in place, covering the tensor; each chunk read once per pass
        spans = sorted(f for n, f in flat_writes if n == k)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and all(b - a <= 1000 for a, b in spans)
        reads = [(s, e) for n, s, e in flat_reads if n == k]
        assert len(reads) >= 4 * 2 * len(spans)  # base and 3 models, statistics passes and the merge
        assert len(reads) % (4 * len(spans)) == 0


def test_chunk_sizes_and_fast_compile_keys():
    import jmerge.pipeline.executor as ex
    from jmerge.pipeline.jobs import Merge, Tensor, TensorJob
    C, S = ex.CHUNK_ENTRIES, ex.SMALL_CHUNK_ENTRIES
    assert (C, S) == (1 << 22, 1 << 19)
    got = [ex.chunk_entries(n) for n in (0, S - 1, S, S + 1, C - 1, C, 10 * C + 3)]
    assert got == [0, 0, S, S, S, C, C]
    bf = np.dtype(ml_dtypes.bfloat16)

    def job(shape, t=3):
        return TensorJob("w", shape, bf, Merge(Tensor(0, "w"), tuple(Tensor(i, "w") for i in range(1, t + 1))), bf)

    jobs = [job((256, 2048))] * 16 + [job((2048,))] * 17 + [job((600, 1000))] + [job((32000, 2048))] * 70
    keys = ex.fast_compile_shapes(jobs, chunked=True)
    # small chunks: 16 x 3 x 2^19 + 3 x 2 x 2^19 (600k entries padded to two chunks) entries of work: fast
    assert keys == {("chunks", S), (2048,)}
    assert ex.fast_compile_shapes(jobs) == {(256, 2048), (2048,), (600, 1000)}  # no chunked form: per shape


def _mid_models(tmp_path, monkeypatch) -> list:
    """The benchmark's Llama-shaped base and 3 fine-tunes at a size whose embedding and LM head have 576000
    entries (2^19 up to 2^22: chunks of 2^19, the second padded)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_mergekit.py"
    spec = importlib.util.spec_from_file_location("bench_vs_mergekit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.SIZES, "mid", dict(hidden=64, intermediate=160, layers=1, vocab=9000, heads=4,
                                                 kv_heads=2))
    return bench.make_models(str(tmp_path / "models"), "mid", delta=0.5)


def _spy_chunks(monkeypatch) -> list:
    """The ``(entries, chunk size)`` of every in-memory chunked merge the executor runs from now on."""
    import jmerge.pipeline.executor as ex
    sizes = []
    real = ex.merge_chunked
    monkeypatch.setattr(ex, "merge_chunked", lambda *a, **k: (sizes.append((a[1].size, k["chunk"])),
                                                              real(*a, **k))[1])
    return sizes


def test_mid_size_tensors_merge_in_small_chunks_with_the_same_bits(tmp_path, monkeypatch):
    """Tensors of 2^19 up to 2^22 entries merge in chunks of 2^19 (one program set for all their shapes) and
    give the per-tensor program's bits; the 576000-entry embedding and LM head take a padded second chunk."""
    import jmerge.pipeline.executor as ex
    from jmerge.mergekit import parse_config
    from jmerge.pipeline import run_merge
    dirs = _mid_models(tmp_path, monkeypatch)
    cfg = _ties_yaml(dirs[0], dirs[1:])
    sizes = _spy_chunks(monkeypatch)
    run_merge(parse_config(cfg), str(tmp_path / "chunks"), quiet=True)
    assert sorted(sizes) == [(576000, 1 << 19)] * 2
    monkeypatch.setattr(ex, "SMALL_CHUNK_ENTRIES", 10 ** 12)  # every tensor by the per-tensor program
    run_merge(parse_config(cfg), str(tmp_path / "whole"), quiet=True)
    assert len(sizes) == 2
    got, ref = _read(tmp_path / "chunks"), _read(tmp_path / "whole")
    assert set(got) == set(ref) and len(ref) > 5
    for k in ref:
        np.testing.assert_array_equal(_bits(got[k]), _bits(ref[k]), err_msg=k)
    kept = _bits(got["model.embed_tokens.weight"]) != _bits(_read(dirs[0])["model.embed_tokens.weight"])
    assert 0.2 < kept.mean() < 0.9  # the trim and the sign election changed a part of the entries


@pytest.mark.parametrize("case", ["ties", "ties_dtype", "ties_nonorm"])
def test_mergekit_golden_ties_configs_through_chunks(case, tmp_path, monkeypatch, in_repo_root):
    import jmerge.pipeline.executor as ex
    from jmerge.cli import main
    cfg = os.path.join("tests", "data", "mergekit", case, "config.yml")
    if not os.path.exists(cfg):
        pytest.skip("golden case not stored")
    assert main(["merge", cfg, str(tmp_path / "ref"), "--quiet"]) == 0
    calls = []
    real = ex.merge_chunked
    monkeypatch.setattr(ex, "merge_chunked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(ex, "CHUNK_ENTRIES", 300)
    assert main(["merge", cfg, str(tmp_path / "got"), "--quiet"]) == 0
    assert calls
    got, ref = _read(tmp_path / "got"), _read(tmp_path / "ref")
    for k in ref:
        np.testing.assert_array_equal(_bits(got[k]), _bits(ref[k]), err_msg=k)
    shutil.rmtree(tmp_path / "got")


def test_heavily_tied_kth_key_is_found_in_one_counting_pass():
    # bfloat16 fine-tunes: |tau| takes few values and the k-th largest is tied by many entries. The first
    # thresholds are distinct sampled keys plus centre + 1, so one counting pass brackets the tied key.
    rng = np.random.default_rng(5)
    shape = (700, 300)
    b = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    ms = np.stack([(b.astype(np.float32) + 0.01 * rng.standard_normal(shape).astype(np.float32))
                   .astype(ml_dtypes.bfloat16) for _ in range(T)])
    tau = np.abs(ms.astype(np.float32) - b.astype(np.float32))
    k = int(np.round(np.float32(0.2) * np.float32(tau[0].size)))
    kth = np.sort(tau[0].ravel())[::-1][k - 1]
    assert np.sum(tau[0] == kth) > 1000  # heavily tied
    method = jmerge.ties(density=0.2)
    pc = LeafProgram(chunked_form(method))
    ran = []
    real = pc.collect
    pc.collect = lambda pi, *a, **kw: (ran.append(pc.phases[pi][2].name), real(pi, *a, **kw))[1]
    hp = _hp(method)
    pieces, last = merge_chunked(pc, b, ms, hp, jax.random.key(0), chunk=50_000)
    counts = {n for n in ran if "/count" in n}
    assert counts == {"trim_global_topk/count0"}, sorted(set(ran))
    ref = LeafProgram(method)(b, ms, hp, jax.random.key(0), {}, None, models_stacked=True)
    np.testing.assert_array_equal(_bits(_joined(pieces, last, shape)), _bits(ref))


def test_distinct_first_thresholds():
    sample = np.array([5, 5, 5, 5, 7, 9, 9, 12, 3, 1], np.int64)
    out = sel._distinct(np.array([5, 5, 5, 5, 5, 5, 7, 9, 9, 12]), sample, 5)
    assert out.size == 10 and np.all(np.diff(out) >= 0)
    assert {5, 6, 7, 9, 12, 3, 1} <= set(out.tolist())  # the tied centre, centre + 1, the other sampled keys
    same = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert sel._distinct(same, sample, 5) is same  # no repeated key: unchanged (smooth data)


def test_per_row_search_finds_a_heavily_tied_kth_key_in_its_first_pass():
    """The in-program search (per-tensor TIES in memory): first thresholds c - (next sampled key below),
    c, c + 1 and the next sampled key above c, so one pass brackets a tied k-th key c."""
    rng = np.random.default_rng(9)
    b = rng.standard_normal((T, 60_000)).astype(ml_dtypes.bfloat16).astype(np.float32)
    tau = np.stack([(b[t] + 0.01 * rng.standard_normal(b.shape[1]).astype(np.float32))
                    .astype(ml_dtypes.bfloat16).astype(np.float32) for t in range(T)]) - b
    k = jnp.asarray([int(0.2 * tau.shape[1])] * T, jnp.int32)
    x = jnp.asarray(tau)
    first, _ = sel._first_thresholds([x[t] for t in range(T)], k, True)
    z = jnp.zeros((T,), jnp.int32)
    lo, hi = jnp.full((T,), sel._NEG_INF_KEY, jnp.int32), jnp.full((T,), sel._TOP, jnp.int32)
    counts, below, above = sel._count_pass(x, first, lo, hi, True)
    state = sel._narrow((lo, z + tau.shape[1], hi, z, jnp.zeros((T,), bool), hi, lo), first, counts, below, above, k)
    nlo, nglo, nhi = state[:3]
    assert bool(jnp.all((nglo == k) | (nhi - nlo <= 1)))  # every row done after one pass
    srt = np.sort(np.abs(tau).view(np.int32) & 0x7FFFFFFF, axis=1)[:, ::-1]
    kth = srt[np.arange(T), np.asarray(k) - 1]
    assert all(np.sum(srt[t] == kth[t]) > 100 for t in range(T))  # the k-th key is heavily tied
    np.testing.assert_array_equal(np.asarray(nlo), kth)


# --------------------------------------------------------------------------------------------
# DARE with the L1 rescale (mergekit's default): the norms from a statistic over the chunks

def test_l1_norm_blocks_are_the_executors_chunks():
    import jmerge.pipeline.executor as ex
    from jmerge.methods.sparsify import l1_block, l1_norms, pairwise_sum
    for n in (0, 1, 2 ** 19 - 1, 2 ** 19, 2 ** 19 + 1, 2 ** 22 - 1, 2 ** 22, 10 * 2 ** 22 + 3):
        assert l1_block(n) == ex.chunk_entries(n), n
    rng = np.random.default_rng(3)
    for m in (1, 2, 3, 7, 8, 33):  # the host's tree adds what XLA's adds
        v = (rng.standard_normal((2, m)) * 1e3 ** rng.integers(-2, 3, (2, m))).astype(np.float32)
        np.testing.assert_array_equal(_bits(jax.jit(pairwise_sum)(jnp.asarray(v))), _bits(pairwise_sum(v, np)))
    x = rng.standard_normal((2, 1100, 500)).astype(np.float32)  # two blocks of 2^19, the second zero-padded
    want = np.abs(x.astype(np.float64)).sum((1, 2))
    np.testing.assert_allclose(np.asarray(jax.jit(l1_norms)(x)), want, rtol=2e-7)
    small = x[:, :100]  # one reduction below 2^19 entries
    np.testing.assert_allclose(np.asarray(jax.jit(l1_norms)(small)), np.abs(small.astype(np.float64)).sum((1, 2)),
                               rtol=2e-7)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_dare_l1_chunks_give_the_bits_of_the_per_tensor_program(name, precision):
    method = (jmerge.dare_ties(density=0.4, rescale="l1", normalize_by="weight") if name == "dare_ties"
              else jmerge.dare_linear(density=0.6, rescale="l1"))
    form = chunked_form(method)
    assert form is not None and form.stats  # the norms: one statistics phase over the chunks
    assert chunked_form(jmerge.dare_ties(rescale="none")) is None  # entrywise: blocks of rows, not chunks
    p, pc = LeafProgram(method), LeafProgram(form)
    key = jax.random.key(11)
    # one chunk; two (the second padded); five, whose sums a tree adds in another order than a running sum
    for shape, chunk in (((1 << 19,), 1 << 19), ((1100, 500), 1 << 19), ((2100, 1000), 1 << 19)):
        b, ms = _inputs(shape, 4, "smooth")
        hp = _hp(method, weight=jmerge.PerModel([1.0, 0.5, 2.0]), density=jmerge.PerModel([0.3, 0.5, 0.9]))
        ref = p(b, ms, hp, key, {}, None, compute_dtype=precision, models_stacked=True)
        pieces, last = merge_chunked(pc, b, ms, hp, key, compute_dtype=precision, chunk=chunk)
        got = _joined(pieces, last, shape)
        np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=f"{shape}")
        assert not np.array_equal(_bits(got), _bits(b))


def test_dare_l1_chunks_match_numpy():
    shape, dens, w = (1100, 500), np.array([0.3, 0.5, 0.9], np.float32), np.array([1.0, 0.5, 2.0], np.float32)
    rng = np.random.default_rng(8)
    b = rng.standard_normal(shape).astype(np.float32)
    ms = np.stack([b + 0.01 * rng.standard_normal(shape).astype(np.float32) for _ in range(T)])
    key = jax.random.key(2)
    method = jmerge.dare_linear(rescale="l1")
    hp = _hp(method, density=jmerge.PerModel(list(dens)), weight=jmerge.PerModel(list(w)))
    pieces, last = merge_chunked(LeafProgram(chunked_form(method)), b, ms, hp, key, chunk=1 << 19)
    tau = (ms - b[None]).astype(np.float64)
    keep = np.asarray(jax.random.bernoulli(key, jnp.broadcast_to(jnp.asarray(dens)[:, None, None], (T,) + shape)))
    kept = np.where(keep, tau, 0.0)
    factor = np.abs(tau).sum((1, 2)) / np.abs(kept).sum((1, 2))
    want = b + np.einsum("t,t,tij->ij", w, factor, kept)
    np.testing.assert_allclose(_joined(pieces, last, shape), want, rtol=1e-5, atol=1e-6)


def test_dare_l1_merges_chunk_by_chunk_and_streamed_with_the_same_bytes(tmp_path, monkeypatch):
    """mergekit's DARE-TIES (``rescale: true``, an L1 norm per tensor): the 576000-entry embedding and LM head
    merge in chunks, in memory and streamed from the checkpoints, with the per-tensor program's bytes."""
    import jmerge.pipeline.executor as ex
    from jmerge.mergekit import parse_config
    from jmerge.pipeline import run_merge
    dirs = _mid_models(tmp_path, monkeypatch)
    rows = "".join(f"  - model: {d}\n    parameters: {{weight: {w}, density: {p}}}\n"
                   for d, w, p in zip(dirs[1:], (1.0, 0.7, 0.4), (0.3, 0.5, 0.8)))
    cfg = f"merge_method: dare_ties\nbase_model: {dirs[0]}\nmodels:\n{rows}dtype: bfloat16\nseed: 5\n"
    sizes = _spy_chunks(monkeypatch)
    run_merge(parse_config(cfg), str(tmp_path / "chunks"), quiet=True)
    assert sorted(sizes) == [(576000, 1 << 19)] * 2
    monkeypatch.setattr(ex, "STREAM_BYTES", 0)  # straight from the files: every pass reads the chunks again
    run_merge(parse_config(cfg), str(tmp_path / "streamed"), quiet=True, window=2)
    assert len(sizes) == 2
    monkeypatch.setattr(ex, "SMALL_CHUNK_ENTRIES", 10 ** 12)  # every tensor by the per-tensor program
    run_merge(parse_config(cfg), str(tmp_path / "whole"), quiet=True)
    ref = _read(tmp_path / "whole")
    for run in ("chunks", "streamed"):
        got = _read(tmp_path / run)
        assert set(got) == set(ref) and len(ref) > 5
        for k in ref:
            np.testing.assert_array_equal(_bits(got[k]), _bits(ref[k]), err_msg=f"{run} {k}")
    emb = "model.embed_tokens.weight"
    changed = _bits(ref[emb]) != _bits(_read(dirs[0])[emb])
    assert 0.2 < changed.mean() < 0.95  # the drop and the sign election changed a part of the entries


def test_dare_l1_chunk_statistic_adds_the_chunks_as_the_whole_tensors_tree():
    """The host's sum over the chunks is the whole tensor's pairwise tree, not a running sum: block sums
    [1, 2^24, 1, 1] add to 2^24 + 2 in the tree and to 2^24 one by one in float32."""
    from jmerge.methods.sparsify import _dare_l1_finalize, _factors, l1_norms
    C = 1 << 19
    tau = np.zeros((2, 4 * C), np.float32)
    tau[:, [0, C, 2 * C, 3 * C]] = [1.0, 2.0 ** 24, 1.0, 1.0]
    kept = tau.copy()
    kept[:, 3 * C] = 0.0  # one entry dropped: block sums [1, 2^24, 1, 0]
    norms = jax.jit(l1_norms)
    assert np.asarray(norms(tau)).tolist() == [2.0 ** 24 + 2] * 2
    chunks = [np.stack([norms(tau[:, i * C:(i + 1) * C]), norms(kept[:, i * C:(i + 1) * C])]) for i in range(4)]
    got = _dare_l1_finalize(chunks, [{}] * 4)
    want = np.asarray(jax.jit(lambda a, b: _factors(l1_norms(a), l1_norms(b), jnp))(tau, kept))
    assert len(got) == 4 and all(np.array_equal(_bits(g), _bits(want)) for g in got)
    assert want.tolist() == [np.float32(2.0 ** 24 + 2) / np.float32(2.0 ** 24)] * 2


def test_l1_norms_of_a_leaf_known_sharded_reduce_it_in_its_own_shape():
    from jmerge.core import driver
    from jmerge.core.select import sharded_leaf
    from jmerge.methods.sparsify import l1_norms
    x = np.random.default_rng(2).standard_normal((2, 1100, 500)).astype(np.float32)
    plain = np.asarray(jax.jit(lambda a: jnp.sum(jnp.abs(a), axis=(1, 2)))(x))
    with sharded_leaf():  # (fresh functions: JAX caches a trace by function and shapes, not by this context)
        jaxpr = str(jax.make_jaxpr(lambda a: l1_norms(a))(x))
        inplace = np.asarray(jax.jit(lambda a: l1_norms(a))(x))
    assert "pad" not in jaxpr and "slice" not in jaxpr and "reshape" not in jaxpr
    np.testing.assert_array_equal(_bits(inplace), _bits(plain))
    assert "pad" in str(jax.make_jaxpr(lambda a: l1_norms(a))(x))  # else blocks of the flat leaf, the last padded

    class Sharded:  # what the driver reads of an array's placement
        def __init__(self, replicated):
            self.sharding = type("S", (), {"is_fully_replicated": replicated})()

    assert driver._sharded(Sharded(False), (Sharded(True),))
    assert not driver._sharded(Sharded(True), (np.zeros(3),))
