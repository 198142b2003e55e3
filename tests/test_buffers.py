"""The executor's read-buffer pool: alignment, reuse, and no aliasing of two live tensors (a pool of size 1
gives every output bit for bit the normal run's; a pool that does alias is caught by the same comparison)."""

from __future__ import annotations

import numpy as np
import pytest

from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import parse_config
from jmerge.pipeline import executor
from jmerge.pipeline.executor import Buffers, run_merge


def _read_all(path):
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


@pytest.mark.parametrize("nbytes", [0, 1, 1000, 300_000, 3 * 2**20 + 5])
def test_buffers_are_aligned_exact_and_distinct_until_put(nbytes):
    pool = Buffers(keep=1)
    a, b = pool.get(nbytes), pool.get(nbytes)
    for x in (a, b):
        assert x.dtype == np.uint8 and x.nbytes == nbytes and x.flags.c_contiguous and x.flags.writeable
        assert x.ctypes.data % 64 == 0 or not nbytes  # XLA:CPU aliases 64-byte-aligned host arrays instead of copying
    if nbytes:
        assert not np.may_share_memory(a, b)  # two buffers out at once never overlap
        a[:] = 1
        b[:] = 2
        assert (a == 1).all()
    pooled = nbytes >= executor._SMALL  # smaller ones are plain NumPy allocations
    assert pool.out_bytes == (2 * (-(-nbytes // 64) * 64) if pooled else 0)
    pool.put([a])
    c = pool.get(nbytes)
    if pooled:
        assert c.ctypes.data == a.ctypes.data  # the returned range is reused (first fit)
    if nbytes:
        assert not np.may_share_memory(c, b)
    pool.put([c, b])
    assert pool.out_bytes == 0
    assert pool.chunks == (1 if pooled else 0)  # keep=1: one wholly free chunk kept
    pool.put([np.empty(8, np.uint8), c])  # not handed out (or already back): ignored
    assert pool.chunks == (1 if pooled else 0) and pool.out_bytes == 0


def test_one_chunk_serves_tensors_of_several_sizes_and_bounds_hold():
    pool = Buffers(keep=4, max_bytes=8 * 2**20)
    big = pool.get(5 * 2**20)  # a 6 MiB chunk (2 MiB multiples)
    pool.put([big])
    small = pool.get(3 * 2**20)  # fits in the free chunk: no new allocation
    assert small.ctypes.data == big.ctypes.data and pool.allocated == 1
    other = pool.get(2 * 2**20)  # the rest of the same chunk, beside `small`
    assert pool.allocated == 1 and not np.may_share_memory(small, other)
    small[:] = 1
    other[:] = 2
    assert (small == 1).all() and (other == 2).all()
    pool.put([small, other])
    again = pool.get(6 * 2**20)  # the two ranges coalesced: the whole chunk again
    assert again.ctypes.data == big.ctypes.data and pool.allocated == 1
    pool.put([again])
    xs = [pool.get(7 * 2**20) for _ in range(3)]  # three new 8 MiB chunks
    pool.put(xs)
    assert pool.chunks * 8 * 2**20 <= 8 * 2**20 + 6 * 2**20  # max_bytes: the least recently created dropped
    assert not pool._out and pool.out_bytes == 0


def test_first_chunk_has_the_budget_size_and_later_ones_the_request():
    pool = Buffers(chunk_bytes=10 * 2**20)
    a = pool.get(300_000)
    assert pool.allocated == 1 and pool.allocated_bytes == 10 * 2**20
    b = pool.get(10 * 2**20 - 1000)  # does not fit beside `a`: a chunk of its own size (rounded to 2 MiB)
    assert pool.allocated == 2 and pool.allocated_bytes == 20 * 2**20
    pool.put([a, b])


_CONFIGS = {
    "task_arithmetic_bf16": """merge_method: task_arithmetic
base_model: {b}
models:
  - model: {f0}
    parameters: {{weight: 0.5}}
  - model: {f1}
    parameters: {{weight: [0.2, 0.9]}}
dtype: bfloat16
""",
    "ties_global": """merge_method: ties
base_model: {b}
models:
  - model: {f0}
  - model: {f1}
  - model: {f2}
parameters: {{density: 0.3, weight: 1.0}}
scope: global
""",
    "linear_float32": """merge_method: linear
models:
  - model: {f0}
    parameters: {{weight: 0.3}}
  - model: {f1}
    parameters: {{weight: 0.7}}
dtype: float32
out_dtype: float32
""",
    "passthrough_slices": """merge_method: passthrough
slices:
  - sources:
      - model: {f0}
        layer_range: [0, 2]
  - sources:
      - model: {f1}
        layer_range: [1, 2]
dtype: bfloat16
""",
}


class _OneBuffer(Buffers):
    """Keeps one free buffer, and pooled (mmap'd) even for the tiny models' small tensors."""

    def __init__(self, *a, **k):
        super().__init__(keep=1)


class _Aliasing(Buffers):
    """A broken pool: every buffer is a view of the same memory (what the test must catch)."""

    def __init__(self, *a, **k):
        super().__init__()
        self._mem = np.zeros(2**22, np.uint8)

    def get(self, nbytes):
        return self._mem[:nbytes]

    def put(self, bufs):
        pass


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_pool_of_one_buffer_gives_the_normal_run_bit_for_bit(name, tiny_base, tiny_fts, tmp_path, monkeypatch):
    cfg = _CONFIGS[name].format(b=tiny_base, f0=tiny_fts[0], f1=tiny_fts[1], f2=tiny_fts[2])
    run_merge(parse_config(cfg), str(tmp_path / "normal"), quiet=True)
    want = _read_all(tmp_path / "normal")
    monkeypatch.setattr(executor, "_SMALL", 0)  # every tensor in an anonymous mapping
    monkeypatch.setattr(executor, "Buffers", _OneBuffer)
    run_merge(parse_config(cfg), str(tmp_path / "one"), quiet=True, window=4, read_threads=2)
    got = _read_all(tmp_path / "one")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)


def test_an_aliasing_pool_is_caught(tiny_base, tiny_fts, tmp_path, monkeypatch):
    cfg = _CONFIGS["task_arithmetic_bf16"].format(b=tiny_base, f0=tiny_fts[0], f1=tiny_fts[1], f2=tiny_fts[2])
    run_merge(parse_config(cfg), str(tmp_path / "normal"), quiet=True)
    want = _read_all(tmp_path / "normal")
    monkeypatch.setattr(executor, "Buffers", _Aliasing)
    run_merge(parse_config(cfg), str(tmp_path / "bad"), quiet=True, window=4, read_threads=2)
    got = _read_all(tmp_path / "bad")
    assert any(not np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)) for k in want)


