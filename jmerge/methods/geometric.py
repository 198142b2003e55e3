"""Geometric merges: spherical interpolation (SLERP, NuSLERP, multi-SLERP), the Karcher mean,
Model Stock and nearswap.

Every method here works per tensor (per leaf), like mergekit: a tensor is flattened to one vector
unless the method's options say otherwise. The results match mergekit 0.1.5's merge methods
(checked numerically in ``tests/test_geometric.py``); where mergekit raises on data-dependent
degenerate inputs (which cannot be done inside ``jit``) jmerge falls back to a documented value.

References: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985) for SLERP;
Goddard, "Multi-SLERP" (blog, 2024); Karcher, "Riemannian center of mass and mollifier
smoothing" (1977); Jang et al., "Model Stock: All we need is just a few fine-tuned models"
(ECCV 2024); alchemonaut, "QuartetAnemoi-70B" model card (nearswap).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from ..core import HParamSpec, MergeInputError, MergeState, Transform, model_mean, model_sum, transform
from ..core.xla import row_totals, totals

__all__ = ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap"]

DOT_THRESHOLD = 0.9995


def _safe_norm(x, axis=None, keepdims=False):
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


_totals = functools.partial(totals, flatten=False)  # sums over every axis, not flattened (sharding)


# --------------------------------------------------------------------------------------------
# SLERP (base <-> one fine-tuned model)

def _slerp(state: MergeState, hp) -> MergeState:
    if state.num_models != 1:
        raise MergeInputError(
            f"SLERP needs two models: the base and exactly one fine-tuned model; got {state.num_models} "
            f"fine-tuned models for a leaf of shape {tuple(state.base.shape)}. Use multislerp or karcher "
            "for more models.")
    t = jnp.asarray(hp["t"], jnp.float32)
    a = state.base  # in the leaf's own shape (norms and the dot sum every entry): not flattened, so a
    if state.precision is None:  # sharded leaf is reduced where it lives, never gathered
        tau = state.tau[0]
        b = a + tau
    else:  # mergekit interpolates the (rounded) models in float32: not the rounded task vector
        b = state.models()[0]
        tau = b - a
    if a.size == 0:
        return state.replace(merged=jnp.zeros_like(state.base))
    eps = 1e-8
    na = _safe_norm(a)
    nb = _safe_norm(b)
    na = jnp.where(na > eps, na, 1.0)
    nb = jnp.where(nb > eps, nb, 1.0)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1.0, 1.0)
    lin = jnp.abs(dot) > DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    sin_theta = jnp.where(lin, 1.0, jnp.sin(theta))
    ca = jnp.where(lin, 1.0 - t, jnp.sin((1.0 - t) * theta) / sin_theta)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
    # result = ca*a + cb*b; written relative to the base so that t=0 gives exactly the base and
    # t=1 exactly base + tau.
    merged = (ca + cb - 1.0) * state.base + cb * tau.reshape(state.base.shape)
    return state.replace(merged=merged)


def slerp(t: HParamSpec = 0.5) -> Transform:
    """Spherical linear interpolation between the base and one fine-tuned model, per tensor.

    Each tensor is flattened; the angle is taken between normalised copies, and the unnormalised
    tensors are interpolated: ``sin((1-t)θ)/sinθ · θ0 + sin(tθ)/sinθ · θ1``. When
    ``|cos θ| > 0.9995`` it falls back to linear interpolation. ``t = 0`` returns the base, ``t = 1``
    the fine-tuned model. ``t`` may vary per layer (:class:`jmerge.Gradient`; a list in YAML configs), as in
    mergekit.

    Args:
      t: interpolation factor toward the fine-tuned model.

    Raises:
      MergeInputError: unless exactly one fine-tuned model is given ("SLERP needs two models").

    References: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985); mergekit's
    ``slerp`` (Goddard et al., "Arcee's MergeKit", 2024).
    """
    return transform("slerp", _slerp, hparams={"t": t}, min_models=1, max_models=1)


# --------------------------------------------------------------------------------------------
# NuSLERP (two models, optionally relative to the base)

def _nuslerp_pair(t, v0, v1, *, flatten: bool, row_wise: bool, r=lambda x: x, exact: bool = False, neg=None):
    # r: rounding to the emulated compute dtype after each operation (identity in float32, exact=True);
    # neg: None or (-v0, -v1) as other expressions, for the result's pass (see _negated_tau_rows)
    eps = 1e-8
    shape = v0.shape
    if v0.ndim == 0:
        v0, v1, axis = v0.reshape(1), v1.reshape(1), -1
    elif flatten or v0.ndim == 1:  # every axis of the leaf's own shape: not flattened (sharding)
        axis = tuple(range(v0.ndim))
    else:
        axis = 0 if row_wise else -1

    def unit(x):
        return r(x / r(jnp.maximum(r(_safe_norm(x, axis=axis, keepdims=True)), 1e-7)))

    if exact and isinstance(axis, tuple):  # float32, whole tensor: the norms and the dot in one pass
        n0, n1, dot = _totals(v0 * v0, v1 * v1, v0 * v1)  # (the same cosine to float32 rounding)
        cos = jnp.clip(dot / (jnp.maximum(jnp.sqrt(n0), 1e-7) * jnp.maximum(jnp.sqrt(n1), 1e-7)), -1.0, 1.0)
    else:
        cos = jnp.clip(r(jnp.sum(r(unit(v0) * unit(v1)), axis=axis, keepdims=True)), -1.0, 1.0)
    colinear = r(1.0 - r(cos * cos)) <= eps ** 2
    theta = r(jnp.arccos(jnp.where(colinear, 0.0, cos)))
    sin_theta = jnp.where(colinear, 1.0, r(jnp.sin(theta)))
    neg = neg if exact and isinstance(axis, tuple) else None
    f0, f1 = (v0, v1) if neg is None else neg  # -f(-v0, -v1) is f(v0, v1) bit for bit (f is linear in them)
    sph = r(r(r(r(jnp.sin(r((1.0 - t) * theta))) * f0) + r(r(jnp.sin(r(t * theta))) * f1)) / sin_theta)
    out = jnp.where(colinear, r(r((1.0 - t) * f0) + r(t * f1)), sph)
    return (out if neg is None else -out).reshape(shape)


def _nuslerp(state: MergeState, hp, *, flatten: bool, row_wise: bool, base_relative: bool) -> MergeState:
    if state.num_models != 2:
        raise MergeInputError(f"NuSLERP merges exactly two fine-tuned models; got {state.num_models} for a leaf "
                              f"of shape {tuple(state.base.shape)}.")
    w = jnp.broadcast_to(jnp.asarray(hp["weight"], jnp.float32), (2,))
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(total) < 1e-6, 1.0, total))
    exact = state.precision is None
    if base_relative:
        v0, v1 = state.tau_rows()
        merged = _nuslerp_pair(t, v0, v1, flatten=flatten, row_wise=row_wise, r=state.rounded, exact=exact,
                               neg=_negated_tau_rows(state))
    else:
        v0, v1 = state.model_rows()
        merged = _nuslerp_pair(t, v0, v1, flatten=flatten, row_wise=row_wise, r=state.rounded, exact=exact) - state.base
    return state.replace(merged=merged)


def nuslerp(weight: HParamSpec = 1.0, *, flatten: bool = True, row_wise: bool = False,
            base_relative: bool = False) -> Transform:
    """NuSLERP: spherical interpolation of two models with ``t = w1 / (w0 + w1)`` (mergekit's nuslerp).

    ``t = 0.5`` when ``|w0 + w1| < 1e-6``. With ``flatten`` (default) each tensor is one vector;
    otherwise the interpolation runs per row (``row_wise``: vectors along axis 0) or per column
    (vectors along the last axis). Exactly collinear vectors are interpolated linearly.

    Args:
      weight: per-model weights (``PerModel([w0, w1])``); only their ratio matters.
      flatten: interpolate whole flattened tensors (mergekit's ``nuslerp_flatten``).
      row_wise: without ``flatten``, interpolate along axis 0 (mergekit's ``nuslerp_row_wise``).
      base_relative: interpolate the task vectors ``θ_t − θ0`` and add the result to the base
        (mergekit with a ``base_model``); by default the two models themselves are interpolated
        and the base only supplies the output dtype (mergekit without ``base_model``).

    References: mergekit's ``nuslerp`` (Goddard et al., "Arcee's MergeKit", 2024); Shoemake (1985).
    """
    return transform("nuslerp", _nuslerp, hparams={"weight": weight}, per_model=("weight",),
                     static={"flatten": bool(flatten), "row_wise": bool(row_wise),
                             "base_relative": bool(base_relative)}, min_models=2, max_models=2)


# --------------------------------------------------------------------------------------------
# Multi-SLERP (spherical barycentre through the tangent space at the weighted mean)

def _gram(xs: list) -> jax.Array:
    """The models' Gram matrix ``x_s . x_t`` (T x T, float32; sums over every axis of the leaf) in one
    pass over them (one variadic reduction, :func:`_totals`)."""
    T = len(xs)
    pairs = [(i, j) for i in range(T) for j in range(i, T)]
    G = jnp.zeros((T, T), jnp.float32)
    for (i, j), v in zip(pairs, _totals(*[xs[i] * xs[j] for i, j in pairs])):
        G = G.at[i, j].set(v).at[j, i].set(v)
    return G


def _rows_of(state: MergeState, base_relative: bool) -> list:
    """The task vectors' rows (slices of ``tau``: XLA:CPU recomputes them in each pass that reads them,
    where it writes :meth:`MergeState.tau_rows`'s once when two passes read them), or the models'."""
    return [state.tau[t] for t in range(state.num_models)] if base_relative else state.model_rows()


def _combination(state: MergeState, coeff: jax.Array, base_relative: bool) -> jax.Array:
    """The merged delta of the result ``sum_t coeff_t x_t`` (``x_t`` the task vectors, or the models)."""
    if not base_relative:
        return model_sum([coeff[t] * x for t, x in enumerate(state.model_rows())]) - state.base
    neg = _negated_tau_rows(state)
    if neg is not None:  # -sum_t c_t (-tau_t): sum_t c_t tau_t bit for bit (but the sign of a zero)
        return -model_sum([coeff[t] * x for t, x in enumerate(neg)])
    return model_sum([coeff[t] * x for t, x in enumerate(_rows_of(state, True))])


def _negated_tau_rows(state: MergeState) -> list | None:
    """``[base - model_t]`` (``-tau_t`` bit for bit, but the sign of a zero) from the float32 inputs while
    tau is as built, else None. A pass that writes the result reads these, the statistics' pass ``tau``:
    with the same expression in both, XLA:CPU writes tau's rows to memory once and reads them twice."""
    rebuild = state.tau_rebuild("b-m") if state.precision is None else None
    return None if rebuild is None else rebuild(lambda a: a)


def _multislerp_gram(state: MergeState, hp, *, normalize_weights: bool, base_relative: bool) -> MergeState:
    """Multi-SLERP in float32 from the models' Gram matrix: the mean, the tangent and the result are
    combinations ``sum_t c_t x_t`` of the models, so one pass computes their inner products and one
    writes the result. The same steps as :func:`_multislerp` (kept for the emulated narrow dtypes); the
    numbers agree to float32 rounding (the tangent is zero but for rounding; a (3, 1024, 2816) leaf
    85 -> ~6 ms)."""
    T = state.num_models
    xs = _rows_of(state, base_relative)
    G = _gram(xs)
    eps = jnp.asarray(hp["eps"], jnp.float32)
    w = jnp.broadcast_to(jnp.asarray(hp["weight"], jnp.float32), (T,))
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.sqrt(jnp.diagonal(G))
    inv = 1.0 / (norms + eps)  # units u_t = x_t * inv_t
    U = G * inv[:, None] * inv[None, :]
    norm_of = lambda c: jnp.sqrt(jnp.maximum(c @ U @ c, 0.0))
    mean_norm = norm_of(w)  # mean = sum_t w_t u_t
    degenerate = mean_norm < eps
    mean = w / jnp.where(degenerate, 1.0, mean_norm)
    dots = U @ mean
    tangent = w - jnp.sum(w * dots) * mean  # sum_t w_t (u_t - dot_t mean)
    tn = norm_of(tangent) + eps
    res = mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)
    coeff = jnp.where(degenerate, w, res * jnp.sum(norms * w) * inv)  # result = sum_t coeff_t x_t
    return state.replace(merged=_combination(state, coeff, base_relative))


def _multislerp(state: MergeState, hp, *, normalize_weights: bool, base_relative: bool) -> MergeState:
    T = state.num_models
    if T == 1:
        return state.replace(merged=state.tau[0])
    if state.precision is None and state.base.ndim >= 1:
        return _multislerp_gram(state, hp, normalize_weights=normalize_weights, base_relative=base_relative)
    # Model by model, in the leaf's own shape (not flattened: a sharded leaf is reduced where it lives)
    xs = _rows_of(state, base_relative)
    xs = xs if xs[0].ndim >= 1 else [x.reshape(1) for x in xs]
    r = state.rounded  # identity in float32; rounds where a merge computed in bf16/fp16 rounds
    eps = jnp.asarray(hp["eps"], jnp.float32)
    w = r(jnp.broadcast_to(jnp.asarray(hp["weight"], jnp.float32), (T,)))
    if normalize_weights:
        w = r(w / r(jnp.sum(w)))
    # Each sum over the tensor is a variadic reduction (_totals); the models are never stacked.
    norms = [r(jnp.sqrt(s)) for s in _totals(*[x * x for x in xs])]
    units = [r(x / r(n + eps)) for x, n in zip(xs, norms)]
    mean = r(model_sum([r(u * w[t]) for t, u in enumerate(units)]))
    mean_norm = r(jnp.sqrt(_totals(mean * mean)[0]))
    degenerate = mean_norm < eps
    mean = r(mean / jnp.where(degenerate, 1.0, mean_norm))
    dots = [r(d) for d in _totals(*[r(u * mean) for u in units])]
    tangent = r(model_sum([r(r(u - r(d * mean)) * w[t]) for t, (u, d) in enumerate(zip(units, dots))]))
    tn = r(r(jnp.sqrt(_totals(tangent * tangent)[0])) + eps)
    res = r(r(mean * r(jnp.cos(tn))) + r(tangent * r(r(jnp.sin(tn)) / tn)))
    res = r(res * r(jnp.sum(r(jnp.stack(norms) * w))))
    lin = r(model_sum([r(x * w[t]) for t, x in enumerate(xs)]))
    res = jnp.where(degenerate, lin, res).reshape(state.base.shape)
    merged = res if base_relative else res - state.base
    return state.replace(merged=merged)


def multislerp(weight: HParamSpec = 1.0, eps: HParamSpec = 1e-8, *, normalize_weights: bool = True,
               base_relative: bool = False) -> Transform:
    """Multi-SLERP: barycentric interpolation of several models on a hypersphere (per tensor).

    The flattened tensors ``x_t`` are projected to the unit sphere ``u_t = x_t / (|x_t| + eps)``;
    ``m`` is the normalised weighted mean of the ``u_t``; the weighted mean of their tangent
    components ``u_t − (u_t·m) m`` is mapped back by the exponential map at ``m``; the result is
    rescaled by the weighted mean norm ``Σ w_t |x_t|``. One model is returned unchanged.

    Where the weighted mean of the units vanishes (``|m| < eps``) mergekit falls back to linear
    interpolation for two models and raises for more; jmerge (inside ``jit``) falls back to the
    weighted linear average ``Σ w_t x_t`` for any number of models. In float32 the mean, the tangent
    and the result are computed as combinations of the models from their Gram matrix (two passes over
    the models); a bf16/fp16 compute dtype evaluates them entry by entry with mergekit's roundings.

    Args:
      weight: per-model weights (``PerModel``).
      eps: numerical-stability constant.
      normalize_weights: divide the weights by their sum.
      base_relative: interpolate the task vectors and add the result to the base (mergekit with a
        ``base_model``); by default the models themselves (the base only gives the dtype).

    References: Goddard, "Multi-SLERP" (goddard.blog, 2024); mergekit's ``multislerp``.
    """
    return transform("multislerp", _multislerp, hparams={"weight": weight, "eps": eps}, per_model=("weight",),
                     static={"normalize_weights": bool(normalize_weights), "base_relative": bool(base_relative)})


# --------------------------------------------------------------------------------------------
# Karcher mean on the unit sphere

def _karcher_gram(state: MergeState, hp, *, max_iter: int, base_relative: bool) -> MergeState:
    """The Karcher iteration in float32 on the models' Gram matrix (one pass over the models for it, one
    to write the result): every iterate is a combination ``sum_t c_t u_t`` of the units, so the
    iteration needs only their inner products. The same steps as the entry-wise iteration of
    :func:`_karcher` (which the emulated narrow dtypes keep, for mergekit's roundings); the numbers
    agree to float32 rounding (a (3, 1024, 2816) leaf: 138 -> ~7 ms)."""
    T = state.num_models
    xs = _rows_of(state, base_relative)
    G = _gram(xs)
    tol = jnp.asarray(hp["tol"], jnp.float32)
    w = jnp.broadcast_to(jnp.asarray(hp["weight"], jnp.float32), (T,))
    alphas = w / jnp.sum(w)
    norms = jnp.sqrt(jnp.diagonal(G))
    inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    U = G * inv[:, None] * inv[None, :]  # the units' Gram matrix (zero rows for zero models)
    norm_of = lambda c: jnp.sqrt(jnp.maximum(c @ U @ c, 0.0))
    valid = norms > tol
    va = jnp.where(valid, alphas, 0.0)
    any_valid = jnp.any(valid)
    na = va / jnp.where(any_valid, jnp.sum(va), 1.0)
    mn = norm_of(na)
    first = jax.nn.one_hot(jnp.argmax(valid), T, dtype=jnp.float32)
    c0 = jnp.where(mn < tol, first, na / jnp.where(mn < tol, 1.0, mn))

    def body(carry):
        i, c, done = carry
        dot = jnp.clip(U @ c, -1.0, 1.0)  # u_t . mean
        theta = jnp.arccos(dot)
        skip = theta < tol
        sin_t = jnp.where(skip, 1.0, jnp.sin(theta))
        coef = jnp.where(skip, 0.0, na * theta / sin_t)
        tangent = coef - jnp.sum(coef * dot) * c  # sum_t coef_t (u_t - dot_t mean)
        tn = norm_of(tangent)
        stop = done | (tn < tol)
        safe_tn = jnp.where(tn > 0, tn, 1.0)
        new = jnp.cos(tn) * c + jnp.sin(tn) * tangent / safe_tn
        un = norm_of(new)
        new = jnp.where(un > tol, new / jnp.where(un > tol, un, 1.0), new)
        return i + 1, jnp.where(stop, c, new), stop

    _, c, _ = jax.lax.while_loop(lambda k: (k[0] < max_iter) & ~k[2], body, (jnp.int32(0), c0, jnp.asarray(False)))
    scale = jnp.sum(alphas * norms)
    coeff = jnp.where(any_valid, scale * c * inv, 0.0)  # result = sum_t coeff_t x_t
    return state.replace(merged=_combination(state, coeff, base_relative))


def _karcher(state: MergeState, hp, *, max_iter: int, base_relative: bool) -> MergeState:
    T = state.num_models
    if T > 1 and state.precision is None and state.base.ndim >= 1:
        return _karcher_gram(state, hp, max_iter=max_iter, base_relative=base_relative)
    x = state.tau if base_relative else state.models()
    rebuild = state.tau_rebuild()
    if not base_relative and state.precision is None and rebuild is not None:
        # base + tau (the numbers of state.models()) with the rows of tau rebuilt from the inputs: XLA then
        # writes these models once (the norms' input), not also a stacked copy of tau.
        x = jnp.stack([state.base + r for r in rebuild(lambda a: a)])
    if T == 1:
        return state.replace(merged=state.tau[0])
    # The leaf's own shape (norms and dots sum over all its axes): not flattened, so a sharded leaf is
    # reduced where it lives, never gathered.
    flat = x if x.ndim > 1 else x.reshape(T, 1)
    ax = tuple(range(1, flat.ndim))
    col = lambda v: v.reshape((T,) + (1,) * len(ax))
    tol = jnp.asarray(hp["tol"], jnp.float32)
    w = jnp.broadcast_to(jnp.asarray(hp["weight"], jnp.float32), (T,))
    alphas = w / jnp.sum(w)
    # In a narrow compute dtype (bf16/fp16) the rounding follows mergekit: norms, the angle test and
    # the tangent norm stay float32; the units, the mean and the tangent are stored in the dtype, the
    # models' terms are added one at a time, and a float32 scalar multiplying from the left (cos, sin of
    # the tangent norm, the final scale) is first rounded to the dtype (torch's CPU kernels do so).
    r, emulate = state.rounded, state.precision is not None

    def rsum(xs):
        if not emulate:
            return model_sum(xs)
        out = xs[0]
        for i in range(1, T):
            out = r(out + xs[i])
        return out

    norms = _safe_norm(flat, axis=ax)
    units = jnp.where(col(norms > 0), r(flat / col(jnp.where(norms > 0, norms, 1.0))), 0.0)
    valid = norms > tol
    va = jnp.where(valid, alphas, 0.0)
    any_valid = jnp.any(valid)
    na = va / jnp.where(any_valid, jnp.sum(va), 1.0)
    mean0 = rsum(r(col(na) * units))
    mn = _safe_norm(mean0)
    first = units[jnp.argmax(valid)]
    mean0 = jnp.where(mn < tol, first, r(mean0 / jnp.where(mn < tol, 1.0, mn)))

    def body(carry):
        i, mean, done = carry
        # units . mean contracting every axis of the leaf (the matmul of the flattened tensors, unflattened)
        dot = jnp.clip(r(jax.lax.dot_general(units, mean, ((ax, tuple(a - 1 for a in ax)), ((), ())))), -1.0, 1.0)
        theta = r(jnp.arccos(dot))
        skip = theta < tol
        sin_t = jnp.where(skip, 1.0, r(jnp.sin(theta)))
        coef = jnp.where(skip, 0.0, r(na * r(theta / sin_t)) if emulate else na * theta / sin_t)
        tangent = rsum(r(col(coef) * r(units - r(col(dot) * mean[None]))))
        tn = _safe_norm(tangent)
        stop = done | (tn < tol)
        safe_tn = jnp.where(tn > 0, tn, 1.0)
        new = r(r(r(jnp.cos(tn)) * mean) + r(r(jnp.sin(tn)) * r(tangent / safe_tn)))
        un = _safe_norm(new)
        new = jnp.where(un > tol, r(new / jnp.where(un > tol, un, 1.0)), new)
        return i + 1, jnp.where(stop, mean, new), stop

    # Ends at max_iter or once the tangent norm drops below tol (the mean is frozen from then on).
    _, mean, _ = jax.lax.while_loop(lambda c: (c[0] < max_iter) & ~c[2], body,
                                    (jnp.int32(0), mean0, jnp.asarray(False)))
    scale = jnp.sum(alphas * norms)
    res = jnp.where(any_valid, r(r(scale) * mean), 0.0).reshape(state.base.shape)
    merged = res if base_relative else res - state.base
    return state.replace(merged=merged)


def karcher(max_iter: int = 10, tol: HParamSpec = 1e-5, weight: HParamSpec = 1.0, *,
            base_relative: bool = False) -> Transform:
    """Karcher (Riemannian, Fréchet) mean of the models on the unit sphere, per tensor.

    Each flattened tensor is normalised to ``u_t``; starting from the normalised weighted mean,
    the mean ``m`` is moved along the weighted mean of the log maps
    ``Σ α_t θ_t/sin θ_t (u_t − cos θ_t m)`` by the exponential map, for at most ``max_iter``
    iterations (a ``fori_loop`` that freezes once the tangent norm drops below ``tol``). The
    result is ``m · Σ α_t |x_t|`` with ``α = weight / Σ weight``. Tensors with norm ``≤ tol``
    do not steer the direction (mergekit semantics); all-zero inputs give zero. In float32 every
    iterate is a combination of the units, so the iteration runs on the models' Gram matrix (one pass
    over the models for it, one to write the result); a bf16/fp16 compute dtype runs it entry by entry
    with mergekit's roundings.

    Args:
      max_iter: iteration count (static).
      tol: convergence tolerance on the tangent norm (and the angle below which a point is skipped).
      weight: per-model weights (``PerModel``); uniform by default, as mergekit.
      base_relative: average the task vectors instead of the models (the base only gives dtype by
        default; to include the base as a point, pass it among the models).

    References: Karcher, "Riemannian center of mass and mollifier smoothing" (Comm. Pure Appl. Math.
    1977); mergekit's ``karcher``.
    """
    return transform("karcher", _karcher, hparams={"tol": tol, "weight": weight}, per_model=("weight",),
                     static={"max_iter": int(max_iter), "base_relative": bool(base_relative)})


# --------------------------------------------------------------------------------------------
# Model Stock

def _model_stock(state: MergeState, hp, *, filter_wise: bool, average: str) -> MergeState:
    T = state.num_models
    if T < 2:
        raise MergeInputError(f"Model Stock needs at least two fine-tuned models besides the base; got {T} "
                              f"for a leaf of shape {tuple(state.base.shape)}.")
    off = state.tau if state.base.ndim >= 1 else state.tau.reshape(T, 1)
    # Whole-tensor statistics sum over every axis of the leaf's own shape (not flattened: a sharded
    # leaf is reduced where it lives); filter-wise ones over the last axis. The squared norms and the
    # pairwise dot products are one variadic reduction: XLA:CPU then reads the task vectors once for
    # all of them (as separate sums a (3, 1024, 2816) leaf took 45 ms, now 6; core.xla workaround 7).
    r = state.rounded  # identity in float32; rounds where a merge computed in bf16/fp16 rounds
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    sums = row_totals(*[off[i] * off[i] for i in range(T)], *[r(off[i] * off[j]) for i, j in pairs])
    sums = sums if filter_wise else [jnp.sum(s) for s in sums]
    norms = [r(jnp.sqrt(s)) for s in sums[:T]]
    cos_list = []
    for (i, j), dot in zip(pairs, sums[T:]):
        c = r(r(dot) / r(jnp.maximum(r(norms[i] * norms[j]), 1e-6)))
        cos_list.append(jnp.clip(c, -1.0, 1.0))
    cs = jnp.stack(cos_list)
    if average == "angle":
        cos = r(jnp.cos(r(jnp.mean(r(jnp.arccos(cs)), axis=0))))[..., None]
    else:
        cos = r(jnp.mean(cs, axis=0))[..., None]
    den = r(1.0 + r((T - 1) * cos))
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0.0, r(r(T * cos) / jnp.where(singular, 1.0, den)))
    if state.precision is None:
        merged = (t * model_mean(off)).reshape(state.base.shape)
    else:  # in a narrow dtype the rounding follows mergekit's t * mean(models) + (1 - t) * base
        ms, w0 = state.models().reshape(off.shape), state.base.reshape(off.shape[1:])
        total = ms[0]
        for m in ms[1:]:
            total = r(total + m)
        out = r(r(t * r(total / T)) + r(r(1.0 - t) * w0))
        merged = (out - w0).reshape(state.base.shape)
    extras = {**state.extras, "model_stock_t": t[..., 0] if filter_wise else t.reshape(())}
    return state.replace(merged=merged, extras=extras)


def model_stock(*, filter_wise: bool = False, average: Literal["cosine", "angle"] = "cosine") -> Transform:
    """Model Stock: move from the base toward the average of the fine-tuned models by
    ``t = T cos θ / (1 + (T−1) cos θ)``, where ``θ`` is the angle between the task vectors of the
    tensor: ``θ = t · mean(θ_t) + (1 − t) · θ0``.

    With two models ``cos θ`` is their cosine. With more, the paper assumes equal pairwise angles and
    does not say how to estimate the common one; two estimates are in use, selected by ``average``:
    ``"cosine"`` (default) averages the pairwise cosines (mergekit), ``"angle"`` averages the pairwise
    angles and takes the cosine of the mean (FusionBench). They agree for two models.

    With ``filter_wise`` the cosine and ``t`` are computed per vector along the last axis (per row of
    a matrix), as mergekit's ``filter_wise`` option. Where ``1 + (T−1) cos θ`` vanishes (``|·| < 1e-6``)
    the base is kept (mergekit). ``t`` is returned in the extras as ``model_stock_t``.

    Args:
      filter_wise: one ``t`` per row instead of per tensor.
      average: ``"cosine"`` or ``"angle"`` (see above).

    Raises:
      MergeInputError: with fewer than two fine-tuned models.

    References: Jang et al., "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024).
    """
    if average not in ("cosine", "angle"):
        raise MergeInputError(f"model_stock: average must be 'cosine' or 'angle', got {average!r}.")
    return transform("model_stock", _model_stock, static={"filter_wise": bool(filter_wise), "average": average},
                     min_models=2)


# --------------------------------------------------------------------------------------------
# nearswap

def _nearswap(state: MergeState, hp) -> MergeState:
    if state.num_models != 1:
        raise MergeInputError(f"nearswap merges the base with exactly one fine-tuned model; got "
                              f"{state.num_models} for a leaf of shape {tuple(state.base.shape)}.")
    t = jnp.asarray(hp["t"], jnp.float32)
    tau = state.tau[0]
    if state.precision is None:
        w = jnp.clip(t / jnp.maximum(jnp.abs(tau), 1e-6), 0.0, 1.0)
        return state.replace(merged=w * tau)
    # in a narrow dtype the rounding follows mergekit's w * model + (1 - w) * base (t / x is t * (1 / x))
    r = state.rounded
    a, b = state.base, state.models()[0]
    w = jnp.clip(r(r(1.0 / r(jnp.maximum(jnp.abs(tau), 1e-6))) * t), 0.0, 1.0)
    return state.replace(merged=r(r(w * b) + r(r(1.0 - w) * a)) - a)


_nearswap.entrywise = True  # each entry from the same entries alone (read by jmerge.core.chunks.entrywise)


def nearswap(t: HParamSpec = 1e-4) -> Transform:
    """Nearswap: take the fine-tuned value where it is close to the base, keep the base elsewhere.

    Per entry ``w = clip(t / max(|θ1 − θ0|, 1e-6), 0, 1)`` and ``θ = w θ1 + (1 − w) θ0``: entries
    that differ by less than ``t`` are swapped to the fine-tuned model, larger differences are
    interpolated toward it with weight ``t / |θ1 − θ0|``.

    Args:
      t: similarity threshold (mergekit requires it; the default ``1e-4`` is the value of the
        model that introduced the method).

    References: alchemonaut, "QuartetAnemoi-70B-t0.0001" (Hugging Face model card, 2024); mergekit's
    ``nearswap``.
    """
    return transform("nearswap", _nearswap, hparams={"t": t}, ranges={"t": (0.0, float("inf"))},
                     min_models=1, max_models=1)


METHODS = {"slerp": slerp, "nuslerp": nuslerp, "multislerp": multislerp, "karcher": karcher,
           "model_stock": model_stock, "nearswap": nearswap}
