"""Data-free adaptive projective gradient descent on task vectors in a shared subspace."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import MergeInputError
from .common import LearnedMerge, task_vectors_from, train

__all__ = ["adaptive_projective_gd"]


class _NoData:
    def replicate(self, tree):
        return tree

    def get(self, step):
        return None


def _as_matrix(x):
    """(T, *shape) -> (T, in, out): first axis is the input side, the rest flattened (1-D: (n, 1))."""
    T = x.shape[0]
    if x.ndim == 1:
        return x.reshape(T, 1, 1)
    return x.reshape(T, x.shape[1], -1)


def adaptive_projective_gd(base: Any, models: Sequence[Any] | None = None, *,
                           task_vectors: Sequence[Any] | None = None, rank_ratio: float = 0.1, scale: float = 0.3,
                           steps: int = 200, optimizer: optax.GradientTransformation | None = None,
                           learn_coefficients: bool = True, seed: int = 0, log_every: int = 0) -> LearnedMerge:
    """Data-free merging by gradient descent on a task-vector correction outside a shared subspace.

    A reduced, data-free form of the objective of Wei et al. (2025). For every leaf, viewed as a matrix
    ``tau_t`` of shape ``(in, out)`` (leading axis = input side, remaining axes flattened; vectors as
    ``(n, 1)``):

    * merged task vector ``tau_m = sum_t lambda_t tau_t + Delta``, ``Delta`` initialised to 0 and
      ``lambda_t`` (per task and leaf) initialised adaptively to
      ``scale * T * (1 / ||tau_t||) / sum_s (1 / ||tau_s||)`` (smaller weight for larger task vectors, mean
      ``scale``; zero task vectors get 0 and drop out of the loss); ``lambda`` is trained too when
      ``learn_coefficients``;
    * loss ``sum_leaves sum_t ||tau_t^T (tau_m - tau_t)||_F^2 / ||tau_t||_F^4``: the gap between the merged
      and the task-t layer on task t's data, with the data replaced by the task vector's own input
      directions (the data-free proxy ``X_t ~ tau_t^T``); scale-invariant per task;
    * shared subspace ``B``: the top ``k = ceil(rank_ratio * min(in, out))`` left singular vectors of
      ``[tau_1, ..., tau_T]`` (the directions the tasks share); the gradient of ``Delta`` is projected
      onto its orthogonal complement (``g - B B^T g``) before the optax update, and ``Delta`` is projected
      again after it (adaptive optimisers rescale entries), so ``B^T Delta = 0``: the shared knowledge
      is kept and only task-specific interference is corrected.

    Not implemented from the paper: data-dependent inputs, its per-layer heuristics beyond the above.

    Args:
      base: base params pytree.
      models: T fine-tuned params (or ``task_vectors``).
      task_vectors: T task-vector pytrees.
      rank_ratio: fraction of ``min(in, out)`` spanned by the shared subspace, in (0, 1].
      scale: mean initial coefficient.
      steps: optimisation steps.
      optimizer: optax optimiser (default ``optax.adam(1e-3)``).
      learn_coefficients: also train ``lambda``.
      seed: unused randomness seed (kept for a uniform API).
      log_every: print the loss every this many steps.

    Returns:
      :class:`LearnedMerge` with ``params``, ``coefficients`` (base-shaped tree of ``(T,)``) and
      ``losses``.

    References: Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent"
    (ICML 2025).
    """
    if not 0.0 < float(rank_ratio) <= 1.0:
        raise MergeInputError(f"rank_ratio must be in (0, 1], got {rank_ratio}.")
    tv = task_vectors_from(base, models, task_vectors)
    T = tv.num_tasks
    mats = [_as_matrix(t) for t in tv.taus]
    norms = [jnp.sqrt(jnp.sum(jnp.square(m), axis=(1, 2))) for m in mats]  # zero for untouched leaves
    bases = []
    for m in mats:
        n_in, n_out = m.shape[1], m.shape[2]
        k = max(1, math.ceil(float(rank_ratio) * min(n_in, n_out)))
        cat = jnp.concatenate(list(m), axis=1)  # (in, T*out)
        u, _, _ = jnp.linalg.svd(cat, full_matrices=False)
        bases.append(u[:, :k])
    lam0 = []
    for n in norms:
        inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
        tot = jnp.sum(inv)
        lam0.append(jnp.where(tot > 0, scale * T * inv / jnp.where(tot > 0, tot, 1.0), scale))
    lam0 = jnp.stack(lam0, axis=1)  # (T, L)
    variables = {"lam": lam0, "delta": [jnp.zeros(m.shape[1:], jnp.float32) for m in mats]}
    consts = {"mats": mats, "norms": norms, "bases": bases}

    def objective(v, c, data, key):
        total = 0.0
        for j, (m, n) in enumerate(zip(c["mats"], c["norms"])):
            lam = v["lam"][:, j] if learn_coefficients else jax.lax.stop_gradient(v["lam"][:, j])
            tm = jnp.tensordot(lam, m, axes=1) + v["delta"][j]
            gap = jnp.einsum("tio,tip->top", m, tm[None] - m)
            w = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0) ** 4, 0.0)  # zero task vectors: no term
            total = total + jnp.sum(jnp.sum(jnp.square(gap), axis=(1, 2)) * w)
        return total

    def project_grad(g, c):
        delta = [gd - b @ (b.T @ gd) for gd, b in zip(g["delta"], c["bases"])]
        lam = g["lam"] if learn_coefficients else jnp.zeros_like(g["lam"])
        return {"lam": lam, "delta": delta}

    def project_delta(v, c):  # adaptive optimisers rescale per entry: keep Delta in the complement
        return {"lam": v["lam"], "delta": [d - b @ (b.T @ d) for d, b in zip(v["delta"], c["bases"])]}

    opt = optax.adam(1e-3) if optimizer is None else optimizer
    variables, losses = train(objective, variables, consts, _NoData(), optimizer=opt, steps=steps,
                              grad_transform=project_grad, project=project_delta, log_every=log_every,
                              name="adaptive_projective_gd",
                              seed=seed)
    lam = np.asarray(variables["lam"])
    deltas = []
    for j, (tau, d) in enumerate(zip(tv.taus, variables["delta"])):
        tm = jnp.tensordot(jnp.asarray(lam[:, j]), tau, axes=1) + jnp.asarray(d).reshape(tau.shape[1:])
        deltas.append(tm)
    params = tv.build(tv.consts(), deltas)
    return LearnedMerge(params=params, coefficients=tv.per_leaf_tree([lam[:, j] for j in range(tv.num_leaves)]),
                        losses=losses, info={"shared_rank": [int(b.shape[1]) for b in bases]})
