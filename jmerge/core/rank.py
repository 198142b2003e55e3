"""Exact magnitude ranks along the last axis with one one-operand int32 sort (DELLA's MagPrune ranks).

``magnitude_ranks(x)[..., i]`` is the ascending rank of ``|x[..., i]|`` within its row (the last axis):
the number of entries of the row that are smaller, or equal and at a lower index (``+0 == -0``; NaN ranks
as ``+inf``). It equals NumPy's ``argsort(argsort(|x|, kind="stable"), kind="stable")``.

How it works. XLA:CPU sorts one int32 operand several times faster than a sort with a payload or a
stable sort (whose comparators are called per comparison), so the ranks come from one one-operand sort:

1. Each entry's order key (the int32 bit pattern of ``|x|``, monotone) has its low ``b`` bits replaced
   by the entry's position (``b = ceil(log2 m)`` bits): these packed values are unique, and one sort
   orders the row by (key without its low bits, position) and carries the permutation in its low bits.
2. That order is the exact order by (key, position) except inside runs of entries whose keys agree above
   the low bits and differ in them. The full keys are gathered in sorted order and each sorted position
   is corrected by its inversions within ``window`` places on either side: ``+1`` for each later entry
   with a smaller key, ``-1`` for each earlier entry with a larger key (both can only be in its run).
3. A scatter batched over the rows (``rank[perm[q]] = q + correction``; about half the cost of a second
   sort) puts the ranks back in row order.

The window correction is exact unless some run longer than ``window + 1`` entries holds different keys;
that is checked (an adjacent key change within ``window + 1`` places of two run members that far apart),
and then the leaf takes the exact path of a stable sort of (key, position) pairs (``lax.cond``). Runs of
equal keys (exact zeros, bfloat16 values, whose low bits are all zero) never need it; float32 rows of a
few thousand entries almost never do. Rows longer than 16384 entries take the pair sort, and so does
every row where JAX sees more than one device: the SPMD partitioner all-gathers the operands of the gather
and scatter of a leaf sharded along its rows, where the pair sort reshards whole rows (an all-to-all).

On a CPU with one device (``impl="auto"``), the ranks come from the host instead (a host callback):
XLA:CPU's sort calls a comparator per comparison, while NumPy's sorts use AVX-512/AVX2 sorting networks
(x86-simd-sort). The float32 values go to the host (the keys are made there, block by block); each
row's keys shifted into the high bits with the position in the low bits (uint64, unique; int32 ``key |
position`` for bfloat16 values, whose low 16 bits are zero) are sorted in blocks of rows that stay in cache, on a few threads (the sort releases the GIL), and the
ranks are scattered back: 2.5-4x faster than the XLA path on this project's 2-core machine (about 0.15
vs 0.45 s for a ``(3, 1024, 2816)`` float32 leaf). The result is the same exact integers either way.
:func:`difference_ranks` ranks task vectors ``model - base`` there from the inputs themselves (float32 or
bfloat16): the host makes each block's differences in the calling XLA thread's floating-point environment
(denormals flushed, as XLA's kernels), so XLA never writes the stacked task vectors for the callback.
Where JAX has ``jax.experimental.buffer_callback`` (0.10 and 0.12 do) the host reads XLA's operand buffers
and writes the ranks into XLA's result buffer in place; ``jax.pure_callback`` (the fallback) copies each
operand into a new host array and the result back, ~20 of the ~50 ms of a ``(3, 1024, 2816)`` leaf's
ranks from its inputs.

References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling" (2024) (the ranks MagPrune needs); Knuth, "The Art of Computer Programming", vol. 3, 5.2
(ranks by counting inversions).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from .select import _ABS, _INF_KEY, _keys

try:  # XLA's buffers in place (no operand or result copies); experimental in JAX, so optional
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older or newer JAX without it: jax.pure_callback
    _buffer_callback = None

__all__ = ["magnitude_ranks", "difference_ranks"]

_MAX_PACKED_BITS = 14  # rows up to 2**14 entries take the packed sort (longer ones the pair sort)
# inversions are corrected within this many places, by position bits: runs of equal high bits grow about
# 4x per bit (float32 Gaussian rows: about 1 entry per run at 12 bits), and the window is sized so that a
# run longer than it (the exact fallback) is rare
_WINDOWS = {13: 23, 14: 47}
_WINDOW = 7  # up to 12 position bits (rows up to 4096 entries)


_HOST_BLOCK = 1 << 16  # entries per sorted block of rows (512 KiB of int64 keys: stays in cache)
_HOST_PARALLEL = 1 << 18  # arrays with fewer entries are ranked on the calling thread
_POOL: list = []
_POOL_LOCK = threading.Lock()


_WORKERS = max(1, min(8, os.cpu_count() or 1))  # threads of the host ranks' pool


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="jmerge-ranks"))
        return _POOL[0]


def _forget_pool() -> None:  # a forked child has none of the parent's threads: it makes its own pool
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _host_rank_rows(x: np.ndarray, out: np.ndarray, r0: int, r1: int, base: np.ndarray | None = None,
                    flush: bool = False) -> None:
    """Ranks of ``|x|`` in rows ``r0:r1`` of the 2-D float32 ``x`` into ``out`` (same shape, uint16 or int32),
    in cache-sized blocks of rows. A block whose keys all have their low 16 bits zero (bfloat16 values, as a
    bf16 merge computes) and rows of at most 65536 entries sorts int32 values (key | position), twice as
    fast as the 64-bit ones; both are exact.

    A block of float32 values (it shows it is one by its first entries; the full scan for the int32 case runs
    only when those have zero low bits) sorts the uint64 values ``bits(x) << 33 | position``: the shift drops
    the sign bit, so they order by ``(|x|, position)`` with two passes to build them (a widening shift, an or)
    where ``key << 32`` took four (abs, clamp, widen, shift); NaN, whose bits exceed those of +inf, would sort
    after it, so a block whose largest sorted value shows one is done again the clamped way below (``min(|x|'s
    bits, inf's) << 32 | position``, int64). The 64-bit values carry each entry's flat position within the
    block (row * m + column; within a row the same order as the column), so the sorted values' low 32 bits
    index the block's output directly (no per-row offsets to add). Measured on a ``(1024, 2816)`` row of task
    vectors, one thread: 20-21 -> 18.5-19.3 ms (the sort itself ~11 ms).

    With ``base`` (``x``'s shape; each float32 or bfloat16), the ranks are of ``|x - base|``: each block's
    differences are computed here, in the thread's floating-point environment (:func:`difference_ranks` runs
    this in the calling XLA thread's, so they are the bits XLA computes)."""
    m = x.shape[-1]
    rb = max(1, _HOST_BLOCK // m)
    keys = np.empty((rb, m), np.int32)
    if base is not None:
        diff = np.empty((rb, m), np.float32)
        tmp = np.empty((rb, m), np.float32) if flush else None
        read_x, read_b = _block_reader(x, rb), _block_reader(base, rb)
    packed = np.empty((rb, m), np.int64)
    perm = np.empty((rb, m), np.intp)
    pos = np.arange(rb * m, dtype=np.int64).reshape(rb, m)  # flat positions within a block
    pos32 = np.arange(m, dtype=np.int32)
    vals = np.tile(np.arange(m, dtype=out.dtype), rb)
    flat = out.reshape(-1)
    low16 = np.int32(0xFFFF)
    wide = packed.view(np.uint64)
    for a in range(r0, r1, rb):
        n = min(rb, r1 - a)
        k, q = keys[:n], perm[:n]
        dest = flat[a * m:(a + n) * m]  # the block's rows of the output, flat
        if base is None:
            src = x[a:a + n]
        elif flush:  # XLA flushes subnormals but this thread does not: inputs and result flushed explicitly
            src = _flushed(np.subtract(_flushed(read_x(a, n), diff[:n]), _flushed(read_b(a, n), tmp[:n]),
                                       out=diff[:n]), diff[:n])
        else:
            src = np.subtract(read_x(a, n), read_b(a, n), out=diff[:n])
        bits = src.view(np.uint32)
        if np.any(bits.reshape(-1)[:256] & np.uint32(0xFFFF)):  # float32 values: (|x|'s bits << 33) | position
            w = wide[:n]  # shifted 33 places the sign bit leaves: unsigned, these order by (|x|, position)
            np.left_shift(bits, np.uint64(33), out=w, dtype=np.uint64)
            w |= pos[:n].view(np.uint64)
            w.sort(axis=-1)
            if not np.any(w[:, -1] >> np.uint64(33) > np.uint64(_INF_KEY)):  # a row's largest: no NaN in the block
                np.bitwise_and(packed[:n], np.int64(0xFFFFFFFF), out=q)
                dest[q.reshape(-1)] = vals[:n * m]
                continue
        # select._keys(x, magnitude=True) on the host: |x|'s bits (+0 == -0), NaN ranked as +inf
        np.bitwise_and(src.view(np.int32), _ABS, out=k)
        np.minimum(k, _INF_KEY, out=k)
        head = k.reshape(-1)[:256]
        if m <= 1 << 16 and not np.any(head & low16) and not np.any(k & low16):
            k |= pos32  # unique values ordered by (key, position)
            k.sort(axis=-1)
            np.bitwise_and(k, np.int32(0xFFFF), out=q)
            q += (np.arange(n, dtype=np.intp) * m)[:, None]
        else:
            p = packed[:n]
            p[...] = k
            p <<= 32
            p |= pos[:n]  # unique values ordered by (key, position)
            p.sort(axis=-1)
            np.bitwise_and(p, np.int64(0xFFFFFFFF), out=q)  # the block position of the q-th smallest entry
        dest[q.reshape(-1)] = vals[:n * m]  # rank[perm[q]] = q


_OUT = threading.local()  # per calling thread: the last output buffer of _host_ranks, reused
_OUT_MAX = 1 << 28  # bytes: larger outputs are allocated per call


def _rank_dtype(m: int):
    """The callback's result dtype for rows of ``m`` entries: uint16 when every rank fits (half the bytes
    that cross between XLA and the host), else int32."""
    return np.uint16 if m <= 1 << 16 else np.int32


def _out_buffer(shape: tuple, dtype=np.int32) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` for the callback's result, reused by the thread's next call.

    A fresh allocation of this size is mapped anew and faults in zeroed pages on every call (about a
    third of the callback's time). Reuse is safe because XLA copies a callback's result into its own
    output buffer before the custom call returns, on the calling thread (``tests/test_rank.py`` checks
    that an earlier result survives the next call)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes > _OUT_MAX:
        return np.empty(shape, dtype)
    buf = getattr(_OUT, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _OUT.buf = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _host_ranks(x) -> np.ndarray:
    """Exact ascending ranks of ``|x|`` (float32) along the last axis (ties by lower index), on the host."""
    # x may be a callback's jax.Array: np.asarray, not DLPack, whose wait for the operand's readiness
    # deadlocks when several computations with this callback are in flight (tests/test_rank.py)
    keys = np.ascontiguousarray(x, np.float32)
    m = keys.shape[-1]
    out = _out_buffer((keys.size // m, m), _rank_dtype(m))
    _host_ranks_into(out, keys)
    return out.reshape(keys.shape)


def _host_ranks_into(out: np.ndarray, keys: np.ndarray) -> None:
    """:func:`_host_ranks` of the float32 ``keys`` written into ``out`` (contiguous, ``keys``' size)."""
    m = keys.shape[-1]
    rows = keys.reshape(-1, m)
    out = out.reshape(rows.shape)
    R = rows.shape[0]
    workers = _WORKERS if keys.size >= _HOST_PARALLEL else 1
    edges = np.linspace(0, R, min(workers, R) + 1).astype(np.int64)
    if len(edges) <= 2:
        _host_rank_rows(rows, out, 0, R)
    else:
        list(_pool().map(lambda i: _host_rank_rows(rows, out, int(edges[i]), int(edges[i + 1])),
                         range(len(edges) - 1)))


def _ranks_in_place(ctx, out, x) -> None:
    """:func:`_host_ranks` as a buffer callback: reads XLA's operand and writes XLA's result buffer."""
    del ctx
    _host_ranks_into(np.asarray(out), np.asarray(x))


class _FEnv(ctypes.Structure):
    """Storage for a C ``fenv_t`` (32 bytes on x86-64 glibc, 8 on aarch64; 64 leaves room)."""

    _fields_ = [("raw", ctypes.c_ubyte * 64)]


def _load_fenv():
    """``(fegetenv, fesetenv)`` from the C math library (already loaded by Python: looked up in the process
    first, without the subprocess ``find_library`` may start), or None where they cannot be loaded."""
    get = put = None
    for name in (None, "libm.so.6", "FIND"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("m") if name == "FIND" else name)
            get, put = lib.fegetenv, lib.fesetenv
            break
        except (OSError, AttributeError, TypeError):
            continue
    if get is None:
        return None
    get.argtypes = put.argtypes = [ctypes.POINTER(_FEnv)]
    get.restype = put.restype = ctypes.c_int
    return get, put


_FENV = _load_fenv()


def _current_fenv() -> _FEnv | None:
    """The calling thread's floating-point environment (rounding, flush-to-zero and denormals-are-zero
    modes included), or None."""
    if _FENV is None:
        return None
    env = _FEnv()
    return env if _FENV[0](ctypes.byref(env)) == 0 else None


@contextlib.contextmanager
def _fenv(env: _FEnv):
    """Run the block in the floating-point environment ``env``, then restore the thread's own."""
    own = _FEnv()
    if env is None or _FENV is None or _FENV[0](ctypes.byref(own)) != 0 or _FENV[1](ctypes.byref(env)) != 0:
        raise RuntimeError("jmerge: cannot set the floating-point environment of a rank thread")
    try:
        yield
    finally:
        _FENV[1](ctypes.byref(own))


def _block_reader(v: np.ndarray, rb: int):
    """``(a, n) -> v[a:a + n]`` as float32: bfloat16 rows (a 2-byte dtype holding their bits) widened exactly,
    the bits shifted left by 16, into a buffer of ``rb`` rows reused for every block."""
    if v.dtype.itemsize != 2:
        return lambda a, n: v[a:a + n]
    buf = np.empty((rb, v.shape[-1]), np.uint32)

    def read(a: int, n: int) -> np.ndarray:
        np.left_shift(v[a:a + n].view(np.uint16), 16, out=buf[:n], dtype=np.uint32)
        return buf[:n].view(np.float32)

    return read


_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_XLA_FLUSHES: list = []  # [whether XLA:CPU flushes subnormal results], probed once


def _flushed(v: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``v`` with its subnormal entries set to zero, into ``out`` (NaN and inf kept)."""
    return np.multiply(v, np.abs(v) >= _TINY, out=out)


def _xla_flushes() -> bool:
    """Whether XLA:CPU's kernels flush a subnormal difference to zero (probed once, outside any callback)."""
    if not _XLA_FLUSHES:
        with jax.ensure_compile_time_eval():  # run now, also while a caller's jit traces
            d = jax.jit(lambda a, b: a - b)(jnp.asarray(np.float32(2e-38)), jnp.asarray(np.float32(1.5e-38)))
        _XLA_FLUSHES.append(bool(np.asarray(d) == 0))
    return _XLA_FLUSHES[0]


def _env_flushes(env) -> bool:
    """Whether the floating-point environment ``env`` flushes a subnormal product to zero."""
    with _fenv(env):
        return bool(np.float32(1e-39) * np.float32(1.0) == 0)


def _host_difference_ranks(base, *models) -> np.ndarray:
    """Ranks of ``|models[t] - base|`` along the last axis, on the host: ``(T, R, m)`` for ``(R, m)``
    float32 or bfloat16 operands, ``(B, T, R, m)`` for ``(B, R, m)`` ones (a vmapped call, every operand
    broadcast)."""
    b = np.asarray(base)
    m, R, T = b.shape[-1], b.shape[-2], len(models)
    out = _out_buffer((b.size // (R * m), T, R, m), _rank_dtype(m))
    _host_difference_ranks_into(out, b, *models)
    return out.reshape(b.shape[:-2] + (T, R, m))


def _difference_ranks_in_place(ctx, out, base, *models) -> None:
    """:func:`_host_difference_ranks` as a buffer callback: reads XLA's operand buffers (no copies) and writes
    the ranks into XLA's result buffer."""
    del ctx
    _host_difference_ranks_into(np.asarray(out), base, *models)


def _host_difference_ranks_into(out: np.ndarray, base, *models) -> None:
    """:func:`_host_difference_ranks` written into ``out`` (contiguous, ``(B, T, R, m)`` entries)."""
    b = np.asarray(base)
    ms = [np.asarray(x) for x in models]
    m = b.shape[-1]
    bb = b.reshape(-1, b.shape[-2], m)
    mm = [x.reshape(bb.shape) for x in ms]
    B, R, T = bb.shape[0], bb.shape[1], len(ms)
    out = out.reshape(B, T, R, m)
    # XLA runs its kernels (and this callback) with denormals flushed (inputs and results); the differences
    # are computed in that environment, on every thread, so they are the bits XLA's m - b would have
    env = _current_fenv()
    # JAX 0.10-0.12.0 call the callback on the XLA thread, whose environment flushes as its kernels do; 0.12.1
    # calls it on a thread that does not, so the differences are then flushed explicitly
    flush = _xla_flushes() and not _env_flushes(env)  # (probed at trace time: no JAX call inside a callback)
    workers = _WORKERS if bb.size * T >= _HOST_PARALLEL else 1
    splits = min(workers, R)
    edges = np.linspace(0, R, splits + 1).astype(np.int64)
    jobs = [(i, t, int(edges[j]), int(edges[j + 1])) for i in range(B) for t in range(T) for j in range(splits)]

    def run(job):
        i, t, r0, r1 = job
        with _fenv(env):  # on the calling thread too: its own environment, set again
            _host_rank_rows(mm[t][i], out[i, t], r0, r1, bb[i], flush=flush)

    list(map(run, jobs) if workers == 1 else _pool().map(run, jobs))


def _leaf_rows(x: jax.Array) -> jax.Array:
    """``(R, m)`` view of a leaf: rows are its leading axis (one row for vectors and scalars)."""
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def difference_ranks(base: Float[Array, "*shape"], models: Sequence[Float[Array, "*shape"]], *,
                     impl: Literal["auto", "xla", "host"] = "auto") -> Int[Array, "T R m"]:
    """Ranks of ``|models[t] - base|`` (float32 differences) within the rows of the leaf, int32 ``(T, R, m)``.

    Rows are the leaf's leading axis (one row for vectors and scalars); the ranks equal
    ``magnitude_ranks(stack([m - base for m in models]).reshape(T, R, m))`` (float32 differences of the
    inputs widened to float32). On the host path with float32 or bfloat16 inputs (one CPU device, and the C
    library's ``fegetenv`` / ``fesetenv``), the callback reads the inputs themselves and makes the
    differences block by block, instead of XLA writing the stacked task vectors for
    it (a ``(3, 1024, 2816)`` leaf: ~22 ms less of ~80). Its threads take the calling XLA thread's
    floating-point environment, in which denormal inputs and results are flushed to zero as in XLA's own
    kernels, so every difference has XLA's bits (``tests/test_rank.py`` checks denormal differences). JAX 0.12.1
    calls host callbacks on a thread that does not flush; the differences are then flushed explicitly (inputs
    and results), the same bits.

    Args:
      base: the base leaf.
      models: the fine-tuned leaves, each of ``base``'s shape.
      impl: as in :func:`magnitude_ranks`.

    Returns:
      int32 ranks ``(T, R, m)``.

    References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024) (MagPrune's ranks of the task vectors).
    """
    rows = [_leaf_rows(jnp.asarray(x)) for x in [base, *models]]
    R, m = rows[0].shape
    T = len(models)
    wide = all(r.dtype in (jnp.float32, jnp.bfloat16) for r in rows)
    if not (_use_host(impl) and wide and _FENV is not None and m > 1 and R * m > 0):
        tau = jnp.stack([jnp.asarray(r, jnp.float32) - jnp.asarray(rows[0], jnp.float32) for r in rows[1:]])
        return magnitude_ranks(tau, impl=impl)
    _xla_flushes()  # probed here, at trace time: the callback reads the answer
    result = jax.ShapeDtypeStruct((T, R, m), _rank_dtype(m))
    if _buffer_callback is not None:
        r = _buffer_callback(_difference_ranks_in_place, result, vmap_method="broadcast_all")(*rows)
    else:
        r = jax.pure_callback(_host_difference_ranks, result, *rows, vmap_method="broadcast_all")
    return r.astype(jnp.int32)


def _use_host(impl: str) -> bool:
    if impl not in ("auto", "xla", "host"):
        raise ValueError(f"magnitude_ranks: impl must be 'auto', 'xla' or 'host', got {impl!r}.")
    return impl == "host" or (impl == "auto" and jax.default_backend() == "cpu" and jax.device_count() == 1)


def _pair_sort_ranks(keys: jax.Array, pos: jax.Array) -> jax.Array:
    """Exact ranks from one stable sort of (key, position) pairs, then its inverse."""
    ax = keys.ndim - 1
    _, perm = lax.sort((keys, pos), dimension=ax, is_stable=True, num_keys=1)
    if keys.shape[-1] > 1 << 15:
        _, ranks = lax.sort((perm, pos), dimension=ax, is_stable=True, num_keys=1)
        return ranks
    packed = lax.sort(lax.shift_left(perm, np.int32(16)) | pos, dimension=ax, is_stable=False)
    return packed & np.int32(0xFFFF)


def _sorted_ranks(keys: jax.Array, pos: jax.Array, b: int, window: int):
    """Steps 1-2: ``(perm, ranks_sorted, needs_exact)``. ``perm[..., q]`` is the row position of the
    ``q``-th entry in (high bits, position) order, ``ranks_sorted[..., q]`` its exact rank unless
    ``needs_exact`` (a scalar: some long run holds different keys)."""
    m = keys.shape[-1]
    ax = keys.ndim - 1
    low = np.int32((1 << b) - 1)
    srt = lax.sort((keys & ~low) | pos, dimension=ax, is_stable=False)  # unique values: one operand
    perm = srt & low
    ks = jnp.take_along_axis(keys, perm, axis=ax, mode="promise_in_bounds")  # keys in sorted order
    L = max(0, min(int(window), m - 1))
    # ks padded with L keys below every key in front and L above every key behind: out-of-row neighbours
    # are never inversions, so one fusion reads shifted windows of one array
    kp = jnp.concatenate([jnp.full(keys.shape[:-1] + (L,), -1, jnp.int32), ks,
                          jnp.full(keys.shape[:-1] + (L,), np.iinfo(np.int32).max, jnp.int32)], axis=ax)
    delta = jnp.zeros(keys.shape, jnp.int32)
    for d in range(1, L + 1):
        after = kp[..., L + d:L + d + m]  # ks[q + d]: a smaller key there is an inversion (same run)
        before = kp[..., L - d:L - d + m]  # ks[q - d]: a larger key there is an inversion (same run)
        delta = delta + (after < ks).astype(jnp.int32) - (before > ks).astype(jnp.int32)
    if m > L + 1:
        # sorted positions q and q + L + 1 in one run (equal high bits) with a key change between: a longer
        # run holding different keys, where an inversion may lie beyond the window
        n = m - L - 1
        far = (srt[..., :n] >> b) == (srt[..., L + 1:] >> b)
        diff = ks[..., 1:] != ks[..., :-1]  # (m - 1)
        change = diff[..., 0:n]
        for j in range(1, L + 1):
            change = change | diff[..., j:j + n]
        needs_exact = jnp.any(far & change)
    else:
        needs_exact = jnp.asarray(False)
    return perm, pos + delta, needs_exact


def magnitude_ranks(x: Float[Array, "*rows m"], *, window: int | None = None,
                    impl: Literal["auto", "xla", "host"] = "auto") -> Int[Array, "*rows m"]:
    """Ascending rank of ``|x|`` along the last axis (ties by lower index; NaN ranks as +inf), int32.

    Args:
      x: any float array; ranked as float32 along its last axis (``-0.0 == 0.0``).
      window: places on either side within which the packed sort's order is corrected (a cost knob:
        the result is exact for every value; a larger window makes the exact fallback rarer and costs one
        more read of the sorted keys per place). Default: 7 for rows up to 4096 entries, 23 up to 8192,
        47 up to 16384. XLA path only.
      impl: ``"xla"`` (the packed sort above), ``"host"`` (NumPy sorts through a host callback),
        ``"auto"`` (default): the host on a CPU backend with one device, XLA elsewhere. Same result.

    Returns:
      int32 ranks of ``x``'s shape, a permutation of ``0 .. m-1`` in each row.

    References: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024) (MagPrune's ranks).
    """
    m = x.shape[-1]
    ax = x.ndim - 1
    if m <= 1 or x.size == 0:
        return jnp.zeros(x.shape, jnp.int32)
    if _use_host(impl):
        result = jax.ShapeDtypeStruct(x.shape, _rank_dtype(m))
        if _buffer_callback is not None:
            r = _buffer_callback(_ranks_in_place, result, vmap_method="expand_dims")(jnp.asarray(x, jnp.float32))
        else:
            r = jax.pure_callback(_host_ranks, result, jnp.asarray(x, jnp.float32), vmap_method="expand_dims")
        return r.astype(jnp.int32)
    keys = _keys(x, magnitude=True)  # int32 in [0, 0x7F800000], monotone in |x|
    pos = lax.broadcasted_iota(jnp.int32, x.shape, ax)
    b = max(1, (m - 1).bit_length())
    if b > _MAX_PACKED_BITS or jax.device_count() > 1:
        # with several devices the leaf may be sharded, and the SPMD partitioner all-gathers the operands
        # of the gather and scatter below (the pair sort reshards whole rows with an all-to-all instead)
        return _pair_sort_ranks(keys, pos)
    if window is None:
        window = _WINDOWS.get(b, _WINDOW)
    perm, ranks_sorted, needs_exact = _sorted_ranks(keys, pos, b, window)

    def fast():  # ranks back in row order: rank[perm[q]] = ranks_sorted[q], a scatter batched over the rows
        put = lambda p, r: jnp.zeros(p.shape, jnp.int32).at[p].set(r, unique_indices=True, mode="promise_in_bounds")
        for _ in range(ax):
            put = jax.vmap(put)
        return put(perm, ranks_sorted)

    return lax.cond(needs_exact, lambda: _pair_sort_ranks(keys, pos), fast)
