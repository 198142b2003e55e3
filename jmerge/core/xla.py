"""Workarounds for XLA:CPU, in one place. Each is guarded by a test on the compiled HLO
(``tests/test_xla_workarounds.py``), so a JAX release that no longer needs one, or breaks one, shows.

1. :func:`model_sum` / :func:`model_mean` / :func:`model_max`: reductions over the leading (model)
   axis, unrolled over its static size. XLA:CPU's add-reduction over a leading axis of a large leaf is
   pathologically slow (measured with JAX 0.10.2: 40-85 s for a ``(3, 5632, 2048)`` float32 array,
   0.05 s unrolled).
2. :func:`materialized`: compute a value into a buffer of its own (the result of a conditional whose
   predicate is always true but traced), so XLA does not fuse its computation into every consumer.
   ``optimization_barrier`` does not survive XLA:CPU's pipeline.
3. :func:`loop_variant`: an operand read inside a ``while`` loop, made loop-variant through a bit-exact
   select on a loop-carried value. XLA hoists loop-invariant code (such as building ``tau`` from the
   models, or an int32 key transform) out of loops and materializes it as a full-size copy, and JAX
   0.12's XLA:CPU runs a loop whose body reads nothing loop-variant as one single-threaded call
   (``xla_cpu_small_call``; measured: a ``(1024, 2816)`` TIES leaf 30% slower).
4. :func:`honest_cost`: a small float sum in a loop body. XLA:CPU (JAX >= 0.11) runs a ``while`` loop
   whose estimated bytes accessed are small as one single-threaded kernel, and it underestimates
   integer counting passes (measured: the top-k search on a 2.9M-entry leaf 4x slower on 2 cores).
   The sum reads a slice taken *before* any conversion: JAX 0.10's XLA otherwise hoists the full-size
   float32 conversion of the inputs out of the loop.
5. :func:`split_blocks`: split only the last dimension into blocks of ``width``. Splitting a flattened
   2-D tensor makes JAX 0.12's XLA:CPU compute each element's row and column with a division inside
   loops (measured 4x slower); and counting over small blocks first keeps XLA:CPU from materializing
   the operand of a long reduction (its tree-reduction rewrite).
6. :func:`rows`: per-model slices ``x[t]`` in a Python list. XLA fuses an elementwise mask into its
   consumers only when they index per model row, not when they reshape the stack: the TIES trim,
   election and disjoint merge then run as one pass over the models.
7. :func:`totals`: the sums of several arrays computed from shared inputs in one variadic reduction.
   XLA:CPU fuses each reduction with its own copy of the producing expression, so six sums of values
   derived from the models read the models six times (EMR's rescaler statistics: 43 ms per
   ``(3, 1024, 2816)`` leaf as separate sums, 8 ms as one variadic reduce). :func:`counts` of a single
   mask counts its complement too: a lone reduction over every axis is rewritten into reduce-windows
   over the mask written to memory (SCE's nonzero count 6 -> 1 ms).

8. :func:`bernoulli`: ``jax.random.bernoulli`` with the same bits, its threefry hash unrolled. On CPU,
   JAX lowers threefry2x32 as a ``fori_loop`` of 5 steps over full-size arrays, so every draw writes and
   reads two full-size uint32 arrays five times and nothing fuses into the consumer (DARE on a
   ``(3, 1024, 2816)`` leaf: 0.48 s for the bits against 0.07 s for task arithmetic).
9. :func:`fast_compile_options`: XLA:CPU compile options for programs whose run time is small next to
   their compile time (``FAST_COMPILE_OPTIONS``: XLA's elemental emitters instead of its MLIR fusion
   emitters, LLVM at -O1). JAX 0.10.2's XLA:CPU spends about 2 s compiling each TIES per-tensor program
   (LLVM ~45%, the fusion emitters ~25%); these options cut that ~40% with bit-identical outputs, for
   kernels up to ~1 ns per model entry slower (measured on a 0.54B Llama TIES merge, ``jmerge merge``:
   compile 9.4 -> 5.8 s, cold wall 21.6 -> 11.6 s, warm unchanged within noise; a ``(3, 5632, 2048)``
   leaf 90 -> 110 ms at best; Breadcrumbs' compile barely changes). The pipeline uses them for a program
   when the entries it will process (models x entries, over all tensors of its shape) are at most
   ``FAST_COMPILE_MAX_WORK``. Empty where XLA rejects them (JAX 0.12 has only the fusion emitters; no
   option found there cuts compile time) or the default backend is not the CPU.
10. :func:`sign`: ``jnp.sign`` of a float array as two selects, bit for bit (``±0`` and NaN kept).
   XLA:CPU's ``sign`` does not vectorize: a sum of ``sign(x)`` over a ``(1024, 2816)`` float32 leaf
   takes 10.6 ms, of a select 2.2 ms (JAX 0.10.2); EMR's statistics 30 -> 8 ms per leaf.
11. :func:`jmerge.core.select.threshold_word`: a top-k mask as an int32 word made without compares. A
   mask (a compare or select) shared by several operands of one variadic reduction is emitted
   unvectorized by XLA:CPU: three masked sums over a ``(1024, 2816)`` leaf 12.6 ms, 4.9 ms with the
   word (``bits & word``), 2.5 ms unmasked.
12. :func:`uniform_exp` and :func:`unfused`: arithmetic whose bits do not depend on an entry's position.
   XLA:CPU's LLVM contracts a multiply and the add that consumes it into one FMA in the vector lanes of
   some fusions and not in their remainder (the last entries of a row that do not fill a vector), and
   JAX 0.12's ``exp`` differs in the last bit between the two (measured on an AVX-512 machine:
   ``exp(-1.7454545)`` is 0.17456561 in the vector lanes of a ``(3, 4, 5)`` fusion and 0.17456563 in its
   fifth column). :func:`unfused` rounds a product to float32 by adding a zero the compiler cannot see
   (:func:`opaque_zero`; an FMA of the product and that zero is the rounded product); :func:`uniform_exp`
   is built from such steps (a Llama-sized PCB leaf ~15% slower than with XLA's ``exp``). Scores of
   equal inputs are then equal, and a top-k breaks their tie by position on every machine (PCB).

References: none (compiler behaviour measured on this project's machines; see README "Findings").
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

__all__ = ["model_sum", "model_mean", "model_max", "materialized", "loop_variant", "honest_cost",
           "split_blocks", "rows", "totals", "row_totals", "counts", "sign", "opaque_zero", "unfused", "uniform_exp", "bernoulli",
           "offset_draws", "HONEST_COST_MIN", "HONEST_COST_ENTRIES",
           "fast_compile_options", "FAST_COMPILE_OPTIONS", "FAST_COMPILE_MAX_WORK"]

HONEST_COST_ENTRIES = 16384  # entries of the float sum of :func:`honest_cost`
HONEST_COST_MIN = 65536  # loops over rows at least this long need it (shorter loops are cheap either way)


def _unrolled(op, x, keepdims: bool):
    x = list(x) if isinstance(x, (list, tuple)) else jnp.asarray(x)  # rows as given: not stacked
    out = x[0]
    for i in range(1, len(x)):
        out = op(out, x[i])
    return out[None] if keepdims else out


def model_sum(x: Float[Array, "T *shape"], keepdims: bool = False) -> Float[Array, "*shape"]:
    """Sum over the leading (model) axis, unrolled over its static size (workaround 1).

    Use this, not ``jnp.sum(x, axis=0)``, for per-entry reductions over tasks. ``x`` may be a list of rows
    (summed as given, never stacked).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    return _unrolled(jnp.add, x, keepdims)


