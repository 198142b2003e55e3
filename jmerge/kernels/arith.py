"""The TIES family's disjoint aggregation as plain array arithmetic, shared by the XLA path
(:mod:`jmerge.methods.ties`) and the fused Pallas kernel (:mod:`jmerge.kernels.fused`), so both compute
the same operations in the same order (the kernel is tested bitwise against the XLA path).

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

__all__ = ["disjoint_aggregate"]


def disjoint_aggregate(taus: Sequence, ws: Sequence, sign, *, reduce: str, normalize_by: str,
                       r: Callable = lambda x: x):
    """Sum (``reduce="sum"``) or mean of the weighted entries ``w_t * tau_t`` whose sign agrees with ``sign``.

    Args:
      taus: the (trimmed) task vectors, one array per model.
      ws: one weight (scalar or broadcastable array) per model.
      sign: the elected sign (+1/-1), float32.
      reduce: ``"mean"`` or ``"sum"``.
      normalize_by: ``"count"`` (number of agreeing models) or ``"weight"`` (sum of their weights).
      r: rounding applied where a merge computed in bf16/fp16 rounds (identity in float32).

    Returns:
      The aggregated delta (a zero divisor leaves the zero sum unchanged).

    References: Yadav et al. 2023 (TIES-Merging), disjoint merge.
    """
    contrib = [r(w * t) for w, t in zip(ws, taus)]
    agree = [jnp.sign(c) == sign for c in contrib]
    total = r(sum([jnp.where(a, c, 0.0) for a, c in zip(agree, contrib)]))
    if reduce == "mean":
        if normalize_by == "count":
            div = sum([a.astype(jnp.float32) for a in agree])
        else:
            div = r(sum([jnp.where(a, w, 0.0) for a, w in zip(agree, ws)]))
        total = r(total / jnp.where(div == 0, 1.0, div))
    return total