# Sources built in pooled memory (issue 14): zeros, stacks and concatenations (MoE fused experts) fault no fresh
# pages per tensor; the reference is NumPy's stack/concatenate of the tensors read whole.
class _Writer:
    """Checks each output against the reference when it is written (before its buffer can be reused)."""

    def __init__(self, want):
        self.want, self.got = want, {}

    def write(self, name, a):
        a = np.asarray(a)
        assert a.dtype == self.want[name].dtype and a.shape == self.want[name].shape, name
        np.testing.assert_array_equal(a.view(np.uint8), self.want[name].view(np.uint8), err_msg=name)
        self.got[name] = a.copy()


def _double(a):  # a mapped part: a fresh array of the input's dtype (as the MoE noise/scale function)
    return (a.astype(np.float32) * np.float32(2)).astype(a.dtype)


def _stack_jobs(tiny_base, tiny_fts):
    from jmerge.pipeline.jobs import Computed, Concat, Copy, Mapped, Stack, Tensor, TensorJob, Zeros
    paths = [tiny_base, *tiny_fts]
    readers = [open_checkpoint(p) for p in paths]
    arr = {(i, k): readers[i].get(k) for i in range(len(paths)) for k in readers[0].keys()}
    bf16 = readers[0].dtype("model.layers.0.mlp.gate_proj.weight")
    jobs, want = [], {}
    for layer in (0, 1):
        g, u, d = (f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
        gu = Stack(tuple(Concat((Tensor(i, g), Tensor(i, u)), 0) for i in range(4)))
        want[f"{layer}.gate_up"] = np.stack([np.concatenate([arr[i, g], arr[i, u]]) for i in range(4)])
        dn = Stack(tuple(Mapped(Tensor(i, d), _double) if i % 2 else Tensor(i, d) for i in range(4)))
        want[f"{layer}.down"] = np.stack([_double(arr[i, d]) if i % 2 else arr[i, d] for i in range(4)])
        jobs += [(f"{layer}.gate_up", gu), (f"{layer}.down", dn)]
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    jobs.append(("zeros", Zeros((3, 64, 64), bf16)))
    want["zeros"] = np.zeros((3, 64, 64), bf16)
    o = "model.layers.0.self_attn.o_proj.weight"
    jobs.append(("cat1", Concat((Tensor(1, q), Zeros((64, 8), bf16), Tensor(2, o)), 1)))  # parts through a buffer
    want["cat1"] = np.concatenate([arr[1, q], np.zeros((64, 8), bf16), arr[2, o]], 1)
    c32 = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7
    jobs.append(("mixed", Stack((Tensor(3, q), Computed(lambda: c32, (64, 64), np.float32)))))  # promoted to float32
    want["mixed"] = np.stack([arr[3, q], c32])
    jobs.append(("cat_k", Concat((Tensor(0, k), Tensor(1, k), Mapped(Tensor(2, k), _double)), 0)))
    want["cat_k"] = np.concatenate([arr[0, k], arr[1, k], _double(arr[2, k])])
    tj = [TensorJob(n, want[n].shape, want[n].dtype, Copy(s), want[n].dtype) for n, s in jobs]
    return readers, tj, want


def test_stack_concat_zeros_are_built_in_the_pool_bit_for_bit(tiny_base, tiny_fts, monkeypatch):
    from jmerge.pipeline.executor import MergeContext, run_jobs
    from jmerge.pipeline.jobs import read_source
    monkeypatch.setattr(executor, "_SMALL", 0)  # every buffer pooled, even the tiny model's
    readers, jobs, want = _stack_jobs(tiny_base, tiny_fts)
    try:
        pool = Buffers(keep=1)
        live = []
        for j in jobs:  # every source built in one pooled range: the pool holds exactly its bytes
            a, raw = read_source(j.op.source, readers, pool)
            assert len(raw) == 1 and np.may_share_memory(a, raw[0]) and a.nbytes == raw[0].nbytes, j.out_name
            np.testing.assert_array_equal(a.view(np.uint8), want[j.out_name].view(np.uint8), err_msg=j.out_name)
            assert not any(np.may_share_memory(a, b) for b, _, _ in live)  # never two live tensors in one place
            live.append((a, j.out_name, raw[0]))
        assert pool.out_bytes == sum(-(-a.nbytes // 64) * 64 for a, _, _ in live)  # temporaries given back
        for a, name, _ in live:  # still intact while all are live
            np.testing.assert_array_equal(a.view(np.uint8), want[name].view(np.uint8), err_msg=name)
        pool.put([b for _, _, b in live])
        assert pool.out_bytes == 0
        for window, threads in ((1, 1), (4, 2)):  # a pool of one chunk, kept after use, reused by every tensor
            pool = Buffers(keep=1)
            w = _Writer(want)
            run_jobs(jobs, readers, w, MergeContext(program=None, hparams={}, views={}, seed=0), window=window,
                     read_threads=threads, buffers=pool)
            assert set(w.got) == set(want) and pool.out_bytes == 0 and pool.chunks == 1
    finally:
        for r in readers:
            r.close()


def test_an_aliasing_pool_is_caught_for_stacked_sources(tiny_base, tiny_fts):
    from jmerge.pipeline.jobs import read_source
    readers, jobs, want = _stack_jobs(tiny_base, tiny_fts)
    try:
        bad = _Aliasing()
        first = read_source(jobs[0].op.source, readers, bad)[0]
        read_source(jobs[1].op.source, readers, bad)
        assert not np.array_equal(first.view(np.uint8), want[jobs[0].out_name].view(np.uint8))
    finally:
        for r in readers:
            r.close()
