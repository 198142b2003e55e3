"""Fisher merging: parameter-wise averaging weighted by the diagonal Fisher information."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import MergeInputError, check_compatible, leaves_with_paths
from .common import LearnedMerge, as_apply_fns, check_batches, check_logits

__all__ = ["fisher_information", "fisher_merge"]


def _split_float(params):
    paths, leaves, treedef = leaves_with_paths(params)
    idx = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return leaves, treedef, idx


@functools.partial(jax.jit, static_argnames=("apply_fn", "treedef", "idx", "sample", "chunk_size"))
def _fisher_diag(apply_fn, treedef, idx, sample, chunk_size, leaves, xs, ys, key):
    leaves = list(leaves)
    n = jax.tree.leaves(xs)[0].shape[0]

    def logp(fl, x, y):
        full = list(leaves)
        for j, i in enumerate(idx):
            full[i] = fl[j]
        params = jax.tree_util.tree_unflatten(treedef, full)
        logits = apply_fn(params, jax.tree.map(lambda a: a[None], x))[0].astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(jnp.take_along_axis(lp, y[..., None], axis=-1))

    fl = [leaves[i] for i in idx]

    def per_example(args):
        x, y, k = args
        if sample:  # true Fisher: y ~ p(y|x) from the model's predictive distribution
            full = list(leaves)
            logits = apply_fn(jax.tree_util.tree_unflatten(treedef, full), jax.tree.map(lambda a: a[None], x))[0]
            y = jax.random.categorical(k, jax.lax.stop_gradient(logits.astype(jnp.float32)), axis=-1)
        g = jax.grad(logp)(fl, x, y)
        return [jnp.square(gi.astype(jnp.float32)) for gi in g]

    keys = jax.random.split(key, n)
    sq = jax.lax.map(per_example, (xs, ys, keys), batch_size=chunk_size)
    return [jnp.mean(s, axis=0) for s in sq]


def fisher_information(apply_fn: Callable[..., Any], params: Any, batch: Any, *,
                       labels: np.ndarray | jax.Array | None = None, n_examples: int = 256, seed: int = 0,
                       chunk_size: int = 32) -> Any:
    """Diagonal Fisher ``F = E_x[(d/dtheta log p(y|x, theta))^2]`` of every floating-point leaf.

    Per-example gradients use ``jax.grad`` of the log-likelihood of one example (``apply_fn`` is called
    on a batch of one), mapped over examples in chunks of ``chunk_size`` (``jax.lax.map``). With
    ``labels`` this is the empirical Fisher; without, ``y`` is sampled from the model's predictive
    distribution ``softmax(apply_fn(params, x))`` (the "true" Fisher, one sample per example). For
    logits with extra axes (e.g. tokens) the log-probabilities of all positions are summed.

    Args:
      apply_fn: ``apply_fn(params, batch) -> logits (N, ..., C)``.
      params: params pytree.
      batch: inputs with a leading example axis; the first ``n_examples`` are used.
      labels: optional integer labels (``(N,)`` or logits' shape without the class axis).
      n_examples: number of examples.
      seed: sampling seed (true Fisher).
      chunk_size: examples per vectorised chunk.

    Returns:
      a pytree like ``params`` with float32 Fisher values (None for non-float leaves).

    References: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022).
    """
    leaves, treedef, idx = _split_float(params)
    n = min(int(n_examples), int(np.shape(jax.tree.leaves(batch)[0])[0]))
    if n < 1:
        raise MergeInputError("fisher_information needs at least one example (n_examples >= 1, non-empty batch).")
    xs = jax.tree.map(lambda a: jnp.asarray(a)[:n], batch)
    out = jax.eval_shape(apply_fn, params, jax.tree.map(lambda a: a[:1], xs))
    if labels is None:
        ys = jnp.zeros((n,) + tuple(out.shape[1:-1]), jnp.int32)
    else:
        ys = jnp.asarray(labels)[:n].astype(jnp.int32)
    f = _fisher_diag(apply_fn, treedef, tuple(idx), labels is None, int(min(chunk_size, n)),
                     [jnp.asarray(x) for x in leaves], xs, ys, jax.random.key(seed))
    full = [None] * len(leaves)
    for j, i in enumerate(idx):
        full[i] = f[j]
    return jax.tree_util.tree_unflatten(treedef, full)


def fisher_merge(apply_fn: Callable[..., Any] | Sequence[Callable[..., Any]], models: Sequence[Any],
                 batches: Sequence[Any] | None = None, *, fisher_floor: float = 1e-6, n_examples: int = 256,
                 labels: Sequence[Any] | None = None, weights: Sequence[float] | np.ndarray | None = None,
                 fishers: Sequence[Any] | None = None, seed: int = 0, chunk_size: int = 32) -> LearnedMerge:
    """Fisher-weighted averaging: ``theta = sum_t w_t F_t theta_t / sum_t w_t F_t`` per parameter.

    ``F_t`` is the diagonal Fisher of model t on its own task's ``batches[t]`` (see
    :func:`fisher_information`) plus ``fisher_floor`` (so parameters without Fisher mass fall back to a
    plain weighted average). Non-float leaves are taken from the first model. Output dtypes are the
    first model's.

    Args:
      apply_fn: a callable or T callables ``(params, batch) -> logits``.
      models: T fine-tuned params pytrees (same structure).
      batches: T per-task inputs (not needed when ``fishers`` are given).
      fisher_floor: added to every Fisher value.
      n_examples: examples per task for the Fisher estimate.
      labels: optional T label arrays (empirical Fisher); None samples ``y`` from the model.
      weights: optional per-model weights ``w_t`` (default 1).
      fishers: precomputed Fisher pytrees (skip the estimate).
      seed: sampling seed.
      chunk_size: examples per vectorised chunk.

    Returns:
      :class:`LearnedMerge` with ``params`` and ``info["fishers"]``.

    References: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022).
    """
    models = list(models)
    if not models:
        raise MergeInputError("fisher_merge needs at least one model.")
    check_compatible(models[0], models[1:])
    T = len(models)
    if fishers is None:
        fns = as_apply_fns(apply_fn, T)
        batches, labels, sizes = check_batches(batches, T, labels)
        check_logits(fns, models[0], [jax.tree.map(lambda a: a[:1], b) for b in batches], [1] * T)
        fishers = [fisher_information(f, m, b, labels=None if labels is None else labels[t],
                                      n_examples=n_examples, seed=seed + t, chunk_size=chunk_size)
                   for t, (f, m, b) in enumerate(zip(fns, models, batches))]
    elif len(fishers) != T:
        raise MergeInputError(f"got {len(fishers)} Fisher pytrees for {T} models.")
    w = np.ones((T,), np.float32) if weights is None else np.broadcast_to(np.asarray(weights, np.float32), (T,))
    paths, leaves0, treedef = leaves_with_paths(models[0])
    mleaves = [leaves_with_paths(m)[1] for m in models]
    fleaves = [jax.tree_util.tree_flatten(f, is_leaf=lambda x: x is None)[0] for f in fishers]
    out = []
    for i, (p, x0) in enumerate(zip(paths, leaves0)):
        if not jnp.issubdtype(jnp.asarray(x0).dtype, jnp.inexact):
            out.append(x0)
            continue
        num = 0.0
        den = 0.0
        for t in range(T):
            f = fleaves[t][i]
            if f is None or np.shape(f) != np.shape(x0):
                raise MergeInputError(f"leaf '{p}': Fisher of model {t} has shape {np.shape(f)}, "
                                      f"expected {np.shape(x0)}.")
            f = w[t] * (jnp.asarray(f, jnp.float32) + fisher_floor)
            num = num + f * jnp.asarray(mleaves[t][i], jnp.float32)
            den = den + f
        out.append((num / den).astype(jnp.asarray(x0).dtype))
    return LearnedMerge(params=jax.tree_util.tree_unflatten(treedef, out), info={"fishers": fishers})
