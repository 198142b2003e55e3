"""AdaMerging and aTLAS: merging coefficients learned by gradient descent.

``theta = theta_0 + sum_t lambda_t tau_t`` with ``lambda`` one per task (task-wise) or one per task and
parameter tensor (layer-wise / aTLAS's per-block anisotropic scaling), trained with optax on the
entropy of the merged model's predictions on unlabeled inputs (AdaMerging) or on a supervised
cross-entropy (aTLAS few-shot).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import MergeInputError
from .common import (Batcher, LearnedMerge, TaskVectors, coefficient_projection, multitask_loss, prepare_task_inputs,
                      task_vectors_from, train)

__all__ = ["adamerging", "atlas", "merge_with_coefficients"]


def init_coefficients(tv: TaskVectors, granularity: str, init: Any, simplex: bool) -> jax.Array:
    """Initial ``lambda``: (T,) for task-wise, (T, L) for layer-wise (L = mergeable leaves)."""
    if granularity not in ("task", "layer"):
        raise MergeInputError(f"granularity must be 'task' or 'layer', got {granularity!r}.")
    T, L = tv.num_tasks, tv.num_leaves
    shape = (T,) if granularity == "task" else (T, L)
    if not isinstance(init, (int, float, np.ndarray, jnp.ndarray, list, tuple)):
        # a base-shaped tree of (T,) coefficients, e.g. from a previous LearnedMerge
        from ..core import leaves_with_paths
        leaves = leaves_with_paths(init)[1]
        if len(leaves) != L or granularity != "layer":
            raise MergeInputError(
                f"init given as a tree has {len(leaves)} leaves; it needs one (T,) array per mergeable leaf "
                f"({L}) and granularity='layer'.")
        init = np.stack([np.broadcast_to(np.asarray(v, np.float32), (T,)) for v in leaves], axis=1)
    init = np.asarray(init, np.float32)
    if init.ndim == 1 and init.shape[0] == T and granularity == "layer":
        init = init[:, None]
    try:
        lam = jnp.broadcast_to(jnp.asarray(init, jnp.float32), shape)
    except ValueError as e:
        raise MergeInputError(
            f"init of shape {init.shape} does not broadcast to the coefficient shape {shape} "
            "(tasks[, leaves]).") from e
    if simplex:
        from .common import project_simplex
        lam = project_simplex(lam, axis=0)
    return jnp.array(lam)


def export_coefficients(tv: TaskVectors, lam: jax.Array, granularity: str) -> Any:
    """``(T,)`` array for task-wise; base-shaped tree of ``(T,)`` arrays for layer-wise."""
    if granularity == "task":
        return np.asarray(lam)
    lam = np.asarray(lam)
    return tv.per_leaf_tree([lam[:, j] for j in range(tv.num_leaves)])


def merge_with_coefficients(base: Any, models: Sequence[Any] | None = None, coefficients: Any = None, *,
                            task_vectors: Sequence[Any] | None = None) -> Any:
    """``theta_0 + sum_t lambda_t tau_t`` in the base dtypes, for coefficients from :func:`adamerging`.

    Args:
      base: base params pytree.
      models: fine-tuned params (or give ``task_vectors``).
      coefficients: ``(T,)`` array or a base-shaped tree of ``(T,)`` arrays (None leaves: not merged).
      task_vectors: task-vector pytrees instead of models.

    Returns:
      the merged params pytree.

    References: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024).
    """
    tv = task_vectors_from(base, models, task_vectors)
    if isinstance(coefficients, (np.ndarray, jnp.ndarray, list, tuple, float, int)):
        lam = jnp.broadcast_to(jnp.asarray(coefficients, jnp.float32), (tv.num_tasks,))
    else:
        from ..core import leaves_with_paths
        cl = leaves_with_paths(coefficients)[1]
        if len(cl) != tv.num_leaves:
            raise MergeInputError(
                f"coefficients tree has {len(cl)} leaves but the base has {tv.num_leaves} mergeable leaves.")
        lam = jnp.stack([jnp.asarray(c, jnp.float32) for c in cl], axis=1)
    consts = tv.consts()
    return tv.build(consts, tv.combine(consts, lam))


def _learn_coefficients(apply_fn, base, models, task_vectors, batches, granularity, init, optimizer, steps,
                        batch_size, loss, labels, clamp, simplex, mesh, seed, log_every, name):
    tv, fns, batches, labels, sizes = prepare_task_inputs(apply_fn, base, models, task_vectors, batches, loss,
                                                          labels)
    T = tv.num_tasks
    lam0 = init_coefficients(tv, granularity, init, simplex)
    clamp_fn = coefficient_projection(clamp, simplex)
    project = lambda lam, consts: clamp_fn(lam)  # noqa: E731
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    batcher = Batcher(batches, labels, sizes, batch_size, seed, mesh)

    def objective(lam, consts, data, key):
        params = tv.build(consts, tv.combine(consts, lam))
        return multitask_loss(fns, params, data, loss)

    lam, losses = train(objective, lam0, tv.consts(), batcher, optimizer=optimizer, steps=steps,
                        project=project, log_every=log_every, name=name, seed=seed)
    params = tv.build(tv.consts(), tv.combine(tv.consts(), jnp.asarray(np.asarray(lam))))
    return LearnedMerge(params=params, coefficients=export_coefficients(tv, lam, granularity), losses=losses,
                        info={"granularity": granularity, "paths": [tv.paths[i] for i in tv.idx]})


def adamerging(apply_fn: Callable[..., Any] | Sequence[Callable[..., Any]], base: Any,
               models: Sequence[Any] | None = None, *, task_vectors: Sequence[Any] | None = None,
               batches: Sequence[Any], granularity: str = "layer", init: Any = 0.3,
               optimizer: optax.GradientTransformation | None = None, steps: int = 100, batch_size: int | None = None,
               loss: str | Callable[..., Any] = "entropy", labels: Sequence[Any] | None = None,
               clamp: tuple[float | None, float | None] | None = (0.0, 1.0), simplex: bool = False,
               mesh: jax.sharding.Mesh | None = None, seed: int = 0, log_every: int = 0) -> LearnedMerge:
    """AdaMerging: learn merging coefficients by minimising prediction entropy on unlabeled inputs.

    ``theta = theta_0 + sum_t lambda_t tau_t`` (float32 sum, cast to the base dtypes). Task-wise:
    one ``lambda_t`` per task; layer-wise: one per task and parameter tensor (leaf). The loss is the
    sum over tasks of the mean Shannon entropy of ``softmax(apply_fn_t(theta, x_t))`` (or, with
    ``loss="ce"``, the mean cross-entropy against ``labels``). Each step is one jitted function
    (``jax.value_and_grad`` + the optax update + clamp/simplex projection).

    Args:
      apply_fn: ``apply_fn(params, batch) -> logits (N, ..., C)``, or a sequence of T callables (one per
        task, e.g. per-task classification heads).
      base: base (pretrained) params pytree (dict, Flax NNX ``nnx.State`` ...).
      models: T fine-tuned params pytrees (or give ``task_vectors``).
      task_vectors: T task-vector pytrees ``theta_t - theta_0`` instead of ``models``.
      batches: T per-task inputs (arrays or pytrees with a leading example axis).
      granularity: ``"task"`` or ``"layer"``.
      init: initial coefficient(s): scalar, ``(T,)``, ``(T, L)`` (L = floating leaves, in leaf order) or,
        layer-wise, a base-shaped tree of ``(T,)`` arrays (e.g. a previous result's ``coefficients``).
      optimizer: an optax GradientTransformation (default ``optax.adam(1e-3)``).
      steps: optimisation steps.
      batch_size: examples per task and step, drawn deterministically from ``seed``; None: whole batches.
      loss: ``"entropy"`` (unsupervised), ``"ce"`` (needs ``labels``) or a callable
        ``loss(logits, labels) -> scalar`` (``labels`` is the task's minibatch of ``labels``, or None).
      labels: T integer label arrays (for ``loss="ce"``).
      clamp: ``(lo, hi)`` applied after each step (None: no clamp; either bound may be None).
      simplex: project the coefficients of each leaf group onto the simplex (sum to 1, >= 0) instead
        of clamping.
      mesh: a ``jax.sharding.Mesh`` with a ``'data'`` axis: batches are sharded along it, the
        coefficients and models replicated (data parallel).
      seed: minibatch sampling seed.
      log_every: print the loss every this many steps (0: silent).

    Returns:
      :class:`LearnedMerge` with ``params``, ``coefficients`` (``(T,)`` task-wise; base-shaped tree of
      ``(T,)`` layer-wise) and ``losses`` (one per step).

    Raises:
      MergeInputError: incompatible trees, wrong number of batches/apply functions, empty batches,
        outputs that are not logits. LearnedMergeError: a NaN/Inf loss or gradient (names the step).

    References: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024).
    """
    return _learn_coefficients(apply_fn, base, models, task_vectors, batches, granularity, init, optimizer,
                               steps, batch_size, loss, labels, clamp, simplex, mesh, seed, log_every,
                               "adamerging")


def atlas(apply_fn: Callable[..., Any] | Sequence[Callable[..., Any]], base: Any, models: Sequence[Any] | None = None,
          *, task_vectors: Sequence[Any] | None = None, batches: Sequence[Any], labels: Sequence[Any] | None = None,
          loss: str | Callable[..., Any] | None = None, init: Any = 0.0,
          optimizer: optax.GradientTransformation | None = None, steps: int = 100, batch_size: int | None = None,
          clamp: tuple[float | None, float | None] | None = None, simplex: bool = False,
          mesh: jax.sharding.Mesh | None = None, seed: int = 0, log_every: int = 0) -> LearnedMerge:
    """aTLAS: learned anisotropic scaling, one coefficient per task vector and parameter block.

    ``theta = theta_0 + sum_t Lambda_t tau_t`` where ``Lambda_t`` holds one learned scale per parameter
    block (leaf) of task vector t. Supervised (cross-entropy on ``labels``, the default when labels are
    given, e.g. few-shot) or unsupervised (entropy). Differences from layer-wise :func:`adamerging`
    are only the defaults, following the paper: coefficients start at 0 (the pretrained model) and are
    not clamped (negative scales are allowed).

    Args: as :func:`adamerging` (``granularity`` is always per block); ``loss`` defaults to ``"ce"`` if
      ``labels`` are given, else ``"entropy"``.

    Returns:
      :class:`LearnedMerge` (coefficients: base-shaped tree of ``(T,)`` arrays).

    References: Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic
    Scaling" (NeurIPS 2024).
    """
    loss = ("ce" if labels is not None else "entropy") if loss is None else loss
    return _learn_coefficients(apply_fn, base, models, task_vectors, batches, "layer", init, optimizer,
                               steps, batch_size, loss, labels, clamp, simplex, mesh, seed, log_every, "atlas")
