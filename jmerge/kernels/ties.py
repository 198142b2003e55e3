"""The TIES inner loop in one pass: sign election and disjoint mean, fused per element block.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["disjoint_merge", "disjoint_merge_reference"]

_LANES = 128
# a squeezed block dimension (the task axis): pl.squeezed in current JAX, None in older releases
_SQUEEZED = getattr(pl, "squeezed", None)


def disjoint_merge_reference(tau, keep_mask, weight=1.0, *, normalize_by: str = "count"):
    """The same computation in plain jax.numpy (for checks and benchmarks).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    tau = jnp.asarray(tau, jnp.float32)
    T = tau.shape[0]
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (T,)).reshape((T,) + (1,) * (tau.ndim - 1))
    keep = jnp.asarray(keep_mask, bool)
    wt = jnp.where(keep, w * tau, 0.0)
    sign = jnp.sign(jnp.sum(wt, axis=0))
    agree = keep & (jnp.sign(tau) == sign[None]) & (sign[None] != 0)
    num = jnp.sum(jnp.where(agree, w * tau, 0.0), axis=0)
    den = jnp.sum(jnp.where(agree, w if normalize_by == "weight" else 1.0, 0.0), axis=0)
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def _kernel(*refs, T: int, by_weight: bool):
    tau_refs, keep_refs, w_ref, out_ref = refs[:T], refs[T:2 * T], refs[2 * T], refs[2 * T + 1]
    taus = [r[...].astype(jnp.float32) for r in tau_refs]
    keeps = [r[...] != 0 for r in keep_refs]
    ws = [w_ref[t:t + 1, :] for t in range(T)]  # (1, 128) rows, broadcast over the block
    total = jnp.zeros(taus[0].shape, jnp.float32)
    for t in range(T):
        total = total + jnp.where(keeps[t], ws[t] * taus[t], 0.0)
    sign = jnp.sign(total)
    num = jnp.zeros_like(total)
    den = jnp.zeros_like(total)
    for t in range(T):
        agree = keeps[t] & (jnp.sign(taus[t]) == sign) & (sign != 0)
        num = num + jnp.where(agree, ws[t] * taus[t], 0.0)
        den = den + jnp.where(agree, ws[t] if by_weight else 1.0, 0.0)
    out_ref[...] = jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def disjoint_merge(tau, keep_mask, weight=1.0, *, normalize_by: str = "count", block_rows: int = 256,
                   interpret: bool | None = None):
    """TIES sign election + disjoint mean in one fused pass over ``tau``.

    For each element: ``sign = sign(sum_t keep_t * w_t * tau_t)``; the entries that are kept and
    agree with a non-zero ``sign`` are averaged: ``sum w_t tau_t / count`` (or ``/ sum w_t`` with
    ``normalize_by="weight"``); 0 where none agrees.

    The leaf is flattened and padded to blocks of ``block_rows x 128`` elements; each task vector is
    passed as its own input (blocks stay ``(block_rows, 128)``, friendly to GPU and TPU tiling).

    Args:
      tau: ``(T, *shape)`` task vectors (any float dtype; computed in float32).
      keep_mask: ``(T, *shape)`` bool (e.g. the TIES trim mask).
      weight: scalar or ``(T,)`` per-task weights (may be traced).
      normalize_by: ``"count"`` (TIES paper) or ``"weight"`` (mergekit's weighted mean).
      block_rows: rows of 128 elements per block (a multiple of 8).
      interpret: run the Pallas interpreter; default True on CPU, False on GPU/TPU.

    Returns:
      ``(*shape)`` float32 merged task vector.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    if normalize_by not in ("count", "weight"):
        raise ValueError(f"normalize_by must be 'count' or 'weight', got {normalize_by!r}.")
    tau = jnp.asarray(tau)
    keep_mask = jnp.asarray(keep_mask)
    if tau.ndim < 1 or keep_mask.shape != tau.shape:
        raise ValueError(f"tau {tau.shape} and keep_mask {keep_mask.shape} must both be (T, *shape).")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    T = tau.shape[0]
    shape = tau.shape[1:]
    n = int(tau[0].size)
    rows = max(1, -(-n // _LANES))
    br = max(8, min(int(block_rows), -(-rows // 8) * 8))
    br = -(-br // 8) * 8
    rows_p = -(-rows // br) * br
    pad = rows_p * _LANES - n
    flat = tau.reshape(T, n)
    keep = keep_mask.reshape(T, n).astype(jnp.int8)
    if pad:
        flat = jnp.pad(flat, ((0, 0), (0, pad)))
        keep = jnp.pad(keep, ((0, 0), (0, pad)))
    flat = flat.reshape(T, rows_p, _LANES)
    keep = keep.reshape(T, rows_p, _LANES)
    tp = max(8, 1 << (T - 1).bit_length())
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (T,))
    w_arr = jnp.zeros((tp, _LANES), jnp.float32).at[:T].set(w[:, None])

    def row_spec(t):
        return pl.BlockSpec((_SQUEEZED, br, _LANES), lambda i, t=t: (t, i, 0))

    out = pl.pallas_call(
        functools.partial(_kernel, T=T, by_weight=normalize_by == "weight"),
        out_shape=jax.ShapeDtypeStruct((rows_p, _LANES), jnp.float32),
        grid=(rows_p // br,),
        in_specs=[row_spec(t) for t in range(T)] + [row_spec(t) for t in range(T)]
        + [pl.BlockSpec((tp, _LANES), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((br, _LANES), lambda i: (i, 0)),
        interpret=interpret,
    )(*([flat] * T), *([keep] * T), w_arr)
    return out.reshape(-1)[:n].reshape(shape)
