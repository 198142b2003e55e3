"""RegMean: merge linear layers by the closed-form solution of a joint regression on their inputs."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import MergeInputError, check_compatible, leaves_with_paths
from .common import LearnedMerge

__all__ = ["gram_matrices", "regmean_merge"]


def _accumulate(grams, counts, key, x):
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    g = x.T @ x
    grams[key] = grams[key] + g if key in grams else g
    counts[key] = counts.get(key, 0) + x.shape[0]


def gram_matrices(apply_fn: Callable[..., Any] | None, params: Any, batch: Any, *,
                  features_fn: Callable[[Any, Any], Mapping[str, Any]] | None = None,
                  kernel_name: str = "kernel") -> dict[str, jax.Array]:
    """Gram matrices ``G = X^T X / N`` of the inputs of every linear layer, keyed by kernel path.

    How the inputs ``X`` are found:

    * ``features_fn(params, batch) -> {kernel_path: X}`` when given (plain functions of dicts, Flax
      NNX models, anything): ``X`` is the input of the layer whose kernel is at ``kernel_path``
      (shape ``(..., in)``; all leading axes are rows).
    * Flax NNX: pass the model itself as ``params`` and ``apply_fn=None``; ``model(batch)`` is called
      while ``nnx.Linear.__call__`` is temporarily wrapped (process-wide, not thread-safe) to record the
      inputs of the model's own ``nnx.Linear`` layers; the key is the kernel's leaf path in
      ``nnx.split(model)[1]``, e.g. ``blocks.0.kernel.value``.
    * otherwise Flax linen: ``apply_fn`` is run under ``flax.linen.intercept_methods`` and the input of
      every ``nn.Dense.__call__`` is recorded; the key is ``"params." + module path + ".kernel"``
      (e.g. ``params.Dense_0.kernel``), the leaf path of that kernel in ``{"params": ...}`` variables.

    ``N`` counts rows (examples x positions); a layer called several times accumulates all calls.

    Args:
      apply_fn: ``apply_fn(params, batch)``.
      params: the model's params.
      batch: inputs.
      features_fn: optional explicit feature extractor.
      kernel_name: name of the kernel leaf appended to linen module paths.

    Returns:
      ``{kernel_path: G}`` with ``G`` of shape ``(in, in)`` float32.

    References: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023).
    """
    grams, counts = {}, {}
    if apply_fn is None and features_fn is None and _is_nnx_module(params):
        _nnx_linear_inputs(params, batch, grams, counts)
    elif features_fn is not None:
        feats = features_fn(params, batch)
        for k, x in feats.items():
            _accumulate(grams, counts, k, x)
    else:
        import flax.linen as nn

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                x = args[0] if args else kwargs["inputs"]
                path = ".".join(str(p) for p in context.module.path)
                _accumulate(grams, counts, f"params.{path}.{kernel_name}", x)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, batch)
        if not grams:
            raise MergeInputError(
                "gram_matrices found no flax.linen nn.Dense calls in apply_fn; for NNX models or plain "
                "functions pass features_fn(params, batch) -> {kernel_path: inputs}.")
    return {k: g / counts[k] for k, g in grams.items()}


def _is_nnx_module(x) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.Module)


def _nnx_linear_inputs(model, batch, grams, counts):
    from flax import nnx

    paths = {id(node): ".".join(str(k) for k in path) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Linear)}
    if not paths:
        raise MergeInputError("gram_matrices: the NNX model has no nnx.Linear layers; pass features_fn.")
    original = nnx.Linear.__call__

    def recording_call(self, inputs, *args, **kwargs):
        if id(self) in paths:
            _accumulate(grams, counts, f"{paths[id(self)]}.kernel.value", inputs)
        return original(self, inputs, *args, **kwargs)

    nnx.Linear.__call__ = recording_call
    try:
        model(batch)
    finally:
        nnx.Linear.__call__ = original


def regmean_merge(models: Sequence[Any], grams: Sequence[Mapping[str, Any]], *, alpha: float = 0.95,
                  weights: Sequence[float] | np.ndarray | None = None, reduce_nonlinear: str = "mean") -> LearnedMerge:
    """RegMean: ``W* = (sum_t G~_t)^-1 sum_t G~_t W_t`` per linear layer; other parameters averaged.

    ``G~ = alpha G + (1 - alpha) diag(G)`` (off-diagonal entries scaled by ``alpha``). A kernel at path
    ``p`` is merged by RegMean when every ``grams[t]`` has ``p``; the kernel is used as ``(in, out)``
    (Flax ``Dense`` layout, ``y = x W``): its first axis must equal the Gram size ``in`` and any further
    axes are flattened into ``out``. (For PyTorch ``(out, in)`` weights, transpose first.) All other
    floating leaves are averaged (weighted by ``weights`` if given).

    Args:
      models: T fine-tuned params pytrees.
      grams: T dicts ``{kernel_path: G (in, in)}`` from :func:`gram_matrices`.
      alpha: off-diagonal scaling in [0, 1].
      weights: optional per-model weights for the averaged leaves.
      reduce_nonlinear: only ``"mean"``.

    Returns:
      :class:`LearnedMerge` with ``params`` and ``info["regmean_paths"]``.

    References: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023).
    """
    models = list(models)
    grams = list(grams)
    if not models:
        raise MergeInputError("regmean_merge needs at least one model.")
    if len(grams) != len(models):
        raise MergeInputError(f"got {len(grams)} Gram dicts for {len(models)} models; give one per model.")
    if reduce_nonlinear != "mean":
        raise MergeInputError("reduce_nonlinear must be 'mean'.")
    check_compatible(models[0], models[1:])
    T = len(models)
    w = np.ones((T,), np.float32) if weights is None else np.broadcast_to(np.asarray(weights, np.float32), (T,))
    paths, leaves0, treedef = leaves_with_paths(models[0])
    mleaves = [leaves_with_paths(m)[1] for m in models]
    unknown = set().union(*[set(g) for g in grams]) - set(paths)
    if unknown:
        raise MergeInputError(
            f"Gram keys {sorted(unknown)[:5]} are not leaf paths of the models (paths look like "
            f"{paths[:3]}); key each Gram matrix by its kernel's leaf path.")
    out, merged_paths = [], []
    for i, (p, x0) in enumerate(zip(paths, leaves0)):
        dt = jnp.asarray(x0).dtype
        if not jnp.issubdtype(dt, jnp.inexact):
            out.append(x0)
            continue
        xs = [jnp.asarray(m[i], jnp.float32) for m in mleaves]
        if all(p in g for g in grams):
            shape = np.shape(x0)
            n_in = np.shape(grams[0][p])[0]
            if len(shape) < 2 or shape[0] != n_in:
                raise MergeInputError(
                    f"leaf '{p}': kernel of shape {shape} does not match its Gram matrix of size "
                    f"{n_in}x{n_in}; the kernel must be (in, out) with in = {n_in}.")
            lhs, rhs = 0.0, 0.0
            for g, x in zip(grams, xs):
                g = jnp.asarray(g[p], jnp.float32)
                if g.shape != (n_in, n_in):
                    raise MergeInputError(f"leaf '{p}': Gram matrices have different shapes {g.shape}.")
                gt = alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g))
                lhs = lhs + gt
                rhs = rhs + gt @ x.reshape(n_in, -1)
            sol = jnp.linalg.solve(lhs, rhs)
            out.append(sol.reshape(shape).astype(dt))
            merged_paths.append(p)
        else:
            avg = sum(wt * x for wt, x in zip(w, xs)) / float(np.sum(w))
            out.append(avg.astype(dt))
    return LearnedMerge(params=jax.tree_util.tree_unflatten(treedef, out), info={"regmean_paths": merged_paths})