def model_mean(x: Float[Array, "T *shape"], keepdims: bool = False) -> Float[Array, "*shape"]:
    """Mean over the leading (model) axis (see :func:`model_sum`).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    return model_sum(x, keepdims) / jnp.asarray(x).shape[0]


def model_max(x: Float[Array, "T *shape"], keepdims: bool = False) -> Float[Array, "*shape"]:
    """Maximum over the leading (model) axis, unrolled (see :func:`model_sum`).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    return _unrolled(jnp.maximum, x, keepdims)


def materialized(fn: Callable[[], jax.Array], probe: jax.Array) -> jax.Array:
    """``fn()`` computed into a buffer of its own (workaround 2).

    The predicate is always true but traced (``p == p`` or ``p`` is NaN, ``p`` the first entry of
    ``probe``); the other branch never runs.
    """
    out = jax.eval_shape(fn)
    return lax.cond(_always_true(probe), fn, lambda: jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out))


def _always_true(probe: jax.Array) -> jax.Array:
    """``p == p | p != p`` of ``probe``'s first entry: true, but traced (XLA cannot fold it)."""
    probe = jnp.asarray(probe)
    p = probe[(0,) * probe.ndim] if probe.size else jnp.zeros((), probe.dtype)  # indexed: a flattened
    return (p == p) | (p != p)  # sharded probe would be gathered


