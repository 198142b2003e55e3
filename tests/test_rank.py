"""jmerge.core.rank: exact magnitude ranks (DELLA) against NumPy's stable double argsort."""

import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jmerge.core import rank
from jmerge.core.rank import magnitude_ranks
from jmerge.core.select import _keys


def np_ranks(x):
    a = np.abs(np.asarray(x, np.float32))
    a = np.where(np.isnan(a), np.inf, a)
    return np.argsort(np.argsort(a, axis=-1, kind="stable"), axis=-1, kind="stable")


def cases():
    rng = np.random.default_rng(5)
    yield "gauss", rng.standard_normal((3, 6, 2816)).astype(np.float32) * 0.01
    yield "one", rng.standard_normal((2, 3, 1)).astype(np.float32)
    yield "two", rng.standard_normal((2, 3, 2)).astype(np.float32)
    yield "odd", rng.standard_normal((2, 3, 33)).astype(np.float32)
    x = np.round(rng.normal(size=(2, 5, 3001)) * 4) / 4
    x[..., ::5] = -x[..., ::5]
    x.flat[::7] = -0.0
    yield "ties", x.astype(np.float32)
    x = rng.standard_normal((2, 4, 500)).astype(np.float32)
    x.flat[::11], x.flat[::13], x.flat[::17], x.flat[::3] = np.nan, np.inf, -np.inf, 0.0
    yield "nan_inf_zero", x
    yield "bf16", np.asarray(jnp.asarray(rng.standard_normal((2, 4, 2816)), jnp.bfloat16).astype(jnp.float32))
    # one long run of equal high bits with different low bits: the exact fallback
    yield "long_run", (1.0 + rng.integers(0, 4096, (2, 3, 3000)) * 2.0 ** -23).astype(np.float32)
    # short runs of equal high bits with a few different low bits: the window correction
    bits = np.int32(np.float32(1.0).view(np.int32)) + (np.arange(3000) // 4 << 12) + rng.integers(0, 4096, (2, 3, 3000))
    yield "short_runs", rng.permuted(bits.astype(np.int32).view(np.float32), axis=-1)  # runs of 4
    yield "long_rows", rng.standard_normal((2, 9000)).astype(np.float32)  # 14 position bits
    yield "pair_sort", rng.standard_normal((1, 20000)).astype(np.float32)  # beyond the packed sort
    yield "wide_rows", rng.standard_normal((1, 70000)).astype(np.float32)  # ranks beyond uint16 (host: int32)
    yield "nd", rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)


@pytest.fixture(params=["buffer", "pure"])
def callback(request, monkeypatch):
    """The host ranks through ``buffer_callback`` (XLA's buffers in place, where JAX has it) and through the
    ``pure_callback`` fallback (operands and result copied): the same ranks either way."""
    if request.param == "pure":
        monkeypatch.setattr(rank, "_buffer_callback", None)
    elif rank._buffer_callback is None:
        pytest.skip("this JAX has no jax.experimental.buffer_callback")
    return request.param


