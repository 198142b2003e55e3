"""TIES' sign election and disjoint mean over given keep masks, in one fused pass (jmerge's sign rule).

A thin front end of :func:`jmerge.kernels.masked_merge` for stacked task vectors and explicit masks,
with the semantics of ``jmerge.elect_sign`` + ``jmerge.disjoint_merge`` (``weighted=True``,
``method="sum"``): a zero vote elects ``+1``, zeros never agree.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

import jax.numpy as jnp

from .fused import masked_merge

__all__ = ["disjoint_merge", "disjoint_merge_reference"]


def disjoint_merge_reference(tau, keep_mask, weight=1.0, *, normalize_by: str = "count"):
    """The same computation in plain jax.numpy (for checks and benchmarks).

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    if normalize_by not in ("count", "weight"):
        raise ValueError(f"normalize_by must be 'count' or 'weight', got {normalize_by!r}.")
    tau = jnp.asarray(tau, jnp.float32)
    T = tau.shape[0]
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (T,)).reshape((T,) + (1,) * (tau.ndim - 1))
    c = jnp.where(jnp.asarray(keep_mask, bool), w * tau, 0.0)
    sign = jnp.where(jnp.sum(c, axis=0) >= 0, 1.0, -1.0)
    agree = jnp.sign(c) == sign[None]
    num = jnp.sum(jnp.where(agree, c, 0.0), axis=0)
    den = jnp.sum(jnp.where(agree, w if normalize_by == "weight" else 1.0, 0.0), axis=0)
    return num / jnp.where(den == 0, 1.0, den)


def disjoint_merge(tau, keep_mask, weight=1.0, *, normalize_by: str = "count", block_rows: int | None = None,
                   interpret: bool | None = None):
    """TIES sign election + disjoint mean of masked task vectors in one fused Pallas pass.

    Per entry: ``c_t = keep_t * w_t * tau_t``; ``sign = +1`` where ``sum_t c_t >= 0`` else ``-1``; the
    ``c_t`` whose sign equals it are summed and divided by their number (``normalize_by="count"``) or
    their weights' sum (``"weight"``); 0 where none agrees.

    Args:
      tau: ``(T, *shape)`` task vectors (any float dtype; computed in float32).
      keep_mask: ``(T, *shape)`` bool (e.g. the TIES trim mask).
      weight: scalar or ``(T,)`` per-task weights (may be traced).
      normalize_by: ``"count"`` (TIES paper) or ``"weight"`` (mergekit's weighted mean).
      block_rows: rows of 128 entries per block (a power of two); see :func:`masked_merge`.
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
    return masked_merge(tau, stacked=True, masks=keep_mask, weights=weight, normalize_by=normalize_by,
                        add_base=False, block_rows=block_rows, interpret=interpret)
