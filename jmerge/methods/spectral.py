"""Spectral merges of task matrices: TSV-M (Task Singular Vectors) and ISO-C (isotropic merging).

Matrices: every leaf with two or more dimensions is treated as a stack of matrices over its last
two dimensions (a ``(3, 4, 5)`` leaf is three ``4 x 5`` matrices; scan-stacked layer weights
``(L, d_in, d_out)`` are L matrices), and the SVDs run batched over the leading dimensions. Other
leaves (biases, norms, scalars) take the plain mean of the task vectors, as both papers' code does.
The papers' reference code treats only 2-D tensors as matrices; for 2-D leaves jmerge matches it.

References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR 2025); Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025).
"""

from __future__ import annotations

import jax.numpy as jnp

from ..core.driver import MergeState, transform
from ..core.driver import model_mean, model_sum

__all__ = ["tsv_m", "iso_c", "tsv_rank"]


def tsv_rank(min_dim: int, num_models: int, rank_fraction: float | None = None) -> int:
    """Singular triplets kept per task: ``floor(min_dim * fraction)`` (fraction ``1/T`` by default), at least 1."""
    frac = 1.0 / num_models if rank_fraction is None else float(rank_fraction)
    return max(1, min(min_dim, int(min_dim * frac)))


def _orthogonalize(x):
    """Closest matrix with orthonormal columns (Procrustes): ``P Qᵀ`` from ``x = P S Qᵀ``."""
    p, _, qt = jnp.linalg.svd(x, full_matrices=False)
    return p @ qt


def _tsv_m(state: MergeState, hp, *, rank_fraction) -> MergeState:
    tau = state.tau
    T = state.num_models
    if tau.ndim < 3:  # vectors and scalars: mean of the task vectors
        return state.replace(merged=hp["scale"] * model_mean(tau))
    m, n = tau.shape[-2:]
    r = tsv_rank(min(m, n), T, rank_fraction)
    u, s, vt = jnp.linalg.svd(tau, full_matrices=False)  # (T,...,m,k) (T,...,k) (T,...,k,n)
    u, s, vt = u[..., :r], s[..., :r], vt[..., :r, :]
    # concatenate the tasks' triplets: U_cat (..., m, T r), S_cat (..., T r), V_cat (..., T r, n)
    u_cat = jnp.concatenate([u[t] for t in range(T)], axis=-1)
    s_cat = jnp.concatenate([s[t] for t in range(T)], axis=-1)
    vt_cat = jnp.concatenate([vt[t] for t in range(T)], axis=-2)
    u_orth = _orthogonalize(u_cat)
    vt_orth = _orthogonalize(vt_cat)
    merged = (u_orth * s_cat[..., None, :]) @ vt_orth
    return state.replace(merged=hp["scale"] * merged)


def tsv_m(scale=1.0, *, rank_fraction: float | None = None):
    """TSV-M: merge the tasks' top singular subspaces after decorrelating them.

    Per matrix, each ``τ_t = U_t Σ_t V_tᵀ`` keeps its top ``r = floor(min(m, n) · rank_fraction)``
    triplets (``rank_fraction = 1/T`` by default, at least one). The kept ``U``'s and ``V``'s are
    concatenated across tasks and each concatenation is replaced by its closest orthonormal matrix
    (``P Qᵀ`` from its SVD, the orthogonal Procrustes solution); the merged update is
    ``scale · U⊥ diag(Σ_cat) V⊥ᵀ``. Non-matrix leaves get ``scale · mean_t τ_t``. See the module
    docstring for leaves with more than two dimensions.

    Args:
      scale: the paper's α (1.0 in the paper and FusionBench).
      rank_fraction: fraction of each matrix's rank kept per task (static; default ``1/T``).

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
    (CVPR 2025).
    """
    rf = None if rank_fraction is None else float(rank_fraction)
    return transform("tsv_m", _tsv_m, hparams={"scale": scale}, static={"rank_fraction": rf})


def _iso_c(state: MergeState, hp) -> MergeState:
    tau = state.tau
    if tau.ndim < 3:
        return state.replace(merged=hp["scale"] * model_mean(tau))
    total = model_sum(tau)
    u, s, vt = jnp.linalg.svd(total, full_matrices=False)
    s_iso = jnp.mean(s, axis=-1, keepdims=True)
    merged = (u * s_iso[..., None, :]) @ vt
    return state.replace(merged=hp["scale"] * merged)


def iso_c(scale=1.0):
    """ISO-C: task arithmetic with an isotropic (flattened) spectrum.

    Per matrix, ``M = Σ_t τ_t = U Σ Vᵀ`` and the merged update is ``scale · U (mean(Σ) I) Vᵀ``: all
    singular values are replaced by their mean. Non-matrix leaves get ``scale · mean_t τ_t``, as the
    paper's code. See the module docstring for leaves with more than two dimensions.

    Args:
      scale: the paper's α (tuned on validation, typically 1.0–1.5).

    References: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces" (ICML 2025).
    """
    return transform("iso_c", _iso_c, hparams={"scale": scale})


METHODS = {"tsv_m": tsv_m, "iso_c": iso_c}
