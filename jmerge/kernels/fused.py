"""The TIES family's final pass as one Pallas kernel: select, elect signs, aggregate, write ``base + delta``.

One pass over a leaf: each block of the models and the base (or of stacked task vectors) is read once;
the kernel forms the task vectors, applies each model's selection (per-row top-k thresholds, explicit
masks, or none), elects one sign per entry, aggregates the entries that agree with it, scales, adds
the base and writes the output in its dtype. The arithmetic is jmerge's, operation for operation
(``jmerge.methods.ties``: ``elect_sign``, ``disjoint_merge``, ``scale`` and the driver's
``base + merged``), so in the Pallas interpreter the result equals the XLA path bit for bit:

- task vectors ``tau_t = r(r(model_t) - r(base))`` (``r``: rounding to the emulated compute precision,
  the identity in float32; ``"bfloat16"`` is emulated here by round-to-nearest-even on the bits);
- masks (a random drop: DARE, DELLA): ``tau_t = where(mask_t, tau_t, 0) * f_t`` with optional per-model
  factors ``f_t`` (the drop's rescale; not rounded, as jmerge's drops);
- thresholds ``(v_t, cut_t)`` (int32, per model), of the values so far: an entry is kept when its
  magnitude key ``min(bits(|tau|), bits(inf))`` is above ``v_t``, or equal to it at a flat (row-major)
  position below ``cut_t`` (the exact top-k of ``jmerge.core.select``, ties broken by the lowest flat
  index); optional drop thresholds ``(v'_t, cut'_t)`` remove the entries the same rule selects (Model
  Breadcrumbs' outliers);
- election ``x_t = r(r(w_t) tau_t)`` (``weighted``) or ``tau_t``; ``sign = +1`` where ``r(sum_t x_t) >= 0``
  (``"sum"``) or ``sum_t sign(x_t) >= 0`` (``"count"``), else ``-1``: a zero vote elects ``+1``;
- ``c_t = r(r(w_t) tau_t)`` agrees when ``sign(c_t) == sign`` (zeros never agree);
  ``merged = r(sum agreeing c_t)``, divided for ``reduce="mean"`` by the number of agreeing models
  (``"count"``) or ``r(sum of their r(w_t))`` (``"weight"``), a zero divisor counting as 1;
- ``merged = r(scale * merged)``; output ``r(r(base) + merged)`` cast to ``out_dtype``.

Layout: a leaf of ``n`` entries is viewed as ``(n / 128, 128)`` when 128 divides ``n`` (blocks of
``block_rows x 128``), else as ``(1, n)`` (blocks of ``1 x 1024``); the last block may be ragged (Pallas
masks it). No input is padded or copied. Per-model scalars (weights, thresholds, scale) travel as small
``(rows, lanes)`` arrays (rows a power of two) read whole by every block.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Tillet et al., "Triton: An Intermediate Language and Compiler for Tiled Neural Network Computations"
(MAPL 2019) for the tiled-kernel model Pallas lowers to on GPU.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .arith import disjoint_aggregate

__all__ = ["masked_merge", "masked_merge_bytes", "PRECISIONS"]

PRECISIONS = (None, "bfloat16")
"""Compute precisions the kernel emulates (float32 = ``None``); jmerge's float16 emulation stays on XLA."""

_LANES = 128
_FLAT_LANES = 1024  # block width of the (1, n) view of a leaf whose size 128 does not divide
_ABS = np.int32(0x7FFFFFFF)
_INF_KEY = np.int32(0x7F800000)
_SQUEEZED = getattr(pl, "squeezed", None)  # pl.squeezed in current JAX, None in older releases


def _check(what: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"masked_merge: {what}={value!r} is not supported; use one of {list(allowed)}.")


