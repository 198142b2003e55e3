"""Spectral merges of task matrices: TSV-M (Task Singular Vectors), ISO-C and ISO-CTS (isotropic merging).

Matrices come from the core's matrix views (:class:`jmerge.MatrixView`): a Flax
``MultiHeadDotProductAttention`` query kernel ``(in, heads, head_dim)`` is one ``in x (heads*head_dim)``
matrix, a ``Conv`` kernel ``(kh, kw, in, out)`` one ``(kh*kw*in) x out`` matrix, a scan-stacked
``(L, in, out)`` kernel a batch of L matrices, a Hugging Face ``(out, in)`` weight one matrix; the
SVDs run batched. Vector leaves (biases of any shape, norm scales, scalars) take the plain mean of the
task vectors, as the papers' code does. Override a leaf's view with ``merge(..., views=...)``.

These methods need each whole matrix: under a sharded merge the matrix is gathered.

Cost. The time is the LAPACK SVDs (``gesdd``, float32, economy size, batched over tasks): ISO-C one
SVD of the summed task matrix; TSV-M one per task plus the two orthogonalisations; ISO-CTS one of the
sum, one per task of the residual and the two orthogonalisations. ISO-CTS's residual
``τ_t − U_k U_kᵀ τ_t`` lies in the span of the sum's trailing left singular vectors when the matrix is
not taller than wide, so its SVD is taken of the small ``(min_dim − k) x n`` projection (exact, same
numbers to float32 rounding). ``svd="randomized"`` replaces the per-task truncated SVDs (TSV-M's top
``r``, ISO-CTS's top ``d`` of tall matrices) by a randomized range finder (Halko et al. 2011) with
``power_iters`` power iterations, seeded by the leaf's PRNG key; ``scripts/bench_svd.py`` prints its
relative error against the exact path. ISO-C keeps the whole spectrum and has no truncated variant.

References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR 2025); Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025); Halko, Martinsson and Tropp, "Finding Structure with Randomness"
(SIAM Review 2011) for ``svd="randomized"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..core import HParamSpec, MergeInputError, MergeState, Transform, model_mean, model_sum, transform

__all__ = ["tsv_m", "iso_c", "iso_cts", "tsv_rank", "iso_cts_sizes", "oversampled_rank"]


def tsv_rank(min_dim: int, num_models: int, rank_fraction: float | None = None) -> int:
    """Singular triplets kept per task: ``floor(min_dim * fraction)`` (fraction ``1/T`` by default), at least 1.

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025).
    """
    frac = 1.0 / num_models if rank_fraction is None else float(rank_fraction)
    return max(1, min(min_dim, int(min_dim * frac)))


SVD_MODES = ("exact", "randomized")


def _check_svd(where: str, svd: str, power_iters: int) -> tuple[str, int]:
    if svd not in SVD_MODES:
        raise MergeInputError(f"{where}: svd={svd!r}; use 'exact' (LAPACK, the default) or 'randomized'.")
    if int(power_iters) != power_iters or power_iters < 0:
        raise MergeInputError(f"{where}: power_iters must be a non-negative integer, got {power_iters!r}.")
    return svd, int(power_iters)


def _svd(x):
    """Economy SVD (LAPACK ``gesdd`` on CPU), batched over the leading axes."""
    return jnp.linalg.svd(x, full_matrices=False)


def oversampled_rank(rank: int, min_dim: int) -> int:
    """Columns of the randomized range finder for a top-``rank`` SVD: ``rank + max(10, rank // 4)``,
    at most ``min_dim`` (then the exact SVD is used).

    References: Halko, Martinsson and Tropp, "Finding Structure with Randomness" (SIAM Review 2011).
    """
    return min(min_dim, rank + max(10, rank // 4))


def _top_svd(x, rank: int, mode: str, key, power_iters: int):
    """Top ``rank`` singular triplets of the matrices ``x`` (``(..., m, n)``): exact (LAPACK, then sliced)
    or randomized (range finder with power iterations, Halko et al. 2011)."""
    m, n = x.shape[-2:]
    ell = oversampled_rank(rank, min(m, n))
    if mode == "exact" or ell >= min(m, n):
        u, s, vt = _svd(x)
        return u[..., :rank], s[..., :rank], vt[..., :rank, :]
    xt = jnp.swapaxes(x, -1, -2)
    q, _ = jnp.linalg.qr(x @ jax.random.normal(key, x.shape[:-2] + (n, ell), x.dtype))
    for _ in range(power_iters):  # re-orthonormalised subspace iteration
        z, _ = jnp.linalg.qr(xt @ q)
        q, _ = jnp.linalg.qr(x @ z)
    ub, s, vt = _svd(jnp.swapaxes(q, -1, -2) @ x)  # (ell, n) projection
    return (q @ ub)[..., :rank], s[..., :rank], vt[..., :rank, :]


def _orthogonalize(x):
    """Closest matrix with orthonormal columns (rows, if wider than tall): ``P Qᵀ`` from ``x = P S Qᵀ``."""
    p, _, qt = jnp.linalg.svd(x, full_matrices=False)
    return p @ qt


def _mean_vector(state: MergeState, hp) -> MergeState:
    return state.replace(merged=hp["scale"] * model_mean(state.tau))


def _tsv_m(state: MergeState, hp, *, rank_fraction, svd="exact", power_iters=2) -> MergeState:
    if state.view is None:
        return _mean_vector(state, hp)
    T = state.num_models
    mats = state.view.to_matrices(state.tau, lead=1)  # (T, B, m, n)
    m, n = mats.shape[-2:]
    r = tsv_rank(min(m, n), T, rank_fraction)
    u, s, vt = _top_svd(mats, r, svd, state.key, power_iters)  # (T,B,m,r) (T,B,r) (T,B,r,n)
    u_cat = jnp.concatenate([u[t, ..., :r] for t in range(T)], axis=-1)
    s_cat = jnp.concatenate([s[t, ..., :r] for t in range(T)], axis=-1)
    vt_cat = jnp.concatenate([vt[t, ..., :r, :] for t in range(T)], axis=-2)
    merged = (_orthogonalize(u_cat) * s_cat[..., None, :]) @ _orthogonalize(vt_cat)
    return state.replace(merged=hp["scale"] * state.view.from_matrices(merged, state.base.shape))


def tsv_m(scale: HParamSpec = 1.0, *, rank_fraction: float | None = None, svd: str = "exact",
          power_iters: int = 2) -> Transform:
    """TSV-M: merge the tasks' top singular subspaces after decorrelating them.

    Per matrix, each ``τ_t = U_t Σ_t V_tᵀ`` keeps its top ``r = floor(min(m, n) · rank_fraction)``
    triplets (``rank_fraction = 1/T`` by default, at least one). The kept ``U``'s and ``V``'s are
    concatenated across tasks and each concatenation is replaced by its closest orthonormal matrix
    (``P Qᵀ`` from its SVD, the orthogonal Procrustes solution); the merged update is
    ``scale · U⊥ diag(Σ_cat) V⊥ᵀ``. Vector leaves get ``scale · mean_t τ_t``. Matrices come from the
    leaves' matrix views (see the module docstring); a whole matrix is needed: under a sharded merge
    each matrix is all-gathered, deliberately (its SVD is global over the matrix).

    Args:
      scale: the paper's α (1.0 in the paper and FusionBench).
      rank_fraction: fraction of each matrix's rank kept per task (static; default ``1/T``).
      svd: ``"exact"`` (LAPACK SVD of each task matrix, the paper's numbers) or ``"randomized"`` (each
        task's top ``r`` triplets from a randomized range finder of :func:`oversampled_rank` columns;
        faster, approximate: ``scripts/bench_svd.py`` reports the error). Static.
      power_iters: power iterations of the randomized range finder (static; more is slower and closer).

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
    (CVPR 2025); Halko, Martinsson and Tropp, "Finding Structure with Randomness" (SIAM Review 2011).
    """
    rf = None if rank_fraction is None else float(rank_fraction)
    svd, power_iters = _check_svd("tsv_m", svd, power_iters)
    static = {"rank_fraction": rf}
    if svd != "exact":  # the exact path's static key (and so its compiled program) is unchanged
        static.update(svd=svd, power_iters=power_iters)
    return transform("tsv_m", _tsv_m, hparams={"scale": scale}, static=static, uses_view=True)


def _iso_c(state: MergeState, hp) -> MergeState:
    if state.view is None:
        return _mean_vector(state, hp)
    total = model_sum(state.view.to_matrices(state.tau, lead=1))  # (B, m, n)
    u, s, vt = jnp.linalg.svd(total, full_matrices=False)
    merged = (u * jnp.mean(s, axis=-1, keepdims=True)[..., None, :]) @ vt
    return state.replace(merged=hp["scale"] * state.view.from_matrices(merged, state.base.shape))


def iso_c(scale: HParamSpec = 1.0) -> Transform:
    """ISO-C: task arithmetic with an isotropic (flattened) spectrum.

    Per matrix, ``M = Σ_t τ_t = U Σ Vᵀ`` and the merged update is ``scale · U (mean(Σ) I) Vᵀ``: all
    singular values are replaced by their mean. Vector leaves get ``scale · mean_t τ_t``, as the
    paper's code. Matrices come from the leaves' matrix views; a whole matrix is needed: under a
    sharded merge each matrix is all-gathered, deliberately (its SVD is global over the matrix).

    Args:
      scale: the paper's α (tuned on validation; 1.0–1.5 in the paper and FusionBench).

    References: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces" (ICML 2025).
    """
    return transform("iso_c", _iso_c, hparams={"scale": scale}, uses_view=True)


def iso_cts_sizes(min_dim: int, num_models: int, common_fraction: float) -> tuple[int, int]:
    """``(k_common, k_per_task)`` of ISO-CTS for a matrix of rank bound ``min_dim``.

    As the authors' code: ``k = int(min_dim * common_fraction)``, the task-specific total
    ``round((min_dim - k) / T) * T`` (Python rounding) and ``k = min_dim -`` that total, so that
    ``k + T * k_per_task == min_dim``. When the rounding would ask for more than ``min_dim``
    directions, one direction less per task is used.

    References: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces" (ICML 2025).
    """
    T = num_models
    k = int(min_dim * common_fraction)
    total = round((min_dim - k) / T) * T
    if total > min_dim:
        total -= T
    return min_dim - total, total // T


def _iso_cts(state: MergeState, hp, *, common_fraction: float, svd="exact", power_iters=2) -> MergeState:
    if state.view is None:
        return _mean_vector(state, hp)
    T = state.num_models
    mats = state.view.to_matrices(state.tau, lead=1)  # (T, B, m, n)
    m, n = mats.shape[-2:]
    kc, d = iso_cts_sizes(min(m, n), T, common_fraction)
    u, s, vt = _svd(model_sum(mats))
    uc, sc, vc = u[..., :kc], s[..., :kc], vt[..., :kc, :]
    us, ss, vs = [], [], []
    if d > 0:
        if m <= n:
            # u is square: τ_t − U_k U_kᵀ τ_t = U_⊥ (U_⊥ᵀ τ_t) with U_⊥ the sum's trailing left singular
            # vectors, so the residual's SVD is that of the small (m − k) x n projection, mapped back by U_⊥.
            u_perp = u[..., kc:]
            a, st, vtt = _svd(jnp.swapaxes(u_perp, -1, -2) @ mats)  # (T, B, m-k, n)
            ut, st, vtt = u_perp @ a[..., :d], st[..., :d], vtt[..., :d, :]
        else:
            w = mats - uc @ (jnp.swapaxes(uc, -1, -2) @ mats)  # remove the common subspace
            ut, st, vtt = _top_svd(w, d, svd, state.key, power_iters)
        us = [ut[t] for t in range(T)]
        ss = [st[t] for t in range(T)]
        vs = [vtt[t] for t in range(T)]
    u_all = _orthogonalize(jnp.concatenate(us + [uc], axis=-1))
    v_all = _orthogonalize(jnp.concatenate(vs + [vc], axis=-2))
    s_iso = jnp.mean(jnp.concatenate(ss + [sc], axis=-1), axis=-1, keepdims=True)
    merged = (u_all * s_iso[..., None, :]) @ v_all
    return state.replace(merged=hp["scale"] * state.view.from_matrices(merged, state.base.shape))


def iso_cts(scale: HParamSpec = 1.0, *, common_fraction: float = 0.8, svd: str = "exact",
            power_iters: int = 2) -> Transform:
    """ISO-CTS: isotropic merging in the common and task-specific subspaces.

    Per matrix (``m x n``, ``r = min(m, n)``), with ``k`` and ``d`` from :func:`iso_cts_sizes`:

    1. ``Σ_t τ_t = U Σ Vᵀ``; the common subspace is its top ``k`` triplets ``(U_k, Σ_k, V_k)``;
    2. per task, ``τ_t − U_k U_kᵀ τ_t`` (the common subspace projected out) keeps its top ``d`` triplets;
    3. the task triplets (in task order) and the common ones are concatenated (``r`` of them), the
       ``U``'s and ``V``'s orthogonalized (closest orthonormal matrices), and every singular value
       replaced by the mean of the ``r`` concatenated ones: ``scale · U⊥ (mean I) V⊥ᵀ``.

    Vector leaves get ``scale · mean_t τ_t``. Matrices come from the leaves' matrix views; a whole
    matrix is needed: under a sharded merge each matrix is all-gathered, deliberately (its SVDs are
    global over the matrix).

    Args:
      scale: the paper's α (tuned on validation; 1.5 for ViT-B/32 in the paper and FusionBench).
      common_fraction: fraction of the rank given to the common subspace (paper: 0.8; static).
      svd: ``"exact"`` (default) or ``"randomized"``: step 2's top ``d`` triplets of matrices taller than
        wide from a randomized range finder (wider or square matrices always take the exact small SVD
        of the module docstring). Static.
      power_iters: power iterations of the randomized range finder (static).

    References: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces" (ICML 2025); Halko, Martinsson and Tropp, "Finding Structure with Randomness"
    (SIAM Review 2011).
    """
    if not 0.0 <= float(common_fraction) <= 1.0:
        raise MergeInputError(f"iso_cts: common_fraction must be in [0, 1], got {common_fraction!r}.")
    svd, power_iters = _check_svd("iso_cts", svd, power_iters)
    static = {"common_fraction": float(common_fraction)}
    if svd != "exact":
        static.update(svd=svd, power_iters=power_iters)
    return transform("iso_cts", _iso_cts, hparams={"scale": scale}, static=static, uses_view=True)


METHODS = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}
