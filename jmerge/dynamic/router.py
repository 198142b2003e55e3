"""Routers over tasks for dynamic merging: shared by Twin-Merging, SMILE, WEMoE and LoRA experts.

Stable API (other modules of :mod:`jmerge.dynamic` import only these names)::

    check_num_tasks(num_tasks, where) -> int             # >= 1, else MergeInputError
    init_router(key, in_features, num_tasks, hidden=(64,)) -> RouterParams
    router_logits(params, features) -> (N, T)            # jittable, differentiable
    softmax_weights(logits, temperature=1.0) -> (N, T)   # temperature may be traced
    top_k_weights(logits, k) -> (N, T)                   # softmax, keep top-k, renormalise (SMILE/Mixtral)
    one_hot_weights(task, num_tasks, n=None) -> (T,) or (n, T)
    train_router(features, labels, num_tasks, ...) -> RouterFit(params, losses, train_accuracy, val_accuracy)

A router is a small MLP (``hidden`` widths, leaky-ReLU, then a linear layer to ``T`` logits) on
input features the caller computes (e.g. the shared model's pooled features, as in Twin-Merging,
where the router is an MLP on the shared model's mean-pooled last hidden state). Its parameters
are a plain pytree ``{"mean", "std", "layers": [{"w", "b"}, ...]}``: features are standardised with
the training set's mean and standard deviation, which are stored in the parameters.
``train_router`` fits it by cross-entropy against the task each input came from (the paper's
validation split), with optax Adam; the whole loop is one jitted ``lax.scan``. Departures from the
authors' router: no batch norm and no dropout (small routers on small feature sets do not need them).

References: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
(NeurIPS 2024), Sec. 3.2 (router trained on a validation split) and the authors' code (MLP router on
mean-pooled hidden states); Tang et al., "SMILE" (2024) and Jiang et al., "Mixtral of Experts" (2024)
for top-k routing with renormalised weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core.errors import MergeInputError

__all__ = ["check_num_tasks", "init_router", "router_logits", "softmax_weights", "top_k_weights",
           "one_hot_weights", "train_router", "RouterFit"]

RouterParams = Any  # {"mean": (F,), "std": (F,), "layers": [{"w": (in, out), "b": (out,)}, ...]}


def check_num_tasks(num_tasks: Any, where: str = "router") -> int:
    """``num_tasks`` as an int, refusing a router with no tasks.

    Raises:
      MergeInputError: ``num_tasks`` is not a positive integer (names ``where``).

    References: none (infrastructure).
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or int(num_tasks) < 1:
        raise MergeInputError(f"{where}: a router needs at least one task, got num_tasks={num_tasks!r}; "
                              "give one fine-tuned model (or expert) per task.")
    return int(num_tasks)


def init_router(key: jax.Array, in_features: int, num_tasks: int, hidden: Sequence[int] = (64,)) -> RouterParams:
    """Initial router parameters: an MLP ``in_features -> *hidden -> num_tasks`` (LeCun-normal weights,
    zero biases; the last layer starts at zero, so every task starts equally likely).

    Args:
      key: PRNG key.
      in_features: feature width ``F``.
      num_tasks: number of tasks ``T`` (>= 1).
      hidden: hidden widths (``()``: a linear router).

    References: Lu et al., "Twin-Merging" (NeurIPS 2024): an MLP router on the shared model's features.
    """
    T = check_num_tasks(num_tasks)
    if int(in_features) < 1:
        raise MergeInputError(f"router: features must have at least one column, got in_features={in_features}.")
    widths = [int(in_features), *(int(h) for h in hidden), T]
    keys = jax.random.split(key, len(widths) - 1)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        w = jnp.zeros((a, b), jnp.float32) if last else jax.random.normal(keys[i], (a, b), jnp.float32) / np.sqrt(a)
        layers.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
    return {"mean": jnp.zeros((widths[0],), jnp.float32), "std": jnp.ones((widths[0],), jnp.float32),
            "layers": layers}


def router_logits(params: RouterParams, features: Float[Array, "n f"]) -> Float[Array, "n t"]:
    """Task logits ``(N, T)`` of features ``(N, F)`` (jittable, differentiable).

    References: Lu et al., "Twin-Merging" (NeurIPS 2024).
    """
    h = (jnp.asarray(features, jnp.float32) - params["mean"]) / params["std"]
    layers = params["layers"]
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jax.nn.leaky_relu(h)
    return h


