"""Shared machinery of the learned merges: input checks, minibatches, losses, the jitted trainer.

Merged parameters are a differentiable function of learned variables (coefficients, mask logits,
a correction ...). ``apply_fn(params, batch) -> logits`` comes from the user (a plain function of a
dict, or a Flax NNX model rebuilt from ``nnx.merge(graphdef, state)``). Every optimisation step is ONE
``jax.jit``-compiled function (``jax.value_and_grad`` + an optax update + projection); with a ``mesh``
the batch is sharded along the mesh axis ``'data'`` and everything else is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import MergeInputError, check_compatible, leaves_with_paths

__all__ = ["LearnedMerge", "LearnedMergeError"]


class LearnedMergeError(MergeInputError):
    """Raised when a learned merge cannot train (e.g. the loss became NaN/Inf at some step).

    References: none (infrastructure).
    """


@dataclasses.dataclass
class LearnedMerge:
    """Result of a learned merge.

    Attributes:
      params: merged parameters, same tree and dtypes as the base.
      coefficients: learned coefficients: a ``(T,)`` array (task-wise), or a pytree shaped like the
        base whose leaves are ``(T,)`` arrays (one per task and leaf; ``None`` for leaves that are not
        merged, e.g. integer leaves); ``None`` for methods without coefficients.
      losses: training loss per step (a NumPy float array; empty for closed-form merges).
      mask: a pytree of masks (Concrete merging), else ``None``.
      info: method-specific extras (Fisher matrices, Gram matrices, subspace ranks ...).

    References: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024).
    """

    params: Any
    coefficients: Any = None
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    mask: Any = None
    info: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Task vectors


@dataclasses.dataclass
class TaskVectors:
    """Flattened base + stacked task vectors of the mergeable (floating-point) leaves."""

    paths: list            # every leaf path of the base
    base_leaves: list      # every base leaf (original dtypes)
    treedef: Any
    idx: list              # indices (into leaves) of the mergeable leaves
    taus: list             # (T, *shape) float32 per mergeable leaf
    num_tasks: int

    @property
    def num_leaves(self) -> int:
        return len(self.idx)

    def consts(self):
        """Arrays passed to jitted steps as arguments (never baked in as constants)."""
        return {"base": [jnp.asarray(b) for b in self.base_leaves], "taus": list(self.taus)}

    def build(self, consts, deltas) -> Any:
        """``base + delta`` per mergeable leaf (float32 sum, cast to the base dtype) as a base-shaped tree."""
        leaves = list(consts["base"])
        for j, i in enumerate(self.idx):
            b = leaves[i]
            leaves[i] = (b.astype(jnp.float32) + deltas[j]).astype(b.dtype)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def combine(self, consts, lam) -> list:
        """Deltas ``sum_t lam[t, j] tau_t`` (``lam`` of shape (T,) or (T, L))."""
        out = []
        for j, tau in enumerate(consts["taus"]):
            c = lam if lam.ndim == 1 else lam[:, j]
            out.append(jnp.tensordot(c.astype(jnp.float32), tau, axes=1))
        return out

    def per_leaf_tree(self, values: Sequence[Any]) -> Any:
        """A base-shaped tree with ``values[j]`` at mergeable leaf j and None elsewhere."""
        leaves = [None] * len(self.base_leaves)
        for j, i in enumerate(self.idx):
            leaves[i] = values[j]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.inexact)


def task_vectors_from(base, models=None, task_vectors=None) -> TaskVectors:
    """Validate ``base`` with ``models`` (fine-tuned) or ``task_vectors`` and stack the task vectors."""
    if (models is None) == (task_vectors is None):
        raise MergeInputError("give exactly one of `models` (fine-tuned params) or `task_vectors`.")
    others = list(models if models is not None else task_vectors)
    if not others:
        raise MergeInputError("no models/task vectors given; pass at least one fine-tuned model.")
    check_compatible(base, others)
    paths, bleaves, treedef = leaves_with_paths(base)
    oleaves = [leaves_with_paths(m)[1] for m in others]
    idx, taus = [], []
    for i, b in enumerate(bleaves):
        if not _is_float(b):
            continue
        stack = jnp.stack([jnp.asarray(o[i], jnp.float32) for o in oleaves])
        if models is not None:
            stack = stack - jnp.asarray(b, jnp.float32)[None]
        idx.append(i)
        taus.append(stack)
    if not idx:
        raise MergeInputError("the base has no floating-point leaves to merge.")
    return TaskVectors(paths, bleaves, treedef, idx, taus, len(others))


# ----------------------------------------------------------------------------------------------
# Tasks: apply functions, batches, labels, losses


def as_apply_fns(apply_fn, num_tasks: int) -> list:
    if callable(apply_fn):
        return [apply_fn] * num_tasks
    fns = list(apply_fn)
    if len(fns) != num_tasks or not all(callable(f) for f in fns):
        raise MergeInputError(
            f"apply_fn must be a callable or a sequence of {num_tasks} callables (one per task); "
            f"got {len(fns)} items.")
    return fns


def _leading(tree, what: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise MergeInputError(f"{what} is empty (no arrays); give at least one example.")
    ns = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(ns) != 1 or -1 in ns:
        raise MergeInputError(
            f"{what}: every array needs the same leading example axis; got leading sizes {sorted(ns)}.")
    n = ns.pop()
    if n == 0:
        raise MergeInputError(f"{what} has 0 examples; give at least one example per task.")
    return n


def check_batches(batches, num_tasks: int, labels=None) -> tuple[list, list | None, list]:
    """Validate the per-task inputs (and labels); return lists and the example counts."""
    if batches is None:
        raise MergeInputError("`batches` is required: a sequence of per-task inputs.")
    batches = list(batches)
    if len(batches) != num_tasks:
        raise MergeInputError(
            f"got {len(batches)} batches for {num_tasks} tasks; give one input batch per task, in the "
            "order of the models.")
    sizes = [_leading(b, f"batch of task {t}") for t, b in enumerate(batches)]
    if labels is not None:
        labels = list(labels)
        if len(labels) != num_tasks:
            raise MergeInputError(f"got {len(labels)} label arrays for {num_tasks} tasks.")
        for t, (y, n) in enumerate(zip(labels, sizes)):
            if np.ndim(y) < 1 or np.shape(y)[0] != n:
                raise MergeInputError(
                    f"labels of task {t} have shape {np.shape(y)} but its batch has {n} examples.")
            if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
                raise MergeInputError(f"labels of task {t} must be integer class ids, got {jnp.asarray(y).dtype}.")
    return batches, labels, sizes


def check_logits(apply_fns, params, batches, sizes) -> None:
    """Abstractly evaluate each apply_fn and check it returns ``(N, ..., C)`` floating logits."""
    for t, (f, b, n) in enumerate(zip(apply_fns, batches, sizes)):
        try:
            out = jax.eval_shape(f, params, b)
        except MergeInputError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise MergeInputError(f"apply_fn of task {t} failed on its batch: {type(e).__name__}: {e}") from e
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise MergeInputError(
                f"apply_fn of task {t} returned {type(out).__name__}; it must return one logits array "
                "of shape (batch, ..., classes).")
        if len(out.shape) < 2 or not jnp.issubdtype(out.dtype, jnp.floating):
            raise MergeInputError(
                f"apply_fn of task {t} returned shape {out.shape} dtype {out.dtype}; expected floating "
                "logits of shape (batch, ..., classes) with at least 2 dimensions.")
        if out.shape[0] != n:
            raise MergeInputError(
                f"apply_fn of task {t} returned {out.shape[0]} rows for a batch of {n} examples; "
                "logits must keep the batch axis first.")


def entropy_loss(logits) -> jax.Array:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over all but the class axis."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def ce_loss(logits, labels) -> jax.Array:
    """Mean cross-entropy of integer ``labels``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def multitask_loss(apply_fns, params, data, loss: str) -> jax.Array:
    """Sum over tasks of the per-task loss; ``data`` = list of (inputs, labels or None).

    ``loss`` is ``"entropy"``, ``"ce"`` or a callable ``loss(logits, labels_or_None) -> scalar``.
    """
    total = 0.0
    for f, (x, y) in zip(apply_fns, data):
        logits = f(params, x)
        if callable(loss):
            total = total + loss(logits, y)
        else:
            total = total + (entropy_loss(logits) if loss == "entropy" else ce_loss(logits, y))
    return total