def _round_bf16(x):
    """``x`` (float32) rounded to bfloat16 and back, round-to-nearest-even on the bits (the value of
    ``lax.reduce_precision(x, 8, 7)``; NaN kept). Bit operations lower on every Pallas backend."""
    b = lax.bitcast_convert_type(x, jnp.uint32)
    b = (b + (np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return jnp.where(x != x, x, lax.bitcast_convert_type(b, jnp.float32))


def _body(xs, b, masks, sign, frow, irow, pos, *, T: int, stacked: bool, round_inputs: bool, has_masks: bool,
          mask_scale: bool, thresholds: bool, drop: bool, weighted: bool, sign_method: str, reduce: str,
          normalize_by: str, has_scale: bool, add_base: bool, precision: str | None, out_dtype):
    """The arithmetic of one block (the kernel) or of a whole leaf (the reference): ``xs`` the loaded models,
    ``b`` the base, ``masks``/``sign`` or None, ``frow(i)``/``irow(i)`` the scalar rows, ``pos`` flat positions."""
    r = _round_bf16 if precision == "bfloat16" else (lambda a: a)
    b = r(b.astype(jnp.float32)) if b is not None else None
    if stacked:
        taus = [x.astype(jnp.float32) for x in xs]
        taus = [r(x) for x in taus] if round_inputs else taus
    else:
        taus = [r(r(x.astype(jnp.float32)) - b) for x in xs]
    if has_masks:  # a drop (DARE, DELLA): zero the dropped entries, rescale the survivors (not rounded)
        taus = [jnp.where(m != 0, x, np.float32(0)) for m, x in zip(masks, taus)]
        if mask_scale:
            taus = [x * frow(2 * T + 1 + t) for t, x in enumerate(taus)]
    if thresholds:  # exact top-k by magnitude (ties: lowest flat index), of the values so far
        kept = []
        for t, x in enumerate(taus):
            key = jnp.minimum(lax.bitcast_convert_type(x, jnp.int32) & _ABS, _INF_KEY)
            above = lambda v, cut: (key > v) | ((key == v) & (pos < cut))
            keep = above(irow(t), irow(T + t))
            if drop:  # Breadcrumbs: not among the top-k outliers
                keep = keep & ~above(irow(2 * T + t), irow(3 * T + t))
            kept.append(jnp.where(keep, x, np.float32(0)))
        taus = kept
    ws = [r(frow(t)) for t in range(T)]
    if sign is not None:
        sign = sign.astype(jnp.float32)
    else:
        if weighted:
            wes = [r(frow(T + t)) for t in range(T)]
            x = [r(w * t) for w, t in zip(wes, taus)]
        else:
            x = taus
        if sign_method == "sum":
            votes = r(sum(x[1:], x[0]))
        else:
            votes = sum([jnp.sign(v) for v in x[1:]], jnp.sign(x[0]))
        sign = jnp.where(votes >= 0, np.float32(1), np.float32(-1))
    total = disjoint_aggregate(taus, ws, sign, reduce=reduce, normalize_by=normalize_by, r=r)
    if has_scale:
        total = r(frow(2 * T) * total)
    out = r(b + total) if add_base else total
    return out.astype(out_dtype)


def _kernel(*refs, T: int, has_base: bool, given_sign: bool, block: tuple[int, int], **static):
    it = iter(refs)
    xs = [next(it)[...] for _ in range(T)]
    b = next(it)[...] if has_base else None
    masks = [next(it)[...] for _ in range(T)] if static["has_masks"] else None
    sign = next(it)[...] if given_sign else None
    f_ref = next(it)  # float32: rows [0, T) weights, [T, 2T) election weights, 2T scale, [2T+1, 3T+1) mask scales
    i_ref = next(it) if static["thresholds"] else None  # int32: rows [0, T) v, [T, 2T) cut, then the drop's
    out_ref = next(it)
    pos = None
    if static["thresholds"]:
        br, lanes = block
        i = pl.program_id(0)
        lane = lax.broadcasted_iota(jnp.int32, (br, lanes), 1)
        if br == 1:  # the (1, n) view: blocks advance along the lanes
            pos = i * np.int32(lanes) + lane
        else:
            pos = (i * np.int32(br) + lax.broadcasted_iota(jnp.int32, (br, lanes), 0)) * np.int32(lanes) + lane
    out_ref[...] = _body(xs, b, masks, sign, lambda k: f_ref[k:k + 1, :],  # (1, lanes) rows, broadcast
                         (lambda k: i_ref[k:k + 1, :]) if i_ref is not None else None, pos, T=T, **static)


def _next_pow2(k: int) -> int:
    """The smallest power of two >= ``k`` (1 for ``k <= 1``)."""
    return 1 << max(0, int(k) - 1).bit_length()


def _pow2_rows(k: int) -> int:
    """Rows of a scalar table: a power of two >= 8 (Triton wants power-of-two blocks; TPU tiles are 8 rows)."""
    return max(8, _next_pow2(k))


def _as_rows(x, n: int, view: tuple[int, int], lead: tuple[int, ...] = ()):
    """``x`` (``lead`` axes, then ``n`` entries) as ``lead + view``; a view larger than ``n`` entries (exact
    blocks) is zero-padded at the end."""
    x = jnp.reshape(x, lead + (n,))
    if view[0] * view[1] != n:
        x = jnp.pad(x, ((0, 0),) * len(lead) + ((0, view[0] * view[1] - n),))
    return x.reshape(lead + view)


def _exact_layout(n: int, block_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(view, block)`` whose blocks tile the view exactly (no block overhangs the array).

    A leaf whose size 128 divides keeps its ``(n / 128, 128)`` view with the largest power-of-two block of at
    most ``block_rows`` rows that divides the rows (no copy); any other leaf gets a ``(1, m)`` view, ``m`` the
    size rounded up to a whole block of ``min(1024, next power of two >= n)`` lanes (a zero-padded copy).
    """
    if n % _LANES == 0:
        rows = n // _LANES
        br = max(1, min(int(block_rows), rows))
        br = 1 << (br.bit_length() - 1)
        while rows % br:
            br //= 2
        return (rows, _LANES), (br, _LANES)
    lanes = min(_FLAT_LANES, _next_pow2(n))
    return (1, -(-n // lanes) * lanes), (1, lanes)


def masked_merge(models: Any, base: Any = None, *, stacked: bool = False,
                 thresholds: tuple[Any, Any] | None = None, masks: Any = None, sign: Any = None,
                 drop_thresholds: tuple[Any, Any] | None = None, mask_scale: Any = None,
                 weights: Any = 1.0, elect_weights: Any = None, weighted: bool = True,
                 sign_method: str = "sum", reduce: str = "mean", normalize_by: str = "count",
                 scale: Any = None, precision: str | None = None, out_dtype: Any = None,
                 add_base: bool = True, round_inputs: bool = True, block_rows: int | None = None,
                 interpret: bool | None = None, reference: bool = False, exact_blocks: bool | None = None):
    """The TIES family's final pass in one fused Pallas kernel (see the module docstring for the formula).

    Args:
      models: the fine-tuned leaves (a sequence of ``T`` arrays of one shape, or one ``(T, *shape)``
        array), or with ``stacked=True`` the task vectors themselves; any float dtypes.
      base: the base leaf (``*shape``); needed unless ``stacked`` and ``add_base=False``.
      stacked: ``models`` are task vectors (``tau_t = r(models_t)``).
      thresholds: ``(v, cut)``, two ``(T,)`` int32 arrays: keep magnitude keys above ``v_t`` and those
        equal to it at flat positions below ``cut_t`` (the per-row top-k of ``jmerge.core.select``).
      masks: ``(T, *shape)`` (or ``T`` arrays) bool/int keep masks (a random drop: DARE, DELLA); applied
        before ``thresholds`` (which then rank the kept, rescaled values).
      mask_scale: ``(T,)`` float32 factors of the entries ``masks`` keep (DARE's ``1 / density`` or
        L1 rescale); not rounded, as jmerge's drops.
      drop_thresholds: ``(v, cut)`` like ``thresholds``, of entries to drop among those ``thresholds``
        keep (Model Breadcrumbs' outliers: the top ``gamma`` fraction).
      sign: an elected sign (``*shape``, +1/-1, any dtype): skips the election.
      weights: scalar or ``(T,)`` weights of the contributions (may be traced).
      elect_weights: the election's weights (default ``weights``); used when ``weighted``.
      weighted, sign_method: jmerge's ``elect_sign`` options.
      reduce, normalize_by: jmerge's ``disjoint_merge`` options.
      scale: the final scale (may be traced); None skips it.
      precision: None (float32) or ``"bfloat16"`` (emulated, as ``jmerge.merge(compute_dtype=...)``).
      out_dtype: the output dtype with ``add_base`` (default the base's); float32 without.
      add_base: write ``r(r(base) + merged)``; else the (scaled) merged task vector in float32.
      round_inputs: with ``stacked``, round the task vectors to ``precision`` first (False: they are
        intermediate values of a merge, used as they are, e.g. DARE's rescaled survivors).
      block_rows: rows of 128 entries per block (a power of two; default on a GPU 32 for up to 2 models and
        16 for more, the fastest on an H200 at T=2 and T=4; 512 elsewhere).
      interpret: run the Pallas interpreter; default True on CPU.
      exact_blocks: blocks that tile the leaf's view exactly (:func:`_exact_layout`; smaller row blocks, or
        a zero-padded copy of a leaf 128 does not divide). Default: compiled for a GPU. JAX's Triton lowering
        before 0.12 does not mask a block that overhangs the array: its loads and stores run past the buffers
        (on an H200 with JAX 0.11.2 this overwrote other live arrays, 2026-11-30).
      reference: compute the same arithmetic with jax.numpy on the whole leaf instead (one XLA fusion, no
        Pallas): the kernel's reference in tests and benchmarks.

    Returns:
      The ``(*shape)`` output.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    _check("precision", precision, PRECISIONS)
    _check("sign_method", sign_method, ("sum", "count"))
    _check("reduce", reduce, ("mean", "sum"))
    _check("normalize_by", normalize_by, ("count", "weight"))
    if drop_thresholds is not None and thresholds is None:
        raise ValueError("masked_merge: drop_thresholds needs thresholds (the entries kept before the drop).")
    if mask_scale is not None and masks is None:
        raise ValueError("masked_merge: mask_scale needs masks (it rescales the entries they keep).")
    xs = [jnp.asarray(m) for m in models] if not hasattr(models, "shape") else \
        [jnp.asarray(models)[t] for t in range(models.shape[0])]
    if not xs:
        raise ValueError("masked_merge: no models.")
    T = len(xs)
    shape = xs[0].shape
    if any(x.shape != shape for x in xs):
        raise ValueError(f"masked_merge: the models' shapes differ: {[x.shape for x in xs]}.")
    need_base = add_base or not stacked
    if need_base:
        if base is None:
            raise ValueError("masked_merge: base is needed (models not stacked, or add_base).")
        base = jnp.asarray(base)
        if base.shape != shape:
            raise ValueError(f"masked_merge: base {base.shape} and models {shape} differ in shape.")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    backend = jax.default_backend()
    n = int(np.prod(shape, dtype=np.int64))
    if n >= 2 ** 31:
        raise ValueError(f"masked_merge: a leaf of {n} entries is too large for int32 positions; split it.")
    out_dt = jnp.float32 if not add_base else jnp.dtype(out_dtype if out_dtype is not None else base.dtype)
    if n == 0:
        return jnp.zeros(shape, out_dt)
    if block_rows is None:
        block_rows = (32 if T <= 2 else 16) if backend == "gpu" else 512
    if int(block_rows) < 1 or int(block_rows) & (int(block_rows) - 1):
        raise ValueError(f"masked_merge: block_rows must be a power of two, got {block_rows}.")
    if exact_blocks is None:
        exact_blocks = backend == "gpu" and not interpret
    if exact_blocks and not reference:
        view, block = _exact_layout(n, int(block_rows))
        along_rows = view[0] > 1
        grid = (view[0] // block[0] if along_rows else view[1] // block[1],)
        index = (lambda i: (i, 0)) if along_rows else (lambda i: (0, i))
    elif n % _LANES == 0:
        rows = n // _LANES
        br = min(int(block_rows), _next_pow2(rows))  # no block larger than the leaf needs
        if backend == "tpu" and br < rows:
            br = max(br, 8)
        view, block = (rows, _LANES), (br, _LANES)
        grid = (-(-rows // br),)
        index = lambda i: (i, 0)
    else:
        view, block = (1, n), (1, _FLAT_LANES)
        grid = (-(-n // _FLAT_LANES),)
        index = lambda i: (0, i)
    lanes = block[1]
    spec = pl.BlockSpec(block, index)

    def full_spec(a):
        return pl.BlockSpec(a.shape, lambda i: (0, 0))

    def per_model(arrays, stacked_array):
        """``T`` operands and specs: one stacked ``(T, *view)`` array read at block ``(t, ...)`` (no copy of
        its rows), else each array in its own view; the reference always gets the rows."""
        if stacked_array is not None and not reference:
            a = _as_rows(stacked_array, n, view, lead=(T,))
            return [a] * T, [pl.BlockSpec((_SQUEEZED,) + block, lambda i, t=t: (t,) + index(i)) for t in range(T)]
        return [_as_rows(x, n, view) for x in arrays], [spec] * T

    operands, specs = per_model(xs, jnp.asarray(models) if hasattr(models, "shape") else None)
    if need_base:
        operands.append(_as_rows(base, n, view))
        specs.append(spec)
    if masks is not None:
        ms = [jnp.asarray(m) for m in masks] if not hasattr(masks, "shape") else \
            [jnp.asarray(masks)[t] for t in range(masks.shape[0])]
        if len(ms) != T or any(m.shape != shape for m in ms):
            raise ValueError(f"masked_merge: masks must be {T} arrays of shape {shape}.")
        ops, sps = per_model([m.astype(jnp.int8) for m in ms],
                             jnp.asarray(masks).astype(jnp.int8) if hasattr(masks, "shape") else None)
        operands += ops
        specs += sps
    if sign is not None:
        sign = jnp.asarray(sign)
        if sign.shape != shape:
            raise ValueError(f"masked_merge: sign {sign.shape} must have the models' shape {shape}.")
        operands.append(_as_rows(sign.astype(jnp.int8), n, view))
        specs.append(spec)
    nf = 3 * T + 1 if mask_scale is not None else 2 * T + 1
    nrows = _pow2_rows(nf)
    w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (T,))
    we = w if elect_weights is None else jnp.broadcast_to(jnp.asarray(elect_weights, jnp.float32), (T,))
    sc = jnp.asarray(1.0 if scale is None else scale, jnp.float32).reshape(1)
    ms_ = [] if mask_scale is None else [jnp.broadcast_to(jnp.asarray(mask_scale, jnp.float32), (T,))]
    fvals = jnp.concatenate([w, we, sc, *ms_, jnp.zeros((nrows - nf,), jnp.float32)])
    fpar = jnp.broadcast_to(fvals[:, None], (nrows, lanes))
    operands.append(fpar)
    specs.append(full_spec(fpar))
    if thresholds is not None:
        pairs = [thresholds] + ([drop_thresholds] if drop_thresholds is not None else [])
        iv = [jnp.broadcast_to(jnp.asarray(a).astype(jnp.int32), (T,)) for pair in pairs for a in pair]
        irows = _pow2_rows(len(iv) * T)
        ivals = jnp.concatenate(iv + [jnp.zeros((irows - len(iv) * T,), jnp.int32)])
        ipar = jnp.broadcast_to(ivals[:, None], (irows, lanes))
        operands.append(ipar)
        specs.append(full_spec(ipar))
    static = dict(stacked=bool(stacked), round_inputs=bool(round_inputs), has_masks=masks is not None,
                  mask_scale=mask_scale is not None, thresholds=thresholds is not None,
                  drop=drop_thresholds is not None, weighted=bool(weighted),
                  sign_method=sign_method, reduce=reduce, normalize_by=normalize_by, has_scale=scale is not None,
                  add_base=bool(add_base), precision=precision, out_dtype=out_dt)
    if reference:  # the same arithmetic on the whole leaf, as one XLA fusion
        fvals_ = fvals
        ivals_ = ivals if thresholds is not None else None
        pos = lax.broadcasted_iota(jnp.int32, view, 0) * np.int32(view[1]) + lax.broadcasted_iota(jnp.int32, view, 1)
        it = iter(operands)
        xs_ = [next(it) for _ in range(T)]
        b_ = next(it) if need_base else None
        masks_ = [next(it) for _ in range(T)] if masks is not None else None
        sign_ = next(it) if sign is not None else None
        out = _body(xs_, b_, masks_, sign_, lambda k: fvals_[k], (lambda k: ivals_[k]) if ivals_ is not None else None,
                    pos, T=T, **static)
        return out.reshape(shape)
    kernel = functools.partial(_kernel, T=T, has_base=need_base, given_sign=sign is not None, block=block, **static)
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(view, out_dt), grid=grid, in_specs=specs,
                         out_specs=spec, interpret=interpret, name="jmerge_masked_merge")(*operands)
    return (out.reshape(-1)[:n] if view[0] * view[1] != n else out).reshape(shape)


def masked_merge_bytes(shapes_dtypes: Sequence[tuple[tuple[int, ...], Any]], out_dtype: Any, *,
                       with_base: bool = True, masks: bool = False) -> int:
    """Bytes one :func:`masked_merge` call must move at least: every input read once, the output written once.

    ``shapes_dtypes``: ``(shape, dtype)`` of each model (the base adds one more of the first's shape and
    dtype when ``with_base``); ``masks`` adds one int8 mask per model.

    References: Williams et al., "Roofline: An Insightful Visual Performance Model for Multicore
    Architectures" (CACM 2009) for the bytes-moved measure of a bandwidth-bound kernel.
    """
    total = 0
    for shape, dt in shapes_dtypes:
        n = int(np.prod(shape, dtype=np.int64))
        total += n * jnp.dtype(dt).itemsize + (n if masks else 0)
    shape0, dt0 = shapes_dtypes[0]
    n0 = int(np.prod(shape0, dtype=np.int64))
    if with_base:
        total += n0 * jnp.dtype(dt0).itemsize
    return total + n0 * jnp.dtype(out_dtype).itemsize