@pytest.mark.parametrize("impl", ["xla", "host", "auto"])
@pytest.mark.parametrize("name,x", list(cases()), ids=[n for n, _ in cases()])
def test_ranks_equal_numpy_stable_double_argsort(name, x, impl):
    got = np.asarray(jax.jit(lambda a: magnitude_ranks(a, impl=impl))(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_ranks(x))


def test_auto_picks_the_host_only_on_one_cpu_device():
    x = jnp.ones((2, 8))
    text = str(jax.make_jaxpr(lambda a: magnitude_ranks(a))(x))
    host = jax.default_backend() == "cpu" and jax.device_count() == 1
    callback = "buffer_callback" if rank._buffer_callback is not None else "pure_callback"
    assert (callback in text) == host
    assert "_callback" not in str(jax.make_jaxpr(lambda a: magnitude_ranks(a, impl="xla"))(x))
    with pytest.raises(ValueError, match="impl must be"):
        magnitude_ranks(x, impl="numpy")


def test_host_ranks_in_parallel_blocks_and_under_vmap(monkeypatch, callback):
    """Arrays above the parallel threshold are split over threads and rows over cache-sized blocks (row
    counts that divide neither); a vmapped call (a sweep's settings axis) ranks every slice."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 301, 1003)).astype(np.float32)
    x[0, :, ::9] = 0.0  # ties
    monkeypatch.setattr(rank, "_HOST_BLOCK", 1 << 13)
    got = np.asarray(jax.jit(lambda a: magnitude_ranks(a, impl="host"))(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np_ranks(x))
    # blocks of bfloat16 values (int32 sort) beside float32 blocks (int64 sort), with ties, NaN and -0.0
    y = np.array(jnp.asarray(rng.standard_normal((3, 64, 1000)), jnp.bfloat16).astype(jnp.float32))
    y[1] = rng.standard_normal((64, 1000))
    y[2, :, ::7], y[2, :, ::11], y[2, :, ::13] = np.nan, -0.0, 0.0
    got = np.asarray(jax.jit(lambda a: magnitude_ranks(a, impl="host"))(jnp.asarray(y)))
    np.testing.assert_array_equal(got, np_ranks(y))
    # a block whose first entries look like bfloat16 (exact zeros, 16 low bits zero) and whose later ones do
    # not: the first entries alone never pick the int32 sort (it would drop the low bits)
    z = rng.standard_normal((2, 64, 1000)).astype(np.float32)
    z[:, :, :300] = 0.0
    z[1, :, 300:] = np.asarray(jnp.asarray(z[1, :, 300:], jnp.bfloat16).astype(jnp.float32))
    z[1, 40, 999] = np.float32(1.0000001)  # one entry with low bits in an otherwise bfloat16 block
    got = np.asarray(jax.jit(lambda a: magnitude_ranks(a, impl="host"))(jnp.asarray(z)))
    np.testing.assert_array_equal(got, np_ranks(z))
    xs = rng.standard_normal((4, 2, 3, 50)).astype(np.float32)
    got = np.asarray(jax.jit(jax.vmap(lambda a: magnitude_ranks(a, impl="host")))(jnp.asarray(xs)))
    np.testing.assert_array_equal(got, np_ranks(xs))


def test_host_results_survive_the_reused_output_buffer(callback):
    """The callback reuses its thread's output buffer: XLA must have copied each result before the next
    call (else an earlier result would change), also with several calls in flight at once. (Not from
    several Python threads: JAX 0.10's callbacks then deadlock now and then, with or without the reuse.)"""
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((3, 40, 700)).astype(np.float32) for _ in range(6)]
    f = jax.jit(lambda a: magnitude_ranks(a, impl="host"))
    first = f(jnp.asarray(xs[0]))
    second = f(jnp.asarray(xs[1]))
    np.testing.assert_array_equal(np.asarray(first), np_ranks(xs[0]))
    np.testing.assert_array_equal(np.asarray(second), np_ranks(xs[1]))
    outs = [f(jnp.asarray(x)) for x in xs]  # dispatched asynchronously, all in flight
    for x, o in zip(xs, outs):
        np.testing.assert_array_equal(np.asarray(o), np_ranks(x))
    assert rank._rank_dtype(1 << 16) == np.uint16 and rank._rank_dtype((1 << 16) + 1) == np.int32


def test_della_differentiates_through_tau_with_host_ranks():
    """The ranks are integers of the keys: a gradient through a DELLA merge never reaches the callback."""
    import jmerge
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)}
    models = [{"w": base["w"] + 0.1 * jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)} for _ in range(2)]

    def loss(s):
        out = jmerge.merge(jmerge.della(), base, models, hparams={"scale": s})
        return jnp.sum(out["w"] ** 2)

    g = jax.grad(loss)(jnp.float32(0.7))
    eps = 1e-3
    num = (loss(jnp.float32(0.7 + eps)) - loss(jnp.float32(0.7 - eps))) / (2 * eps)
    np.testing.assert_allclose(float(g), float(num), rtol=2e-2)


@pytest.mark.parametrize("window", [0, 1, 3, 7, 40])
def test_every_window_is_exact(window):
    """The window only trades cost: a window too small for the runs falls back to the pair sort."""
    for name, x in cases():
        if name in ("short_runs", "long_run", "ties", "gauss"):
            got = np.asarray(jax.jit(lambda a: magnitude_ranks(a, window=window, impl="xla"))(jnp.asarray(x)))
            np.testing.assert_array_equal(got, np_ranks(x), err_msg=f"{name}, window {window}")


def _sorted(x, window):
    x = jnp.asarray(x)
    pos = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    b = (x.shape[-1] - 1).bit_length()
    return [np.asarray(a) for a in jax.jit(lambda: rank._sorted_ranks(_keys(x, True), pos, b, window))()]


