"""Large tensors of entrywise merges and copies run a block of rows at a time out of core (issue 14): the
reader's row reads, the writer's row writes and ``row_parts`` itself, and whole merges whose output files are
byte-identical to the run that reads every tensor whole (the reference: that run, and NumPy's formula)."""

from __future__ import annotations

import numpy as np
import pytest

import jmerge
from jmerge.core.chunks import entrywise
from jmerge.io import CheckpointError, CheckpointWriter
from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import parse_config
from jmerge.pipeline import executor
from jmerge.pipeline.executor import run_merge
from jmerge.pipeline.jobs import Copy, Merge, Tensor, TensorJob, Zeros, row_parts
from tests.test_buffers import _CONFIGS as _BUFFER_CONFIGS, _read_all


def test_reader_reads_rows_as_slices_of_the_whole(tiny_base):
    with open_checkpoint(tiny_base) as r:
        for name in r.keys():
            whole = r.get(name)
            assert r.rows_readable(name)
            n = whole.shape[0]
            for a, b in [(0, n), (0, 1), (n - 1, n), (n // 3, 2 * n // 3 + 1), (2, 2)]:
                if not 0 <= a <= b <= n:
                    continue
                got = r.get_rows(name, a, b)
                assert got.shape == (b - a,) + whole.shape[1:] and got.dtype == whole.dtype
                np.testing.assert_array_equal(got.view(np.uint8), whole[a:b].view(np.uint8))
                out = np.empty(got.nbytes, np.uint8)
                assert np.shares_memory(r.get_rows(name, a, b, out=out), out) or b == a
        name = r.keys()[0]
        with pytest.raises(CheckpointError, match="no rows"):
            r.get_rows(name, 0, r.shape(name)[0] + 1)
        with pytest.raises(CheckpointError, match="bytes"):
            r.get_rows(name, 0, 1, out=np.empty(3, np.uint8))


def test_reader_reads_flat_ranges_as_slices_of_the_whole(tiny_base):
    with open_checkpoint(tiny_base) as r:
        for name in r.keys():
            whole = r.get(name).reshape(-1)
            n = whole.size
            for a, b in [(0, n), (0, 1), (n - 1, n), (n // 3, 2 * n // 3 + 1), (3, 3), (1, n - 1)]:
                if not 0 <= a <= b <= n:
                    continue
                got = r.get_flat(name, a, b)
                assert got.shape == (b - a,) and got.dtype == whole.dtype
                np.testing.assert_array_equal(got.view(np.uint8), whole[a:b].view(np.uint8))
                out = np.empty(got.nbytes, np.uint8)
                assert np.shares_memory(r.get_flat(name, a, b, out=out), out) or b == a
        name = r.keys()[0]
        with pytest.raises(CheckpointError, match="no entries"):
            r.get_flat(name, 0, int(np.prod(r.shape(name))) + 1)
        with pytest.raises(CheckpointError, match="no entries"):
            r.get_flat(name, 2, 1)
        with pytest.raises(CheckpointError, match="entries 0:1 has 2 bytes"):
            r.get_flat(name, 0, 1, out=np.empty(3, np.uint8))


def _job(r, name, T=3, base_zeros=False):
    shape, dt = tuple(r.shape(name)), np.dtype(r.dtype(name))
    base = Zeros(shape, dt) if base_zeros else Tensor(0, name)
    return TensorJob(name, shape, dt, Merge(base, tuple(Tensor(i, name) for i in range(1, T + 1))), dt)


def test_row_parts_cover_the_rows_in_aligned_blocks(tiny_base, tiny_fts):
    readers = [open_checkpoint(p) for p in [tiny_base, *tiny_fts]]
    try:
        r = readers[0]
        names = [n for n in r.keys() if len(r.shape(n)) == 2]
        for name in names:
            for base_zeros in (False, True):
                job = _job(r, name, base_zeros=base_zeros)
                total = job.pool_bytes(readers)
                for part_bytes in (total // 3, total // 7, 1):
                    parts = row_parts(job, readers, part_bytes)
                    R, per_row = job.shape[0], int(np.prod(job.shape[1:]))
                    assert [p.rows for p in parts] == [(a, b) for a, b in zip(
                        [0] + [p.rows[1] for p in parts[:-1]], [p.rows[1] for p in parts])]
                    assert parts[0].rows[0] == 0 and parts[-1].rows[1] == R and len(parts) > 1
                    for p in parts:
                        a, b = p.rows
                        assert p.shape == (b - a,) + job.shape[1:] and p.whole == job.shape
                        assert p.tensor_shape == job.shape and p.out_name == name
                        if p is not parts[-1]:
                            assert (b - a) * per_row % 64 == 0  # every block but the last: whole vector loops
                        srcs = p.sources
                        assert all(s.rows == (a, b) for s in srcs if isinstance(s, Tensor))
                        assert all(s.shape == p.shape for s in srcs if isinstance(s, Zeros))
                    assert sum(p.read_bytes(readers) for p in parts) == job.read_bytes(readers)
                assert row_parts(job, readers, total) == [job]  # small enough: whole
        # sources of another shape, a reader without row reads, a vector of one entry: whole
        name = names[0]
        other = next(n for n in names if r.shape(n) != r.shape(name))
        odd = TensorJob(name, tuple(r.shape(name)), np.dtype(r.dtype(name)),
                        Merge(Tensor(0, name), (Tensor(1, other),)), np.dtype(r.dtype(name)))
        assert row_parts(odd, readers, 1) == [odd]

        class NoRows:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, a):
                if a in ("get_rows", "rows_readable"):
                    raise AttributeError(a)
                return getattr(self.inner, a)

        job = _job(r, name)
        assert row_parts(job, [readers[0], NoRows(readers[1])] + readers[2:], 1) == [job]
        copy = TensorJob(name, tuple(r.shape(name)), np.dtype(r.dtype(name)), Copy(Tensor(2, name), 0.5),
                         np.dtype(r.dtype(name)))
        parts = row_parts(copy, readers, 1)
        assert len(parts) > 1 and all(isinstance(p.op, Copy) and p.op.scale == 0.5 for p in parts)
    finally:
        for x in readers:
            x.close()


def test_writer_puts_blocks_of_rows_in_place(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 5)).astype(np.float32)  # 20-byte rows: blocks straddle the 4 KiB O_DIRECT blocks
    b = rng.standard_normal((3000, 7)).astype(np.float32)
    layout = [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)]
    with CheckpointWriter(tmp_path / "whole", layout) as w:
        w.write("a", a)
        w.write("b", b)
    with CheckpointWriter(tmp_path / "rows", layout) as w:
        w.write("a", a[10:], rows=(10, 37))
        assert "a" in w.missing()
        w.write("a", a[:10], rows=(0, 10))
        for lo in (2000, 0, 1001, 1000):  # any order
            hi = {0: 1000, 1000: 1001, 1001: 2000, 2000: 3000}[lo]
            w.write("b", b[lo:hi], rows=(lo, hi))
        assert w.missing() == []
    for f in ("model.safetensors",):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "rows" / f).read_bytes()
    with CheckpointWriter(tmp_path / "bad", layout) as w:
        w.write("a", a[:10], rows=(0, 10))
        with pytest.raises(CheckpointError, match="twice"):
            w.write("a", a[5:20], rows=(5, 20))  # overlaps the block written
        with pytest.raises(CheckpointError, match="twice"):
            w.write("a", a)  # the whole tensor after a block of it
        with pytest.raises(CheckpointError, match="no rows"):
            w.write("a", a[:1], rows=(36, 38))
        with pytest.raises(CheckpointError, match="rows 10:12"):
            w.write("a", a[:3], rows=(10, 12))  # the array is not those rows' shape
        w.write("a", a[10:], rows=(10, 37))
        w.write("b", b)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert whole == (tmp_path / "bad" / "model.safetensors").read_bytes()
    with CheckpointWriter(tmp_path / "flat", layout) as w:  # entry ranges in flat order, across rows, any order
        fa, fb = a.reshape(-1), b.reshape(-1)
        for lo, hi in [(101, 185), (0, 7), (7, 101)]:
            w.write("a", fa[lo:hi], flat=(lo, hi))
        w.write("b", b[:1000], rows=(0, 1000))  # rows and entry ranges mix
        w.write("b", fb[7000:], flat=(7000, fb.size))
        assert w.missing() == []
    assert whole == (tmp_path / "flat" / "model.safetensors").read_bytes()
    with CheckpointWriter(tmp_path / "flatbad", layout) as w:
        w.write("a", a.reshape(-1)[:30], flat=(0, 30))
        with pytest.raises(CheckpointError, match="entries 25:40 written twice"):
            w.write("a", a.reshape(-1)[25:40], flat=(25, 40))
        with pytest.raises(CheckpointError, match="written twice"):
            w.write("a", a[5:7], rows=(5, 7))  # entries 25:35, an overlap across kinds
        with pytest.raises(CheckpointError, match="no entries"):
            w.write("a", a.reshape(-1)[:2], flat=(184, 186))
        with pytest.raises(CheckpointError, match="rows or flat"):
            w.write("a", a[6:], rows=(6, 37), flat=(30, 185))
        with pytest.raises(CheckpointError, match=r"entries 30:40 of \(37, 5\)"):
            w.write("a", a.reshape(-1)[30:41], flat=(30, 40))  # not those entries' count
        w.write("a", a.reshape(-1)[30:], flat=(30, 185))
        w.write("b", b)
    assert whole == (tmp_path / "flatbad" / "model.safetensors").read_bytes()
    w = CheckpointWriter(tmp_path / "partial", layout)
    w.write("a", a)
    w.write("b", b[:10], rows=(0, 10))
    with pytest.raises(CheckpointError, match="1 tensors were never written .e.g. 'b'"):
        w.commit()  # a tensor with rows missing is not written
    assert not (tmp_path / "partial").exists()


def test_entrywise_methods():
    assert entrywise(jmerge.task_arithmetic()) and entrywise(jmerge.linear()) and entrywise(jmerge.negation())
    # DARE's draws take the block's offset; its L1 rescale is a norm of the whole tensor
    assert entrywise(jmerge.dare_linear()) and entrywise(jmerge.dare_ties()) and entrywise(jmerge.dare_linear(rescale="none"))
    assert entrywise(jmerge.nearswap()) and entrywise(jmerge.ram()) and entrywise(jmerge.consensus_ta())
    for m in (jmerge.ties(), jmerge.dare_linear(rescale="l1"), jmerge.dare_ties(rescale="l1"),
              jmerge.dare_ties(trim_density=0.5), jmerge.slerp(), jmerge.della(), jmerge.breadcrumbs(),
              jmerge.ramplus_tl(), jmerge.consensus_ties(), jmerge.arcee_fusion(), jmerge.model_stock()):
        assert not entrywise(m)


def test_bernoulli_at_an_offset_is_the_whole_tensors_draw_there():
    """A block of rows drawn at its flat offset has the bits of the whole tensor's draw (jax.random.bernoulli's)."""
    import jax
    from jmerge.core.xla import bernoulli
    key = jax.random.key(11)
    p = np.random.default_rng(0).uniform(size=(37, 29)).astype(np.float32)
    want = np.asarray(jax.random.bernoulli(key, p))
    np.testing.assert_array_equal(np.asarray(bernoulli(key, p)), want)
    draw = jax.jit(bernoulli, static_argnames=("whole", "block_ndim"))
    for r0, r1 in [(0, 5), (5, 6), (13, 37), (36, 37)]:
        got = draw(key, p[r0:r1], np.uint32(r0 * 29), whole=37 * 29, block_ndim=2)
        np.testing.assert_array_equal(np.asarray(got), want[r0:r1])
    assert not np.array_equal(np.asarray(draw(key, p[13:37], np.uint32(0), whole=37 * 29, block_ndim=2)), want[13:37])
    # models x tensor, as DARE draws: a block of rows of each model's copy, the leading axis stepping over tensors
    pt = np.random.default_rng(1).uniform(size=(3, 37, 29)).astype(np.float32)
    want = np.asarray(jax.random.bernoulli(key, pt))
    for r0, r1 in [(0, 7), (7, 37), (20, 21)]:
        got = draw(key, pt[:, r0:r1], np.uint32(r0 * 29), whole=37 * 29, block_ndim=2)
        np.testing.assert_array_equal(np.asarray(got), want[:, r0:r1])
    got = draw(key, pt[:, 4:9].reshape(3, -1), np.uint32(4 * 29), whole=37 * 29, block_ndim=1)  # any block shape
    np.testing.assert_array_equal(np.asarray(got), want[:, 4:9].reshape(3, -1))


def _dare_yaml(method: str, models: list, tail: str) -> str:
    """A DARE config over the first models, ``(weight, density)`` each (a template: ``{b}``, ``{f0}``, ...)."""
    rows = "".join(f"  - model: {{f{i}}}\n    parameters: {{{{weight: {w}, density: {d}}}}}\n"
                   for i, (w, d) in enumerate(models))
    return f"merge_method: {method}\nbase_model: {{b}}\nmodels:\n{rows}{tail}"


_CONFIGS = {
    # per-layer weights (a gradient), and a scale step that is not 1
    "task_arithmetic_bf16": _BUFFER_CONFIGS["task_arithmetic_bf16"].replace(
        "dtype: bfloat16", "parameters: {{lambda: 0.7}}\ndtype: bfloat16"),
    "task_arithmetic_float32": """merge_method: task_arithmetic
base_model: {b}
models:
  - model: {f0}
    parameters: {{weight: 0.31}}
  - model: {f1}
    parameters: {{weight: -0.4}}
dtype: float32
""",
    "linear_float32": _BUFFER_CONFIGS["linear_float32"],
    "passthrough_slices": _BUFFER_CONFIGS["passthrough_slices"],  # copies
    "ties": """merge_method: ties
base_model: {b}
models:
  - model: {f0}
  - model: {f1}
parameters: {{density: 0.3, weight: 1.0}}
""",
    # DARE's draws, keyed by flat index, start at each block's first entry (MergeState.offset)
    "dare_linear_bf16": _dare_yaml("dare_linear", [(0.7, 0.4), (0.5, 0.6)],
                                   "parameters: {{rescale: false}}\ndtype: bfloat16\nseed: 7\n"),
    "dare_ties_float32": _dare_yaml("dare_ties", [(1.0, 0.3), (0.6, 0.5), (0.4, 0.7)],
                                    "parameters: {{rescale: false, normalize: true}}\ndtype: float32\n"),
    "dare_ties_l1": _dare_yaml("dare_ties", [(1.0, 0.3), (0.6, 0.5)], ""),
    # other entrywise methods: NearSwap, RAM, consensus task arithmetic (TALL masks)
    "nearswap_bf16": "merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {f0}\n"
                     "parameters: {{t: 0.0005}}\ndtype: bfloat16\n",
    "ram_float32": "merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {f0}\n  - model: {f1}\n  - model: {f2}\n"
                   "parameters: {{epsilon: 0.0007}}\ndtype: float32\n",
    "consensus_ta_bf16": "merge_method: consensus_ta\nbase_model: {b}\nmodels:\n  - model: {f0}\n  - model: {f1}\n"
                         "  - model: {f2}\nparameters: {{k: 2, lambda_: 0.5}}\ndtype: bfloat16\n",
}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_merges_by_blocks_of_rows_are_byte_identical(name, tiny_base, tiny_fts, tmp_path, monkeypatch):
    cfg = _CONFIGS[name].format(b=tiny_base, f0=tiny_fts[0], f1=tiny_fts[1], f2=tiny_fts[2])
    monkeypatch.setattr(executor, "PART_BYTES", 1 << 60)  # every tensor whole
    run_merge(parse_config(cfg), str(tmp_path / "whole"), quiet=True)
    want = _read_all(tmp_path / "whole")
    written = []
    real = CheckpointWriter.write

    def spy(self, name, array, rows=None):
        written.append((name, rows))
        return real(self, name, array, rows=rows)

    monkeypatch.setattr(CheckpointWriter, "write", spy)
    monkeypatch.setattr(executor, "PART_BYTES", 3000)  # the tiny models' matrices in blocks of a few rows
    run_merge(parse_config(cfg), str(tmp_path / "rows"), quiet=True, window=3, read_threads=2)
    got = _read_all(tmp_path / "rows")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)
    blocks = [n for n, rows in written if rows is not None]
    if name in ("ties", "dare_ties_l1"):  # a per-tensor top-k, a per-tensor L1 norm: every tensor whole
        assert not blocks
    else:
        assert len(set(blocks)) >= 5 and len(blocks) > 2 * len(set(blocks))
    if name == "task_arithmetic_float32":  # and the numbers are the formula's (NumPy, float32)
        with open_checkpoint(tiny_base) as b0, open_checkpoint(tiny_fts[0]) as m0, open_checkpoint(tiny_fts[1]) as m1:
            for k in got:
                b = b0.get(k).astype(np.float32)
                t = (np.float32(0.31) * (m0.get(k).astype(np.float32) - b)
                     + np.float32(-0.4) * (m1.get(k).astype(np.float32) - b))
                np.testing.assert_allclose(got[k], b + t, rtol=1e-6, atol=1e-6, err_msg=k)
