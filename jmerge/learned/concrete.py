"""Concrete subspace learning: a shared relaxed-Bernoulli mask over task-vector entries."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ..core import MergeInputError
from .adamerging import export_coefficients, init_coefficients
from .common import (Batcher, LearnedMerge, coefficient_projection, multitask_loss, prepare_task_inputs,
                      train)

__all__ = ["concrete_merge", "concrete_mask"]


def concrete_mask(logits: Float[Array, "*shape"], key: PRNGKeyArray,
                  temperature: float = 0.5) -> Float[Array, "*shape"]:
    """Relaxed-Bernoulli sample ``sigmoid((logits + log u - log(1 - u)) / temperature)``, ``u ~ U(0,1)``,
    divided by its mean (so the masked tensor keeps its scale).

    References: Maddison et al., "The Concrete Distribution" (ICLR 2017); Tang et al., "Concrete Subspace
    Learning based Interference Elimination for Multi-task Model Fusion" (2023).
    """
    u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-6, maxval=1.0 - 1e-6)
    m = jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temperature)
    return m / jnp.mean(m)


def hard_mask(logits: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """``1[sigmoid(logits) >= 0.5]`` divided by its mean (all-zero stays zero)."""
    m = (logits >= 0.0).astype(jnp.float32)
    mean = jnp.mean(m)
    return jnp.where(mean > 0, m / jnp.where(mean > 0, mean, 1.0), 0.0)


def concrete_merge(apply_fn: Callable[..., Any] | Sequence[Callable[..., Any]], base: Any,
                   models: Sequence[Any] | None = None, *, task_vectors: Sequence[Any] | None = None,
                   batches: Sequence[Any], inner: str = "task_arithmetic",
                   scale: float | Sequence[float] | np.ndarray | jax.Array = 0.3, granularity: str = "layer",
                   init: Any = 0.3, temperature: float = 0.5, mask_init: float = 0.0,
                   optimizer: optax.GradientTransformation | None = None,
                   coef_optimizer: optax.GradientTransformation | None = None, steps: int = 100,
                   batch_size: int | None = None, loss: str | Callable[..., Any] = "entropy",
                   labels: Sequence[Any] | None = None, clamp: tuple[float | None, float | None] | None = (0.0, 1.0),
                   refine_steps: int = 0, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                   log_every: int = 0) -> LearnedMerge:
    """Concrete subspace learning: learn one mask shared by all task vectors to remove interference.

    Per mergeable leaf, mask logits ``s`` (init ``mask_init``, 0 in the paper) define a concrete (relaxed Bernoulli, ``temperature``
    0.5) mask ``m = sigmoid((s + log u - log(1-u)) / temperature)``, ``u ~ U(0,1)``, divided by its mean;
    the merged model is ``theta_0 + sum_t lambda_t (m * tau_t)``. The outer problem trains ``s`` by the
    entropy (or CE) of the merged model's predictions. Inner problem:

    * ``inner="task_arithmetic"``: fixed ``lambda_t = scale`` (Concrete TA);
    * ``inner="adamerging"``: ``lambda`` (task- or layer-wise, ``init``, clamped) is trained together
      with the mask, one ``coef_optimizer`` step per mask step (Concrete AdaMerging; the bi-level
      problem solved by alternating single gradient steps inside one jitted step).

    The returned parameters use the hard mask ``1[sigmoid(s) >= 0.5]`` divided by its mean per tensor
    (with untrained logits >= 0 every entry is kept).

    Args:
      apply_fn, base, models, task_vectors, batches, batch_size, loss, labels, mesh, seed, log_every:
        as :func:`jmerge.adamerging`.
      inner: ``"task_arithmetic"`` or ``"adamerging"``.
      scale: task-arithmetic coefficient(s) (scalar or (T,)) for ``inner="task_arithmetic"``.
      granularity, init, clamp: coefficients of ``inner="adamerging"``.
      temperature: concrete temperature.
      mask_init: initial value of every mask logit (FusionBench's ``initial_logits``; 0: keep probability
        0.5; a positive value starts close to the full task vectors, so training mainly removes entries).
      optimizer: optax optimiser of the mask logits (default ``optax.adam(1e-2)``).
      coef_optimizer: optax optimiser of the coefficients (default ``optax.adam(1e-3)``).
      steps: optimisation steps (mask stage).
      refine_steps: with ``inner="adamerging"``, a second stage of this many AdaMerging steps on the
        hard-masked task vectors (mask fixed), starting from the learned coefficients; its losses are
        in ``info["refine_losses"]``.

    Returns:
      :class:`LearnedMerge` with ``params`` (hard mask), ``mask`` (base-shaped tree of boolean masks,
      None for non-merged leaves), ``coefficients`` and ``losses``; ``info["mask_logits"]``.

    References: Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task
    Model Fusion" (2023).
    """
    if inner not in ("task_arithmetic", "adamerging"):
        raise MergeInputError(f"inner must be 'task_arithmetic' or 'adamerging', got {inner!r}.")
    if not temperature > 0:
        raise MergeInputError(f"temperature must be > 0, got {temperature}.")
    if not np.isfinite(mask_init):
        raise MergeInputError(f"mask_init must be a finite float, got {mask_init}.")
    tv, fns, batches, labels, sizes = prepare_task_inputs(apply_fn, base, models, task_vectors, batches, loss,
                                                          labels)
    T = tv.num_tasks
    batcher = Batcher(batches, labels, sizes, batch_size, seed, mesh)
    mask_opt = optax.adam(1e-2) if optimizer is None else optimizer
    variables = {"logits": [jnp.full(t.shape[1:], float(mask_init), jnp.float32) for t in tv.taus]}
    if inner == "adamerging":
        variables["lam"] = init_coefficients(tv, granularity, init, False)
        coef_opt = coef_optimizer = optax.adam(1e-3) if coef_optimizer is None else coef_optimizer
        opt = optax.multi_transform({"logits": mask_opt, "lam": coef_opt},
                                    {"logits": "logits", "lam": "lam"})
        clamp_fn = coefficient_projection(clamp, False)
        project = lambda v, c: {"logits": v["logits"], "lam": clamp_fn(v["lam"])}  # noqa: E731
        fixed = None
    else:
        opt = optax.multi_transform({"logits": mask_opt}, {"logits": "logits"})
        project = None
        fixed = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (T,))

    def lam_of(v):
        return v["lam"] if "lam" in v else fixed

    def objective(v, consts, data, key):
        lam = lam_of(v)
        deltas = tv.combine(consts, lam)
        deltas = [concrete_mask(s, jax.random.fold_in(key, j), temperature) * d
                  for j, (s, d) in enumerate(zip(v["logits"], deltas))]
        return multitask_loss(fns, tv.build(consts, deltas), data, loss)

    variables, losses = train(objective, variables, tv.consts(), batcher, optimizer=opt, steps=steps,
                              project=project, log_every=log_every, name=f"concrete_merge({inner})", seed=seed)
    variables = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), variables)
    lam = lam_of(variables)
    consts = tv.consts()
    deltas = [hard_mask(s) * d for s, d in zip(variables["logits"], tv.combine(consts, lam))]
    params = tv.build(consts, deltas)
    mask = tv.per_leaf_tree([np.asarray(s >= 0.0) for s in variables["logits"]])
    coefs = export_coefficients(tv, lam, granularity) if inner == "adamerging" else np.asarray(lam)
    info = {"mask_logits": tv.per_leaf_tree([np.asarray(s) for s in variables["logits"]]), "inner": inner}
    if refine_steps and inner == "adamerging":
        # second stage: AdaMerging on the hard-masked task vectors, starting from the learned lambda
        from .adamerging import _learn_coefficients
        masked = []
        for t in range(T):
            leaves = [jnp.zeros_like(jnp.asarray(b)) for b in tv.base_leaves]
            for j, i in enumerate(tv.idx):
                leaves[i] = hard_mask(variables["logits"][j]) * consts["taus"][j][t]
            masked.append(jax.tree_util.tree_unflatten(tv.treedef, leaves))
        refined = _learn_coefficients(apply_fn, base, None, masked, batches, granularity, np.asarray(lam),
                                      coef_optimizer, refine_steps, batch_size, loss, labels, clamp, False, mesh,
                                      seed, log_every, "concrete_merge(refine)")
        params, coefs = refined.params, refined.coefficients
        info["refine_losses"] = refined.losses
    return LearnedMerge(params=params, coefficients=coefs, losses=losses, mask=mask, info=info)