def softmax_weights(logits: Float[Array, "*n t"], temperature: float | jax.Array = 1.0) -> Float[Array, "*n t"]:
    """Routing weights ``softmax(logits / temperature)`` over the task axis (temperature may be traced).

    References: Lu et al., "Twin-Merging" (NeurIPS 2024): weights are the router's softmax.
    """
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def top_k_weights(logits: Float[Array, "*n t"], k: int) -> Float[Array, "*n t"]:
    """Dense routing weights: softmax over tasks, the ``k`` largest kept and renormalised to sum 1,
    the rest zero (ties at the k-th value: the lower task index wins, as ``lax.top_k``).

    References: Tang et al., "SMILE" (2024); Jiang et al., "Mixtral of Experts" (2024).
    """
    p = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    T = p.shape[-1]
    k = int(k)
    if not 1 <= k <= T:
        raise MergeInputError(f"router: top_k must be in [1, {T}] (the number of experts), got {k}.")
    vals, idx = jax.lax.top_k(p, k)
    vals = vals / jnp.sum(vals, axis=-1, keepdims=True)
    return jnp.sum(jax.nn.one_hot(idx, T, dtype=p.dtype) * vals[..., None], axis=-2)


def one_hot_weights(task: int | jax.Array, num_tasks: int, n: int | None = None) -> jax.Array:
    """Weights that route everything to ``task``: ``(T,)``, or ``(n, T)`` when ``n`` is given.

    References: none (infrastructure).
    """
    T = check_num_tasks(num_tasks)
    w = jax.nn.one_hot(task, T, dtype=jnp.float32)
    return w if n is None else jnp.broadcast_to(w, (int(n), T))


@dataclasses.dataclass(frozen=True)
class RouterFit:
    """Result of :func:`train_router`: parameters, the loss per step and the accuracies (fraction of
    inputs whose arg-max task is right) on the training and (if given) validation features.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024).
    """

    params: RouterParams
    losses: np.ndarray
    train_accuracy: float
    val_accuracy: float | None = None


def _xent(params, x, y):
    lg = router_logits(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], axis=1))


def _accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(router_logits(params, x), axis=-1) == y))


def train_router(features: Float[Array, "n f"], labels: Any, num_tasks: int, *, hidden: Sequence[int] = (64,),
                 steps: int = 300, lr: float = 1e-2, batch_size: int | None = 256, weight_decay: float = 1e-4,
                 seed: int = 0, val_features: Any = None, val_labels: Any = None) -> RouterFit:
    """Fit a router to predict which task each input came from (cross-entropy, AdamW).

    Args:
      features: ``(N, F)`` features of the training inputs (e.g. the shared model's pooled features of a
        validation split, as in the paper).
      labels: ``(N,)`` integer task index of each input, in ``[0, num_tasks)``.
      num_tasks: number of tasks ``T`` (>= 1).
      hidden: hidden widths of the MLP (``()`` for a linear router).
      steps: optimisation steps; lr, weight_decay: AdamW's.
      batch_size: minibatch size (sampled with replacement per step); None: full batch.
      seed: initialisation and sampling seed.
      val_features, val_labels: optional held-out inputs for ``val_accuracy``.

    Returns:
      :class:`RouterFit`.

    Raises:
      MergeInputError: no tasks, empty or mis-shaped features, labels outside ``[0, num_tasks)``.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024): the router is trained on a validation split to
    classify the task of each input; Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019).
    """
    import optax  # noqa: PLC0415 - optional at import time of jmerge.dynamic

    T = check_num_tasks(num_tasks, "train_router")
    x = jnp.asarray(features, jnp.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0:
        raise MergeInputError(f"train_router: features must be (N, F) with N >= 1, got shape {tuple(x.shape)}.")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise MergeInputError(f"train_router: labels must be {x.shape[0]} integer task indices, got shape {y.shape} "
                              f"dtype {y.dtype}.")
    if y.min() < 0 or y.max() >= T:
        raise MergeInputError(f"train_router: labels must lie in [0, {T}), got [{y.min()}, {y.max()}].")
    y = jnp.asarray(y, jnp.int32)
    k_init, k_steps = jax.random.split(jax.random.key(seed))
    params = init_router(k_init, x.shape[1], T, hidden)
    mean = jnp.mean(x, axis=0)
    std = jnp.std(x, axis=0) + 1e-6
    params = {**params, "mean": mean, "std": std}
    opt = optax.adamw(lr, weight_decay=weight_decay)
    n = x.shape[0]
    bs = n if batch_size is None else min(int(batch_size), n)

    def step(carry, key):
        p, s = carry
        idx = jax.random.randint(key, (bs,), 0, n) if bs < n else jnp.arange(n)
        trainable = {"layers": p["layers"]}
        loss, g = jax.value_and_grad(lambda q: _xent({**p, **q}, x[idx], y[idx]))(trainable)
        upd, s = opt.update(g, s, trainable)
        q = optax.apply_updates(trainable, upd)
        return ({**p, **q}, s), loss

    @jax.jit
    def run(p, key):
        s = opt.init({"layers": p["layers"]})
        (p, _), losses = jax.lax.scan(step, (p, s), jax.random.split(key, int(steps)))
        return p, losses

    params, losses = run(params, k_steps)
    val = None
    if val_features is not None:
        val = _accuracy(params, jnp.asarray(val_features, jnp.float32), jnp.asarray(val_labels, jnp.int32))
    return RouterFit(params=params, losses=np.asarray(losses), train_accuracy=_accuracy(params, x, y),
                     val_accuracy=val)
