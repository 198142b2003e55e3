"""Arcee Fusion: keep only the fine-tuned entries whose importance is an outlier (Tukey's upper fence).

One base and one fine-tuned model. Per entry, the importance is ``|θ1 − θ0|`` times the KL divergence
between the softmax distributions of the fine-tuned and the base values along the leaf's last axis (a
row of a PyTorch ``Linear`` weight: its input features); a 1-D leaf is one distribution and a 0-d
leaf is a one-entry distribution (KL 0). Entries whose importance reaches ``median + 1.5 · IQR`` of
the leaf's importances take the fine-tuned value; all others keep the base, as mergekit 0.1.5's
``arcee_fusion`` (NumPy float64 reference in ``tests/test_methods_fusion_ram.py``; mergekit goldens).

Precision. The KL divergence of a fine-tuned row is second order in the task vector (``≈ ½ Var(τ)``:
about 1e-6 on this repository's tiny fixtures, 1e-9 to 1e-8 for LLM weight rows), while mergekit's
float32 sum ``Σ p log(p / q)`` carries an absolute rounding error of a few 1e-7 (one ulp of the log
of a ratio near 1, summed; it also depends on the CPU's vector width). jmerge evaluates the same
formula without that cancellation (:func:`fusion_importance`, ~1e-6 relative). Where mergekit's
rounding error is comparable to the divergence, its mask near the threshold is decided by rounding,
and jmerge's differs there (on the tiny fixtures 1.2% of entries, each within mergekit's float32
error band of the threshold; measured on synthetic 4096-wide rows with τ ≈ 1e-4, 13% of entries).

Compute dtype. With an emulated bf16/fp16 compute dtype (``MergeState.precision``; mergekit's
``dtype: bfloat16`` merges, whose example config uses it) the importance is instead mergekit's formula
evaluated as torch 2.x evaluates it on CPU in that dtype (:func:`fusion_importance` with
``precision``): the softmax in float32 rounded once (torch's CPU kernel: ``exp(x − max)``, the sum in
16 float32 lanes folded in halves then the tail, times ``1 / sum``), ``+ 1e-8``, ``p / q``, ``log``,
``p · log``, the row sum (float32, rounded once), ``|τ| · KL`` each rounded to the dtype, and the
fence ``median + k · (Q3 − Q1)`` rounded after each operation. This reproduces mergekit's bf16
importances bit for bit on the repository's fixtures; it can still differ from a torch run by one
ulp of the dtype in rare entries (torch's SIMD ``exp`` and XLA's differ in the last float32 bit, and
torch built for AVX2 sums the softmax in 8 lanes), which moves a row's importances and may flip mask
entries at the threshold. The float32 mode is the accurate evaluation above.

Quantiles are order statistics at the positions ``floor(q · (n − 1))`` of the sorted importances
(``q`` = 0.25, 0.5, 0.75; NaN sorts last, as in torch's sort), found exactly with the counting top-k
search of :mod:`jmerge.core.select` (no full sort). mergekit
estimates them from a random sample of 10⁶ entries (with replacement) for tensors larger than that;
jmerge uses every entry (deterministic, the quantity that sample estimates), so on such tensors the
threshold and the mask can differ slightly from a mergekit run.

Cost. On one device the row KLs run a block of rows at a time (:func:`_row_kl`), and the quartile
searches recompute the importances ``|θ1 − θ0| · KL`` from the inputs in every pass, so no leaf-sized
buffer is written (a ``(1024, 2816)`` float32 leaf: 86 -> 40 ms on this project's 2-core machine).

References: Arcee AI, "Arcee Fusion" merge method (mergekit, 2025); Tukey, "Exploratory Data Analysis"
(1977) for the fence ``median + 1.5 · IQR``; Goddard et al., "Arcee's MergeKit: A Toolkit for Merging
Large Language Models" (EMNLP 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ..core import HParamSpec, MergeInputError, MergeState, Transform, transform
from ..core.select import threshold_values, topk_thresholds_rows
from ..core.state import compute_precision, round_to

__all__ = ["arcee_fusion", "fusion_importance"]

_EPS = 1e-8  # added to both softmax distributions before the KL divergence, as mergekit
_FAR = 20.0  # rows with a larger |tau| use the plain KL sum (the accurate form needs e^tau finite)
_QUANTILES = (0.25, 0.5, 0.75)
_BLOCK_ENTRIES = 1 << 16  # entries per block of rows in _row_kl (256 KiB of float32 per input: in cache)
_BLOCK_ENTRIES_LONG = 1 << 19  # ... for rows of at least _LONG_ROW entries (fewer iterations; same bits)
_LONG_ROW = 256
_BLOCK_MIN_ROWS = 4  # at least this many rows per block (XLA:CPU reduces a block of one row in another order)
_BLOCKED_MIN = 1 << 16  # leaves with fewer entries compute their row statistics whole
_LANES = 16  # float32 lanes of torch's AVX-512 CPU softmax kernel (its sum: lanes, halving fold, tail)


def fusion_importance(model: Float[Array, "*shape"], base: Float[Array, "*shape"],
                      precision: str | None = None) -> Float[Array, "*shape"]:
    """Arcee Fusion's importance ``|θ1 − θ0| · KL(p ‖ q)`` (float32), ``p``, ``q`` the softmax
    distributions of ``θ1`` and ``θ0`` along the last axis, each probability plus ``1e-8`` (mergekit's).

    With ``precision`` (a compute dtype: ``"bfloat16"``, ``"float16"``; None or float32 for the
    accurate form below) the plain formula is evaluated as torch does
    in that dtype on CPU (inputs rounded to it, each operation rounded, see the module docstring):
    mergekit's numbers for a config with that ``dtype``. The rest of this docstring is the float32
    (``precision=None``) evaluation.

    The KL divergence of a row multiplies every entry of that row; a 0-d leaf or a row of one entry
    has KL 0. It is evaluated without cancellation, to about 1e-6 relative: for a fine-tuned row the
    divergence is second order in ``τ = θ1 − θ0`` (``≈ ½ Var_q(τ)``, often below 1e-6), while the
    plain float32 sum ``Σ p log(p / q)`` (mergekit's) carries an absolute error of a few 1e-7, which
    can exceed the divergence itself (see :func:`arcee_fusion`). With ``c = log Σ q e^τ`` (through
    ``log1p``/``expm1``), ``p = q (1 + δ)``, ``δ = expm1(τ − c)``, ``x = q δ / (q + ε)``:
    ``KL = Σ (p + ε) (log1p(x) − x) + q² δ² / (q + ε)`` (using ``Σ q δ = 0``), every term second order.
    Rows with some ``|τ| > 20`` (not a fine-tune of the same base) use the plain sum.

    References: Arcee AI, "Arcee Fusion" merge method (mergekit, 2025); Kullback and Leibler, "On
    Information and Sufficiency" (1951).
    """
    m = jnp.asarray(model, jnp.float32)
    b = jnp.asarray(base, jnp.float32)
    shape = m.shape
    if m.ndim == 0 or shape[-1] <= 1:  # one-entry distributions: p = q, KL = 0
        return jnp.zeros(shape, jnp.float32)
    precision = compute_precision(precision)
    if precision is not None:
        return _importance_rounded(m, b, precision)
    return jnp.abs(m - b) * _row_kl(m, b)


def _kl(m, b: jnp.ndarray) -> jnp.ndarray:
    """The accurate float32 ``KL(p ‖ q)`` of each row (last axis) of ``m`` and ``b``, shape ``(..., 1)``.

    ``m`` may be a function returning it (called again for the rows far from the base: a block of
    :func:`_row_kl` then slices the leaf there, not as an operand of the conditional, which would copy it)."""
    m_of = m if callable(m) else (lambda: m)
    tau = m_of() - b
    far = jnp.max(jnp.abs(tau), axis=-1, keepdims=True) > _FAR

    def with_plain():  # only when some row is far: its exp and log cost as much as the rest
        qe = _softmax(b) + _EPS
        pe = _softmax(m_of()) + _EPS
        plain = jnp.sum(pe * jnp.log(pe / qe), axis=-1, keepdims=True)
        return jnp.where(far, plain, _kl_near(b, jnp.where(far, 0.0, tau)))

    # no row far (a fine-tune of the same base): tau itself, the same values as where(far, 0, tau), not written
    return lax.cond(jnp.any(far), with_plain, lambda: _kl_near(b, tau))


def _kl_near(b: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """:func:`_kl` of rows with ``m - b = t`` (each ``|t| <= 20``) without cancellation (see
    :func:`fusion_importance`)."""
    q = _softmax(b)
    c = jnp.log1p(jnp.sum(q * jnp.expm1(t), axis=-1, keepdims=True))
    qd = q * jnp.expm1(t - c)  # p - q
    qe = q + _EPS
    x = qd / qe  # p' / q' - 1
    return jnp.sum((qe + qd) * _log1p_minus_x(x) + qd * qd / qe, axis=-1, keepdims=True)


def _blocked(m: jnp.ndarray) -> int:
    """Rows per block for :func:`_row_kl`, or 0 to compute the leaf whole."""
    n = m.shape[-1]
    R = m.size // n
    if m.ndim < 2 or m.size < _BLOCKED_MIN or jax.device_count() > 1:
        return 0
    per = _BLOCK_ENTRIES_LONG if n >= _LONG_ROW else _BLOCK_ENTRIES
    return min(R, max(_BLOCK_MIN_ROWS, per // n))


def _row_kl(m: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """:func:`_kl` of every row, shape ``(..., 1)``; on one device, a block of rows at a time.

    Whole, XLA:CPU writes each intermediate of the row statistics (tau, ``|tau|``, the softmax, its
    exponentials, ...) to a leaf-sized buffer, since its row reductions read materialized operands:
    about 45 ms per ``(1024, 2816)`` leaf, mostly fresh pages. A loop over blocks of rows keeps them
    in cache-sized buffers: 45 -> 17 ms. Rows of at least 256 entries take blocks of 2**19 entries instead of
    2**16 (each iteration costs ~0.25 ms of kernel launches: 44 -> 6 of them for a ``(1024, 2816)`` leaf, its
    Arcee Fusion 22 -> 19 ms), with the same KLs at every row length compared from 129 to 11008 entries on JAX
    0.10 and 0.12; shorter rows keep the small blocks, since XLA:CPU reduces rows of up to 128 entries in
    another order when a block holds 4096 rows or more. Each row is computed alone either way; the KLs were
    bit-identical to the whole form at every shape compared but one, ``(4099, 33)``, where the whole form's row sums
    round otherwise (up to 1.2e-6 relative; the blocks agree with every other shape of 33-entry rows).
    Several devices keep the whole form (a loop over a leaf sharded along its rows would gather it).
    """
    B = _blocked(m)
    if not B:
        return _kl(m, b)
    shape = m.shape
    n = shape[-1]
    R = m.size // n
    m2, b2 = m.reshape(R, n), b.reshape(R, n)

    def body(i, out):  # the last block starts early enough to end at row R (rows recomputed alike)
        r0 = jnp.minimum(i * B, R - B)
        kl = _kl(lambda: lax.dynamic_slice_in_dim(m2, r0, B), lax.dynamic_slice_in_dim(b2, r0, B))
        return lax.dynamic_update_slice_in_dim(out, kl, r0, axis=0)

    out = lax.fori_loop(0, -(-R // B), body, jnp.zeros((R, 1), jnp.float32))
    return out.reshape(shape[:-1] + (1,))


def _importance_rounded(m: jnp.ndarray, b: jnp.ndarray, precision: str) -> jnp.ndarray:
    """mergekit's ``|θ1 − θ0| · Σ p log(p / q)`` in torch's order of roundings to ``precision``."""
    def r(x):
        return round_to(x, precision)

    m, b = r(m), r(b)
    p = r(_torch_softmax(m, precision) + _EPS)
    q = r(_torch_softmax(b, precision) + _EPS)
    kl = r(jnp.sum(r(p * r(jnp.log(r(p / q)))), axis=-1, keepdims=True))  # torch: float32 sum, one rounding
    return r(jnp.abs(r(m - b)) * kl)


def _torch_softmax(x: jnp.ndarray, precision: str) -> jnp.ndarray:
    """Softmax along the last axis as torch's CPU kernel computes it for a half-precision input:
    float32 ``e = exp(x − max)``, ``s`` = the first ``n − n mod 16`` entries summed in 16 lanes (lane
    ``j`` adds entries ``j, j + 16, ...`` in order), the lanes folded in halves (``l[j] + l[j + 8]``,
    then ``+ 4``, ``+ 2``, ``+ 1``), then the remaining entries one by one; ``e · (1 / s)`` rounded once."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    n = x.shape[-1]
    full = n - n % _LANES
    s = None
    if full:
        blocks = e[..., :full].reshape(e.shape[:-1] + (full // _LANES, _LANES))

        def add(i, acc):
            return acc + lax.dynamic_index_in_dim(blocks, i, axis=-2, keepdims=False)

        acc = lax.fori_loop(1, full // _LANES, add, blocks[..., 0, :])  # 0 + first block = first block
        width = _LANES
        while width > 1:
            width //= 2
            acc = acc[..., :width] + acc[..., width:]
        s = acc[..., 0]
    for j in range(full, n):
        s = e[..., j] if s is None else s + e[..., j]
    return round_to(e * (1.0 / s[..., None]), precision)


def _log1p_minus_x(x: jnp.ndarray) -> jnp.ndarray:
    """``log1p(x) − x`` to a few ulps: its series for ``|x| <= 1/8`` (terms to ``x¹⁰``), else directly.

    A block where every ``|x| <= 1/8`` (a fine-tune's rows, nearly always) evaluates the series alone: a
    ``where`` computes both branches, and ``log1p`` cost more than the rest of this step (its kernels 1.8 -> 0.5 ms
    over a ``(1024, 2816)`` leaf with the predicate's pass). The values and the KL sums that read them are the
    same bits (the sums read this step's result, written either way)."""
    def series(xs):
        poly = jnp.float32(-1.0 / 10)
        for k in range(9, 1, -1):  # -x²/2 + x³/3 - ... - x¹⁰/10 = x² (-1/2 + x (1/3 + x (...)))
            poly = (1.0 / k if k % 2 else -1.0 / k) + xs * poly
        return xs * xs * poly

    def mixed(x):
        small = jnp.abs(x) <= 0.125
        return jnp.where(small, series(jnp.where(small, x, 0.0)), jnp.log1p(x) - x)

    # the predicate as a maximum of row maxima (a NaN fails it): 40% cheaper than all() over the block
    return lax.cond(jnp.max(jnp.max(jnp.abs(x), axis=-1)) <= 0.125, series, mixed, x)


def _softmax(x: jnp.ndarray) -> jnp.ndarray:
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _order_statistics(x, positions: tuple[int, ...], form: Callable[[], jnp.ndarray] | None = None) -> jnp.ndarray:
    """The values at ascending sorted ``positions`` of ``x`` (flattened; NaN sorts last), exactly,
    without a full sort.

    ``x`` is an array, or a source ``guard -> array`` that recomputes it from the arrays it derives from,
    each wrapped in ``guard`` (the counting passes then read those, and ``x`` is never written). The value
    at position ``i`` is the smallest of the ``n − i`` largest entries: one top-k search per position
    (the searches share their counting passes: each reads ``x`` once for all positions). Searches that end
    on their key (every read-out does) give the values from those keys; otherwise one pass finds them all
    (:func:`jmerge.core.select.threshold_values`), reading ``form()`` if given (``x``'s values written in
    another form, so that XLA does not write an expression that this pass and the caller's share).
    """
    src = x if callable(x) else (lambda g: g(x))
    x = src(lambda a: a)
    shape = x.shape if x.ndim else (1,)  # rows in the leaf's own shape: a sharded leaf is not gathered
    n = x.size
    fix = (lambda a: jnp.reshape(a, shape)) if x.ndim == 0 else (lambda a: a)
    rebuild = lambda g: [fix(src(g))]
    k = jnp.asarray([n - i for i in positions], jnp.int32)
    # one row searched for every position: each counting pass reads it once for all of them
    v, cut, kth = topk_thresholds_rows(fix(x)[None], k[:, None], rebuild=rebuild, kth=True)
    return threshold_values(lambda: [fix(src(lambda a: a) if form is None else form())] * len(positions), k,
                            v[:, 0], cut[:, 0], kth[:, 0])


def _arcee_fusion(state: MergeState, hp) -> MergeState:
    if state.num_models != 1:
        raise MergeInputError(f"arcee_fusion merges the base with exactly one fine-tuned model; got "
                              f"{state.num_models} for a leaf of shape {tuple(state.base.shape)}.")
    tau = state.tau[0]
    n = tau.size
    if n == 0:
        return state.replace(merged=jnp.zeros_like(tau))
    # The fine-tuned values as given while tau is untouched (base + tau can be an ulp off for float32).
    src = state.source
    raw = src is not None and src[1] is not None and src[0] is state.tau
    model = round_to(src[2][0], state.precision) if raw else state.rounded(state.base + tau)
    positions = tuple(int(q * (n - 1)) for q in _QUANTILES)
    if state.precision is None:
        m, b = jnp.asarray(model, jnp.float32), jnp.asarray(state.base, jnp.float32)
        if m.ndim == 0 or m.shape[-1] <= 1:  # one-entry distributions: p = q, KL = 0
            importance = jnp.zeros(m.shape, jnp.float32)
            q1, median, q3 = _order_statistics(importance, positions)
        else:  # the importances recomputed from the inputs in every pass (never written)
            kl = _row_kl(m, b)

            def source(g):  # a guard that keeps the shape is applied before the broadcast (a
                full = g(jnp.broadcast_to(kl, m.shape))  # broadcast read in a loop is written)
                klg = jnp.broadcast_to(g(kl), m.shape) if full.shape == m.shape else full
                return jnp.abs(g(m) - g(b)) * klg

            importance = source(lambda a: a)
            # the minima read -tau's magnitude (the same bits): tau itself, shared by two passes, is written
            q1, median, q3 = _order_statistics(source, positions, lambda: jnp.abs(b - m) * kl)
    else:  # float16 rows with probabilities below its range give 0/0 = NaN, which torch sorts last
        importance = fusion_importance(model, state.base, state.precision)
        q1, median, q3 = _order_statistics(importance, positions)
    r = state.rounded  # identity in float32; the fence as torch computes it in bf16/fp16
    threshold = r(median + r(jnp.asarray(hp["iqr_factor"], jnp.float32) * r(q3 - q1)))
    mask = importance >= threshold
    return state.replace(merged=jnp.where(mask, tau, 0.0), extras={**state.extras, "fusion_mask": mask})


def arcee_fusion(iqr_factor: HParamSpec = 1.5) -> Transform:
    """Arcee Fusion: the base, with the fine-tuned model's entries whose importance is an outlier.

    Per leaf: ``s = |θ1 − θ0| · KL(softmax(θ1) ‖ softmax(θ0))`` (softmax along the last axis, one KL
    value per row), the threshold ``median(s) + iqr_factor · (Q3(s) − Q1(s))`` (quantiles at sorted
    positions ``floor(q · (n − 1))``), and ``θ = θ0 + (θ1 − θ0) · [s ≥ threshold]``. The mask is
    returned as ``extras["fusion_mask"]``. Needs a base and exactly one fine-tuned model.

    The last axis is the storage layout's: for PyTorch ``Linear`` weights ``(out, in)`` (mergekit's
    tensors) it runs over input features; Flax kernels ``(in, out)`` put the output features last.

    Args:
      iqr_factor: the fence's multiple of the interquartile range (mergekit fixes it at Tukey's 1.5;
        smaller values take more entries from the fine-tuned model).

    The KL divergence is evaluated to ~1e-6 relative; mergekit's float32 evaluation can be off by as
    much as the divergence of nearly equal rows, so masks differ near the threshold. With a bf16/fp16
    compute dtype (``compute_dtype=``, a mergekit config's ``dtype``) the importances and the fence
    are mergekit's, computed as torch does in that dtype (NaN importances of float16 rows whose
    probabilities underflow are never kept and sort last, as in torch). Tensors over 10⁶
    entries: mergekit estimates the quantiles from a random sample, jmerge computes them exactly (see
    the module docstring).

    References: Arcee AI, "Arcee Fusion" merge method (mergekit, 2025); Tukey, "Exploratory Data
    Analysis" (1977); Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024).
    """
    return transform("arcee_fusion", _arcee_fusion, hparams={"iqr_factor": iqr_factor},
                     ranges={"iqr_factor": (0.0, float("inf"))}, min_models=1, max_models=1)


METHODS = {"arcee_fusion": arcee_fusion}