def check_loss_kind(loss, labels) -> None:
    if callable(loss):
        return
    if loss not in ("entropy", "ce"):
        raise MergeInputError(f"loss must be 'entropy', 'ce' or a callable(logits, labels), got {loss!r}.")
    if loss == "ce" and labels is None:
        raise MergeInputError("loss='ce' needs `labels` (one integer array per task).")


def prepare_task_inputs(apply_fn, base, models, task_vectors, batches, loss, labels):
    """Validate the inputs shared by the coefficient/mask learners.

    Returns ``(tv, apply_fns, batches, labels, sizes)``: task vectors, one apply function per task,
    the checked per-task batches (and labels when the loss uses them) and their sizes.
    """
    tv = task_vectors_from(base, models, task_vectors)
    fns = as_apply_fns(apply_fn, tv.num_tasks)
    check_loss_kind(loss, labels)
    batches, labels, sizes = check_batches(batches, tv.num_tasks, None if loss == "entropy" else labels)
    check_logits(fns, base, batches, sizes)
    return tv, fns, batches, labels, sizes


# ----------------------------------------------------------------------------------------------
# Minibatches and sharding


class Batcher:
    """Per-step minibatches: deterministic from ``seed`` (host-side NumPy gather), sharded on a mesh."""

    def __init__(self, batches, labels, sizes, batch_size, seed, mesh):
        self.batches, self.labels, self.sizes = batches, labels, sizes
        self.batch_size, self.seed, self.mesh = batch_size, seed, mesh
        if batch_size is not None and int(batch_size) < 1:
            raise MergeInputError(f"batch_size must be >= 1, got {batch_size}.")
        if mesh is not None:
            if "data" not in mesh.axis_names:
                raise MergeInputError(f"the mesh needs an axis named 'data'; it has {mesh.axis_names}.")
            d = mesh.shape["data"]
            for t, n in enumerate(sizes):
                m = n if batch_size is None else int(batch_size)
                if m % d:
                    raise MergeInputError(
                        f"task {t}: batch of {m} examples is not divisible by the {d} devices of the mesh "
                        "axis 'data'; choose batch_size a multiple of it.")
        self._whole = None

    def replicate(self, tree):
        if self.mesh is None:
            return tree
        s = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(tree, s)

    def _shard(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        s = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        return jax.device_put(tree, s)

    def get(self, step: int):
        if self.batch_size is None:
            if self._whole is None:
                ys = self.labels or [None] * len(self.batches)
                self._whole = [(self._shard(x), None if y is None else self._shard(y))
                               for x, y in zip(self.batches, ys)]
            return self._whole
        rng = np.random.default_rng([int(self.seed), int(step)])
        out = []
        for t, (x, n) in enumerate(zip(self.batches, self.sizes)):
            idx = rng.choice(n, int(self.batch_size), replace=n < int(self.batch_size))
            xb = jax.tree.map(lambda a: np.asarray(a)[idx], x)
            yb = None if self.labels is None else np.asarray(self.labels[t])[idx]
            out.append((self._shard(xb), None if yb is None else self._shard(yb)))
        return out


# ----------------------------------------------------------------------------------------------
# Projections of coefficients


def project_simplex(v: jax.Array, axis: int = 0) -> jax.Array:
    """Euclidean projection of ``v`` onto the probability simplex along ``axis`` (sort-based)."""
    v = jnp.moveaxis(v, axis, 0)
    n = v.shape[0]
    u = -jnp.sort(-v, axis=0)
    css = jnp.cumsum(u, axis=0) - 1.0
    k = jnp.arange(1, n + 1, dtype=v.dtype).reshape((n,) + (1,) * (v.ndim - 1))
    cond = u - css / k > 0
    rho = jnp.sum(cond, axis=0, keepdims=True)
    theta = jnp.take_along_axis(css, rho - 1, axis=0) / rho.astype(v.dtype)
    return jnp.moveaxis(jnp.maximum(v - theta, 0.0), 0, axis)


def coefficient_projection(clamp, simplex: bool) -> Callable:
    if simplex:
        return lambda lam: project_simplex(lam, axis=0)
    if clamp is None:
        return lambda lam: lam
    lo, hi = clamp
    lo = -jnp.inf if lo is None else float(lo)
    hi = jnp.inf if hi is None else float(hi)
    return lambda lam: jnp.clip(lam, lo, hi)


# ----------------------------------------------------------------------------------------------
# The trainer


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train(objective: Callable, variables, consts, batcher: Batcher, *, optimizer, steps: int,
          project: Callable | None = None, grad_transform: Callable | None = None,
          log_every: int = 0, name: str = "learned merge", seed: int = 0):
    """Minimise ``objective(variables, consts, data, key)`` with optax; one jitted step per iteration.

    Args:
      objective: scalar loss function.
      variables: pytree of trained float32 arrays.
      consts: pytree of fixed arrays (base, task vectors ...) passed as jit arguments.
      batcher: yields the per-step data.
      optimizer: optax GradientTransformation.
      steps: number of steps.
      project: ``project(variables, consts)`` applied after each update (clamp, simplex, subspace ...).
      grad_transform: applied to the gradient before the optimizer (e.g. a subspace projection).
      log_every: print the loss every this many steps (0: never).
      name: used in messages.
      seed: base of the per-step PRNG keys given to the objective.

    Returns:
      (variables, losses as a NumPy array).

    Raises:
      LearnedMergeError: if the loss, gradient or updated variables are not finite; names the step.
    """
    if int(steps) < 0:
        raise MergeInputError(f"steps must be >= 0, got {steps}.")
    project = project or (lambda v, c: v)
    grad_transform = grad_transform or (lambda g, c: g)

    @jax.jit
    def step(variables, opt_state, consts, data, key):
        loss, grads = jax.value_and_grad(objective)(variables, consts, data, key)
        grads = grad_transform(grads, consts)
        updates, new_opt = optimizer.update(grads, opt_state, variables)
        new_vars = project(optax.apply_updates(variables, updates), consts)
        ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_vars)
        return new_vars, new_opt, loss, ok

    variables = batcher.replicate(variables)
    consts = batcher.replicate(consts)
    opt_state = batcher.replicate(optimizer.init(variables))
    base_key = jax.random.key(seed)
    losses = []
    for s in range(int(steps)):
        data = batcher.get(s)
        key = jax.random.fold_in(base_key, s)
        new_vars, new_opt, loss, ok = step(variables, opt_state, consts, data, key)
        loss_v = float(loss)
        if not bool(ok):
            raise LearnedMergeError(
                f"{name}: the loss ({loss_v}) or its gradient became NaN/Inf at step {s}; training "
                "stopped and no parameters are returned. Check the inputs, lower the learning rate or "
                "the initial coefficients.")
        variables, opt_state = new_vars, new_opt
        losses.append(loss_v)
        if log_every and (s % int(log_every) == 0 or s == int(steps) - 1):
            print(f"[{name}] step {s}: loss {loss_v:.6f}")
    return variables, np.asarray(losses, np.float32)