def test_window_correction_and_fallback_flag():
    """Short runs are corrected by the window (no fallback, and the packed order alone is wrong there);
    a long run of different keys raises the fallback flag."""
    named = dict(cases())
    x = named["short_runs"]
    perm, ranks_sorted, needs_exact = _sorted(x, 7)
    assert not needs_exact
    ref = np_ranks(x)
    in_sorted_order = np.take_along_axis(ref, perm, axis=-1)
    np.testing.assert_array_equal(ranks_sorted, in_sorted_order)
    assert not np.array_equal(in_sorted_order, np.broadcast_to(np.arange(x.shape[-1]), x.shape))  # corrected
    assert _sorted(named["long_run"], 7)[2]
    assert not _sorted(named["bf16"], 7)[2]  # runs of equal keys (bfloat16 low bits are zero)
    assert not _sorted(named["gauss"], 7)[2]


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")  # forking a threaded process
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # is the point here
def test_host_ranks_in_a_forked_child():
    """A child forked after the thread pool started gets a pool of its own (the parent's threads do not
    exist there; submitting to the parent's pool would wait forever)."""
    import multiprocessing as mp
    import os
    if not hasattr(os, "register_at_fork"):
        pytest.skip("no fork on this platform")
    x = np.random.default_rng(9).standard_normal((4, 300, 400)).astype(np.float32)
    rank._host_ranks(x)  # starts the pool in the parent
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(rank._host_ranks(x).tolist()), daemon=True)
    p.start()
    got = np.asarray(q.get(timeout=60))  # before join: the child exits once its queue is drained
    p.join(10)
    assert p.exitcode == 0
    np.testing.assert_array_equal(got, np_ranks(x))