def loop_variant(a: jax.Array, m: Any) -> jax.Array:
    """``a`` itself, made loop-variant to XLA when ``m`` is a loop-carried copy of a nonzero int32
    (workaround 3). Outside loops pass a NumPy integer: ``a`` is returned as is."""
    if isinstance(m, np.integer):
        return a
    return jnp.where(m != 0, a, jnp.zeros((), a.dtype))


def honest_cost(x: jax.Array, never: jax.Array) -> jax.Array:
    """``never`` (an always-false traced bool) combined with a float sum over ``x``: about
    :data:`HONEST_COST_ENTRIES` entries sliced from the raw inputs (a strided slice of each axis, so
    that a sharded input is summed where it lives, never gathered), so that XLA:CPU's cost model sees
    the loop body read float data (workaround 4).

    Apply it only to loops over at least :data:`HONEST_COST_MIN` entries."""
    touch = jnp.sum(jnp.asarray(x, jnp.float32))
    return never & (touch != 0)


def split_blocks(x: jax.Array, width: int):
    """``(R, ...)`` -> main part in blocks of ``width`` along the last axis, and a flat tail (workaround 5).

    When ``x`` has more than two dimensions and its last dimension is a multiple of ``width``, the
    blocks split only that dimension: ``(R, *shape[:-1], L / width, width)`` with an empty tail.
    Otherwise the flattened rows are split: ``(R, n0 / width, width)`` and the tail ``(R, n - n0)``.
    """
    if x.ndim > 2 and x.shape[-1] % width == 0:
        return x.reshape(x.shape[:-1] + (x.shape[-1] // width, width)), x.reshape(x.shape[0], -1)[:, :0]
    x = x.reshape(x.shape[0], -1)
    R, n = x.shape
    n0 = n // width * width
    return x[:, :n0].reshape(R, n0 // width, width), x[:, n0:]


def rows(x: jax.Array) -> list:
    """The per-model slices ``[x[0], ..., x[T-1]]`` (workaround 6)."""
    return [x[t] for t in range(x.shape[0])]


def row_totals(*xs: jax.Array) -> list:
    """The sums of each array (all of one shape) along its last axis, in one variadic reduction
    (workaround 7); float32, each of shape ``shape[:-1]``.
    """
    shape = xs[0].shape
    if not shape:
        return [jnp.asarray(x, jnp.float32) for x in xs]
    ops = tuple(jnp.asarray(x, jnp.float32) for x in xs)
    zero = tuple(np.float32(0) for _ in ops)
    return list(lax.reduce(ops, zero, lambda a, b: tuple(x + y for x, y in zip(a, b)), (len(shape) - 1,)))


def counts(*masks: jax.Array) -> list:
    """The number of True entries of each boolean array (all of one shape), int32, in one variadic
    reduction over every axis of that shape (not flattened: a sharded array is counted where it lives).
    Exact, so in any order the same numbers; ``jnp.sum`` of a computed mask has XLA:CPU (JAX 0.10) write
    the mask as int32 to memory first (workaround 7).
    """
    if len(masks) == 1 and jnp.ndim(masks[0]) >= 1:
        # One mask alone is a plain reduce, which XLA:CPU rewrites into a tree of reduce-windows over the
        # mask written to memory: count it with its complement and use both counts (a + b = n).
        m = jnp.asarray(masks[0], bool)
        a, b = counts(m, ~m)
        return [a + (np.int32(m.size) - b - a) // 2]
    ops = tuple(jnp.asarray(m).astype(jnp.int32) for m in masks)
    if ops[0].ndim == 0:
        return list(ops)
    zero = tuple(np.int32(0) for _ in ops)
    return list(lax.reduce(ops, zero, lambda a, b: tuple(x + y for x, y in zip(a, b)), tuple(range(ops[0].ndim))))


def totals(*xs: jax.Array, flatten: bool = True) -> list:
    """The sum of each array (all of one shape), computed in one variadic reduction (workaround 7).

    Rows (the last axis) are reduced together first (:func:`row_totals`, over the array reshaped to
    rows), then the row sums of each array; float32. ``flatten=False`` reduces the arrays' last axis
    in their own shape (a sharded leaf is reduced where it lives, never gathered); a 0-d array is its
    own sum.
    """
    shape = xs[0].shape
    if not flatten:
        if not shape:
            return [jnp.asarray(x, jnp.float32) for x in xs]
        return [jnp.sum(p) for p in row_totals(*xs)]
    cols = shape[-1] if len(shape) >= 1 else 1
    return [jnp.sum(p) for p in row_totals(*(jnp.reshape(x, (-1, cols)) for x in xs))]


_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))


def sign(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """``jnp.sign(x)`` for a float ``x``, bit for bit, as selects that XLA:CPU vectorizes (workaround 10).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    x = jnp.asarray(x)
    one = jnp.ones((), x.dtype)
    return jnp.where(x > 0, one, jnp.where(x < 0, -one, x))


def opaque_zero(probe: jax.Array) -> jax.Array:
    """A float32 0 that neither XLA nor LLVM can fold: the result of a conditional on workaround 2's
    always-true traced predicate, so the kernels that use it load it from memory (workaround 12).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    return lax.cond(_always_true(probe), lambda: jnp.zeros((), jnp.float32), lambda: jnp.ones((), jnp.float32))


def unfused(x: Float[Array, "*shape"], zero: jax.Array) -> Float[Array, "*shape"]:
    """float32 ``x + zero`` (``zero`` from :func:`opaque_zero`): ``x`` itself (``-0`` becomes ``+0``), but a
    product passed through it is rounded to float32 before the add that consumes it, in every lane: a
    contracted ``fma(a, b, zero)`` is the rounded product too (workaround 12).

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    return jnp.asarray(x, jnp.float32) + zero


_LN2_HI = np.float32(0.693359375)  # ln 2 in 9 bits: k * _LN2_HI is exact for |k| < 2**15
_LN2_LO = np.float32(np.log(2.0) - 0.693359375)
_EXP_TAYLOR = tuple(np.float32(1.0 / np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(8))


def uniform_exp(x: Float[Array, "*shape"], zero: jax.Array | None = None) -> Float[Array, "*shape"]:
    """``exp(x)`` of float32 ``x`` to about an ulp, the same bits in every lane (workaround 12).

    ``x = k ln 2 + r`` with ``k = round(x / ln 2)`` (Cody-Waite: ln 2 split in two so that ``k ln 2`` loses
    nothing), ``exp(r)`` by its Taylor polynomial of degree 7 (``|r| <= ln 2 / 2``: truncation below
    5.3e-9 relative), times ``2**k`` built in the exponent bits (two normal powers of two). Every product
    that feeds an add is :func:`unfused` (``zero``: an :func:`opaque_zero`; made here when not given). 0
    below -87.3 (where ``exp`` is subnormal or less: 0 on an XLA:CPU that flushes subnormals), ``inf``
    above ``log(float32 max) = 88.7228``, NaN for NaN. Measured: within 1.19 ulp of float64 ``exp`` on
    [-87.2, 88.72] (0.93 with FMAs, which some lanes would take and others not).

    References: Cody and Waite, "Software Manual for the Elementary Functions" (1980) (argument
    reduction).
    """
    x = jnp.asarray(x, jnp.float32)
    z = opaque_zero(x) if zero is None else zero
    xc = jnp.clip(x, np.float32(-87.3), np.float32(88.7228))
    k = jnp.floor(unfused(xc * np.float32(1.0 / np.log(2.0)), z) + np.float32(0.5))
    r = (xc - k * _LN2_HI) - unfused(k * _LN2_LO, z)  # k * _LN2_HI is exact: an FMA changes nothing
    p = _EXP_TAYLOR[7]
    for c in reversed(_EXP_TAYLOR[:7]):
        p = unfused(p * r, z) + c
    ki = k.astype(jnp.int32)
    half = lax.shift_right_arithmetic(ki, np.int32(1))  # 2**k as two normal powers of two (k in [-126, 128])
    pow2 = lambda e: lax.bitcast_convert_type(lax.shift_left(e + np.int32(127), np.int32(23)), jnp.float32)
    y = (p * pow2(half)) * pow2(ki - half)
    y = jnp.where(x > np.float32(88.7228), np.float32(np.inf), y)
    return jnp.where(x < np.float32(-87.3), np.float32(0.0), y)


def _threefry2x32(k1, k2, x0, x1):
    """The Threefry-2x32 hash (20 rounds), unrolled: JAX's own definition, written out elementwise."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROT[i % 2]:
            x0 = x0 + x1
            x1 = lax.shift_left(x1, np.uint32(r)) | lax.shift_right_logical(x1, np.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def offset_draws() -> bool:
    """Whether :func:`bernoulli` can draw a block of a tensor at a flat ``offset`` (the threefry bits it computes
    itself): JAX's default PRNG is threefry and ``jax_threefry_partitionable`` is on (JAX's default).

    References: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011) (Threefry).
    """
    return bool(jax.config.jax_threefry_partitionable) and "threefry" in str(jax.config.jax_default_prng_impl)


def bernoulli(key: jax.Array, p: Float[Array, "*shape"], offset: Any = None, whole: int | None = None,
              block_ndim: int | None = None) -> jax.Array:
    """``jax.random.bernoulli(key, p)`` (bool, ``p``'s shape, float32 ``p``), bit for bit (workaround 8).

    The same partitionable threefry bits (``bits1 ^ bits2`` of the hash of each entry's flat index)
    and the same uniform (``(bits >> 9) * 2**-23``), computed elementwise so that XLA fuses the draw
    into its consumers. Falls back to ``jax.random.bernoulli`` where the bits would differ: a key
    that is not a threefry key, ``jax_threefry_partitionable`` off, or 2**32 entries or more.

    With ``offset`` (a uint32 scalar, traced or not), ``whole`` and ``block_ndim``: ``p``'s last ``block_ndim``
    axes are a block of a tensor of ``whole`` entries starting at flat index ``offset`` (rows of it), and its
    leading axes index copies of that tensor (the models); the draw is the one of the whole ``(*leading, tensor)``
    array at the block's entries. No fallback then (:func:`offset_draws` says when it would be needed): an error,
    also where the whole array has 2**32 entries or more.

    References: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011) (Threefry);
    JAX's ``jax.random`` (the bits reproduced).
    """
    p = jnp.asarray(p)
    shape = p.shape
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else ""
    lead = shape[:len(shape) - block_ndim] if offset is not None else ()
    total = int(np.prod(lead, dtype=np.int64)) * int(whole) if offset is not None else int(np.prod(shape))
    if (p.dtype != jnp.float32 or not typed or key.shape != () or "threefry" not in impl
            or not jax.config.jax_threefry_partitionable or total >= 2 ** 32):
        if offset is not None:
            raise ValueError("bernoulli: a block at a flat offset needs a threefry key with jax_threefry_partitionable "
                             "on and a float32 p; merge the tensor whole instead")
        return jax.random.bernoulli(key, p)
    kd = jax.random.key_data(key)
    k1, k2 = kd[0], kd[1]
    lo = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):  # the flat (row-major) index, < 2**32: the high word is 0
        if offset is not None and d == len(lead) - 1:  # the leading axes step over whole tensors
            stride = int(whole)
        lo = lo + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
        stride *= shape[d]
    if offset is not None:  # the block's first entry in its tensor
        lo = lo + jnp.asarray(offset, jnp.uint32)
    b0, b1 = _threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), lo)
    bits = b0 ^ b1
    u = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000),
                                 jnp.float32) - np.float32(1.0)
    return jnp.maximum(np.float32(0.0), u) < p


# 9: XLA:CPU debug options (names of xla.proto's DebugOptions) that cut compile time, outputs unchanged
FAST_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
# workaround 9 pays when ~0.6 s of compile saved per program exceeds ~1 ns (kernel) per model entry processed,
# of which a pipelined merge's wall time shows a fifth or less (0.54B TIES: warm wall unchanged within noise)
FAST_COMPILE_MAX_WORK = 2 ** 30


@functools.cache
def fast_compile_options() -> dict:
    """``FAST_COMPILE_OPTIONS`` where this XLA accepts them and the default backend is the CPU, else ``{}``
    (workaround 9). Checked once per process by compiling a one-entry program with them.

    References: none (an XLA workaround measured on this project's machines; see the README "Findings").
    """
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=FAST_COMPILE_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an XLA without these options (JAX >= 0.11: "No such compile option")
        return {}
    return dict(FAST_COMPILE_OPTIONS)