def _flush(x):
    """float32 with denormals flushed to zero, as XLA:CPU's kernels treat inputs and results."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x).astype(np.float32)


def _tiny_rows(rng, shape):
    """Leaves whose differences include denormals (flushed by XLA) and denormal inputs (read as zero)."""
    tiny = np.finfo(np.float32).tiny
    base = (rng.standard_normal(shape) * 0.01).astype(np.float32)
    models = []
    for t in range(3):
        m = base + (rng.standard_normal(shape) * 1e-3).astype(np.float32)
        b = base.reshape(-1)
        mm = m.reshape(-1)
        # entries at the bottom of the normal range: differences below it (denormal results)
        b[t::5] = tiny * (1 + rng.integers(0, 64, b[t::5].shape)).astype(np.float32)
        mm[t::5] = b[t::5] + (rng.integers(-8, 8, b[t::5].shape) * 2.0 ** -140).astype(np.float32)
        mm[t + 1::7] = (rng.integers(1, 2 ** 20, mm[t + 1::7].shape) * 2.0 ** -149).astype(np.float32)  # denormals
        models.append(m.astype(np.float32))
    return base, models


@pytest.mark.parametrize("dtypes", ["f32", "bf16", "mixed"])
@pytest.mark.parametrize("impl", ["host", "xla", "auto"])
def test_difference_ranks_have_xlas_bits_with_denormals(impl, dtypes, monkeypatch, callback):
    """The host reads the inputs and makes the differences itself, in the calling XLA thread's environment
    (denormal inputs and results flushed, as XLA's kernels do), on threads that did not have it: the ranks are
    those of the differences XLA computes, which a NumPy reference with the flush reproduces and one without
    it does not."""
    rng = np.random.default_rng(21)
    base, models = _tiny_rows(rng, (40, 700))
    if dtypes != "f32":  # bfloat16 inputs (denormal ones too), widened exactly; "mixed": a float32 base
        bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16))
        base = base if dtypes == "mixed" else bf(base)
        models = [bf(m) for m in models]
    wide = lambda x: np.asarray(x).astype(np.float32)
    monkeypatch.setattr(rank, "_HOST_PARALLEL", 1 << 10)  # split over the pool's threads
    pool = ThreadPoolExecutor(max_workers=2)
    list(pool.map(time.sleep, [0.05, 0.05]))  # both threads started here, outside XLA: no flush of their own
    assert pool.submit(lambda: np.float32(1e-39) * np.float32(1.0)).result() != 0  # (a thread made by XLA's would)
    monkeypatch.setattr(rank, "_POOL", [pool])
    want = np_ranks(np.stack([_flush(_flush(wide(m)) - _flush(wide(base))) for m in models]))
    unflushed = np_ranks(np.stack([wide(m) - wide(base) for m in models]))
    assert not np.array_equal(want, unflushed)  # the flush matters here
    f = jax.jit(lambda b, ms: rank.difference_ranks(b, ms, impl=impl))
    got = f(jnp.asarray(base), [jnp.asarray(m) for m in models])
    assert got.dtype == jnp.int32 and got.shape == (3, 40, 700)
    np.testing.assert_array_equal(np.asarray(got), want)
    # DELLA reads its ranks this way while tau is models - base: equal to the ranks of tau as XLA stacks it
    tau = jax.jit(lambda b, ms: jnp.stack([jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32) for m in ms]))(
        jnp.asarray(base), [jnp.asarray(m) for m in models])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(magnitude_ranks(tau, impl="xla")))
    pool.shutdown()


def test_difference_ranks_shapes_and_vmap(callback):
    """Vectors are one row, matrices rank along their last axes flattened per leading index; a vmapped call
    (every operand broadcast to the batch) ranks each batch entry."""
    rng = np.random.default_rng(8)
    for shape in [(5,), (4, 6), (3, 4, 5), ()]:
        base = rng.standard_normal(shape).astype(np.float32)
        models = [base + rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
        got = np.asarray(jax.jit(lambda b, ms: rank.difference_ranks(b, ms, impl="host"))(base, models))
        rows = lambda x: x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
        want = np_ranks(np.stack([rows(m - base) for m in models])) if base.size > 1 else np.zeros((2, 1, 1))
        np.testing.assert_array_equal(got, want)
    base = rng.standard_normal((4, 30)).astype(np.float32)
    ms = rng.standard_normal((3, 2, 4, 30)).astype(np.float32)  # batch of 3 settings, 2 models
    f = jax.vmap(lambda m: rank.difference_ranks(jnp.asarray(base), [m[0], m[1]], impl="host"))
    got = np.asarray(jax.jit(f)(ms))
    for i in range(3):
        np.testing.assert_array_equal(got[i], np_ranks(np.stack([ms[i, j] - base for j in range(2)])))


@pytest.mark.parametrize("linear", [False, True], ids=["della", "della_linear"])
def test_della_writes_no_stacked_task_vectors(linear):
    """On the host-ranks path DELLA's leaf program writes one full-size array besides its output: the callback's
    ranks (uint16). The callback reads the inputs and the survivors are rescaled row by row, so the stacked
    float32 task vectors (models x leaf) are never written (they were, for the callback, before)."""
    if not rank._use_host("auto"):
        pytest.skip("the host ranks run on a one-device CPU only")
    import re

    import jmerge
    from jmerge.core import LeafProgram
    shape = (256, 700)
    method = jmerge.della_linear() if linear else jmerge.della()
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(getattr(v, "specs", v), jnp.float32) for k, v in method.defaults.items()}
    b = jnp.zeros(shape, jnp.float32)
    ms = tuple(jnp.ones(shape, jnp.float32) for _ in range(3))
    txt = jax.jit(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True)).lower(
        b, ms, hp).compile().as_text()
    entry = txt[txt.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    big = [m.group(1, 2) for m in re.finditer(r"\n\s*(?:ROOT )?%\S+ = (\w+)\[([0-9,]+)\]\S* (?!parameter)", entry)
           if np.prod([int(d) for d in m.group(2).split(",")]) >= 3 * shape[0] * shape[1]]
    assert big == [("u16", f"3,{shape[0]},{shape[1]}")], big


def test_difference_ranks_without_the_c_fenv_take_xlas_differences(monkeypatch):
    """Where the C library's fegetenv / fesetenv cannot be loaded, XLA computes the differences (the stacked
    path, as before): the same ranks, denormals included."""
    rng = np.random.default_rng(22)
    base, models = _tiny_rows(rng, (8, 300))
    jaxpr = lambda: str(jax.make_jaxpr(lambda b, ms: rank.difference_ranks(b, ms, impl="host"))(base, models))
    assert " sub " not in jaxpr()  # with the C environment: the host makes the differences
    monkeypatch.setattr(rank, "_FENV", None)
    assert " sub " in jaxpr()  # without: XLA does
    f = jax.jit(lambda b, ms: rank.difference_ranks(b, ms, impl="host"))
    got = np.asarray(f(jnp.asarray(base), [jnp.asarray(m) for m in models]))
    np.testing.assert_array_equal(got, np_ranks(np.stack([_flush(_flush(m) - _flush(base)) for m in models])))
