"""SMILE: zero-shot sparse mixture of low-rank experts built from fine-tuned linear layers.

For each linear layer (a matrix leaf read as fan-in x fan-out, ``y = x K + b`` in Flax's layout) and each
task ``t``, the update ``ΔK_t = K_t − K_0`` is factored by SVD, ``ΔK_t = A_t Σ_t B_tᵀ`` (``A_t`` spans the
layer's *input* space: the right singular vectors ``V`` of the torch-layout ``ΔW_t = ΔK_tᵀ``):

* **expert** ``t``: the rank-``k`` part ``x ↦ x A_{t,:k} Σ_{t,:k} B_{t,:k}ᵀ + (b_t − b_0)``;
* **router** (no training): ``logit_t(x) = ‖A_{t,:gate_k}ᵀ x‖₂``, how much of ``x`` lies in the subspace
  the task's fine-tuning changed; weights = softmax over tasks, the ``top_k`` largest kept and renormalised
  to sum 1 (with one task the weight is 1);
* **output** ``y = x K_0 + b_0 + Σ_{t ∈ top-k} w_t(x) · expert_t(x)``, per token.

This follows the paper and FusionBench's ``SmileMoELinear`` (``routing_use_diff=True``): gate vectors are
the unscaled singular vectors, experts include the bias difference. Leaves that are not linear layers
keep the base's values (``others="base"``, FusionBench's default) or the models' average
(``others="average"``, its ``average_experts``). All experts are computed densely and weighted (zeros
outside the top-k): exact, simple and jittable for the handful of tasks of a merge.

Use inside a Flax linen ``apply``: :func:`smile_apply` runs ``apply_fn(smile.params, ...)`` under a method
interceptor that replaces every ``nn.Dense``/``nn.DenseGeneral`` call whose kernel has a SMILE layer
(also the attention projections of ``nn.MultiHeadDotProductAttention``); it refuses to return if a SMILE
layer was never called (e.g. a conv kernel), so no layer silently runs without its experts. For NNX or
hand-written models call :func:`smile_linear` on a layer directly.

References: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
Pre-Trained Foundation Models" (arXiv 2408.10174, 2024); FusionBench (Tang et al., 2024),
``fusion_bench/models/smile_moe``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import MergeInputError
from ..core.tree import check_compatible, leaves_with_paths
from ..core.views import infer_views, leaf_name
from .router import check_num_tasks, top_k_weights
from .twin import resolve_rank

__all__ = ["SmileLinear", "SmileModel", "smile_upscale", "smile_linear", "smile_apply", "smile_routing",
           "smile_storage"]


@jax.tree_util.register_pytree_node_class
class SmileLinear:
    """One linear layer as a SMILE mixture (a pytree).

    Attributes:
      kernel: ``(m, n)`` base matrix (fan-in x fan-out); bias: ``(n,)`` base bias or None.
      gate: ``(T, m, gate_k)`` input-space singular vectors ``A_{t,:gate_k}``.
      down: ``(T, m, k)`` ``A_{t,:k} Σ_{t,:k}``; up: ``(T, k, n)`` ``B_{t,:k}ᵀ``.
      bias_delta: ``(T, n)`` ``b_t − b_0`` or None.
      path, in_shape, out_shape, top_k (static): the kernel's leaf path, its fan-in and fan-out dims, experts per input.

    References: Tang et al., "SMILE" (2024).
    """

    def __init__(self, kernel, bias, gate, down, up, bias_delta, path, in_shape, out_shape, top_k):
        self.kernel, self.bias, self.gate = kernel, bias, gate
        self.down, self.up, self.bias_delta = down, up, bias_delta
        self.path, self.in_shape, self.out_shape, self.top_k = path, tuple(in_shape), tuple(out_shape), int(top_k)

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])

    def tree_flatten(self):
        return ((self.kernel, self.bias, self.gate, self.down, self.up, self.bias_delta),
                (self.path, self.in_shape, self.out_shape, self.top_k))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


@jax.tree_util.register_pytree_node_class
class SmileModel:
    """A SMILE-upscaled model: ``params`` (the base's tree; non-linear leaves per ``others``) and
    ``layers`` ``{kernel path: SmileLinear}`` (a pytree).

    References: Tang et al., "SMILE" (2024).
    """

    def __init__(self, params, layers, num_tasks):
        self.params, self.layers, self.num_tasks = params, dict(layers), int(num_tasks)

    def tree_flatten(self):
        keys = tuple(sorted(self.layers))
        return (self.params, [self.layers[k] for k in keys]), (keys, self.num_tasks)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, T = aux
        return cls(children[0], dict(zip(keys, children[1])), T)

    def storage(self) -> dict:
        """Entries stored against ``T`` full models (see :func:`smile_storage`).

        References: Tang et al., "SMILE" (2024), Sec. 5 (parameter counts).
        """
        return smile_storage(self)


def _is_linear_kernel(path: str, shape: tuple, view) -> bool:
    parent, name = leaf_name(path)
    if name != "kernel" or view is None or view.batch:
        return False
    a = len(view.fan_in)
    if view.fan_in != tuple(range(a)) or view.fan_out != tuple(range(a, len(shape))):
        return False
    last = parent.split(".")[-1].lower() if parent else ""
    return not (len(shape) >= 3 and ("conv" in last or len(shape) == 4))


def _select(layers, path: str) -> bool:
    if layers is None:
        return True
    if isinstance(layers, str):
        return re.search(layers, path) is not None
    if callable(layers):
        return bool(layers(path))
    return path in set(layers)


def smile_upscale(base: Any, models: Sequence[Any], *, k: Any = "full", gate_k: Any = 16, top_k: int = 1,
                  layers: Any = None, others: Literal["base", "average"] = "base", views: Any = None,
                  clamp_rank: bool = False) -> SmileModel:
    """Build SMILE experts and routers for every linear layer of a Flax params tree.

    Args:
      base: base (pretrained) params pytree.
      models: ``T >= 1`` fine-tuned params pytrees with the base's structure.
      k: expert rank per layer: an int, ``"full"`` (experts are the exact updates), ``{path: rank}`` or
        ``f(path, (1, fan_in, fan_out)) -> rank``.
      gate_k: router rank per layer (same forms as ``k``).
      top_k: experts per input (1 <= top_k <= T).
      layers: which linear kernels get experts: None (every ``Dense``/``DenseGeneral``-style kernel: a leaf
        named ``kernel`` with a fan-in x fan-out view over leading/trailing axes, conv kernels excluded), a
        regex searched in the path, a collection of paths or a predicate ``f(path) -> bool``.
      others: non-linear leaves (and linear ones left out): ``"base"`` or ``"average"`` of the models.
      views: overrides of the inferred matrix views.
      clamp_rank: lower a too-large ``k``/``gate_k`` to the matrix's full rank instead of refusing it.

    Returns:
      :class:`SmileModel`.

    Raises:
      MergeInputError: no models, a tree that differs from the base's (naming the leaf), a rank larger
        than a layer allows (naming the leaf), a bad ``top_k`` or ``others``.

    References: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
    Pre-Trained Foundation Models" (2024); FusionBench's ``SmileMoELinear``.
    """
    models = list(models)
    T = check_num_tasks(len(models), "smile_upscale")
    check_compatible(base, models)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= int(top_k) <= T:
        raise MergeInputError(f"smile_upscale: top_k must be an integer in [1, {T}] (the number of models), "
                              f"got {top_k!r}.")
    if others not in ("base", "average"):
        raise MergeInputError(f"smile_upscale: others must be 'base' or 'average', got {others!r}.")
    paths, base_leaves, treedef = leaves_with_paths(base)
    model_leaves = [leaves_with_paths(m)[1] for m in models]
    index = {p: i for i, p in enumerate(paths)}
    shapes = [tuple(int(d) for d in np.shape(x)) for x in base_leaves]
    leaf_views = infer_views(paths, shapes, views)
    out_leaves = list(base_leaves)
    spec: dict[str, SmileLinear] = {}
    for i, (path, shape, view) in enumerate(zip(paths, shapes, leaf_views)):
        floating = jnp.issubdtype(jnp.asarray(base_leaves[i]).dtype, jnp.floating)
        if not floating:
            continue
        if not (_is_linear_kernel(path, shape, view) and _select(layers, path)):
            if others == "average":
                out_leaves[i] = (sum(jnp.asarray(ml[i], jnp.float32) for ml in model_leaves) / T).astype(
                    jnp.asarray(base_leaves[i]).dtype)
            continue
        _, m, n = view.matrix_shape(shape)
        kk = resolve_rank(k, path, (1, m, n), where="smile_upscale (k)", clamp=clamp_rank)
        gk = resolve_rank(gate_k, path, (1, m, n), where="smile_upscale (gate_k)", clamp=clamp_rank)
        k0 = jnp.asarray(base_leaves[i], jnp.float32).reshape(m, n)
        dk = jnp.stack([jnp.asarray(ml[i], jnp.float32).reshape(m, n) for ml in model_leaves]) - k0
        a, s, bt = jnp.linalg.svd(dk, full_matrices=False)  # (T, m, r), (T, r), (T, r, n)
        parent = leaf_name(path)[0]
        bias_path = (parent + "." if parent else "") + "bias"
        if path.endswith(".value") or path.endswith(".raw_value"):
            bias_path = bias_path + path[path.rindex("."):]
        j = index.get(bias_path)
        bias = bias_delta = None
        if j is not None and int(np.size(base_leaves[j])) == n:
            b0 = jnp.asarray(base_leaves[j], jnp.float32).reshape(n)
            bias = b0
            bias_delta = jnp.stack([jnp.asarray(ml[j], jnp.float32).reshape(n) for ml in model_leaves]) - b0
        spec[path] = SmileLinear(k0, bias, a[..., :gk], a[..., :kk] * s[:, None, :kk], bt[:, :kk, :], bias_delta,
                                 path, shape[:len(view.fan_in)], shape[len(view.fan_in):], int(top_k))
    return SmileModel(treedef.unflatten(out_leaves), spec, T)


def smile_routing(layer: SmileLinear, x: jax.Array) -> jax.Array:
    """Zero-shot routing weights ``(N, T)`` of inputs ``x`` ``(..., *in_shape)`` flattened to ``N`` rows:
    softmax of ``‖A_{t,:gate_k}ᵀ x‖``, top-k kept and renormalised (all ones with one expert).

    References: Tang et al., "SMILE" (2024), Sec. 4 (routing by the experts' singular subspaces).
    """
    m = int(np.prod(layer.in_shape))
    xm = jnp.asarray(x, jnp.float32).reshape(-1, m)
    if layer.num_experts == 1:
        return jnp.ones((xm.shape[0], 1), jnp.float32)
    logits = jnp.linalg.norm(jnp.einsum("nm,tmg->ntg", xm, layer.gate), axis=-1)
    return top_k_weights(logits, layer.top_k)


def smile_linear(layer: SmileLinear, x: jax.Array, routing: Any = None) -> jax.Array:
    """The SMILE layer's output for ``x`` ``(..., *in_shape)`` -> ``(..., *out_shape)`` (jittable).

    Args:
      layer: a :class:`SmileLinear`.
      x: inputs; the trailing axes are the layer's fan-in.
      routing: None (zero-shot routing), an int task index (every input to that expert, weight 1), or
        weights ``(T,)`` / ``(N, T)`` over experts (N = inputs flattened over the leading axes).

    References: Tang et al., "SMILE" (2024); FusionBench's ``SmileMoELinear.forward``.
    """
    x = jnp.asarray(x)
    nin = len(layer.in_shape)
    if tuple(x.shape[x.ndim - nin:]) != layer.in_shape:
        raise MergeInputError(f"smile_linear: layer '{layer.path}' takes inputs ending in {layer.in_shape}, "
                              f"got shape {tuple(x.shape)}.")
    lead = x.shape[:x.ndim - nin]
    m = int(np.prod(layer.in_shape))
    xm = x.astype(jnp.float32).reshape(-1, m)
    T = layer.num_experts
    if routing is None:
        w = smile_routing(layer, xm)
    elif isinstance(routing, (int, np.integer)):
        if not 0 <= int(routing) < T:
            raise MergeInputError(f"smile_linear: layer '{layer.path}' has {T} experts; routing={routing} "
                                  "is out of range.")
        w = jnp.broadcast_to(jax.nn.one_hot(int(routing), T, dtype=jnp.float32), (xm.shape[0], T))
    else:
        w = jnp.broadcast_to(jnp.asarray(routing, jnp.float32), (xm.shape[0], T))
    y = xm @ layer.kernel
    if layer.bias is not None:
        y = y + layer.bias
    e = jnp.einsum("ntk,tko->nto", jnp.einsum("nm,tmk->ntk", xm, layer.down), layer.up)
    if layer.bias_delta is not None:
        e = e + layer.bias_delta[None]
    y = y + jnp.einsum("nt,nto->no", w, e)
    return y.reshape(lead + layer.out_shape).astype(jnp.result_type(x.dtype, layer.kernel.dtype))


def _trailing_axes_ok(module, nin: int, ndim: int) -> bool:
    axis = getattr(module, "axis", -1)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if tuple(getattr(module, "batch_dims", ()) or ()):
        return False
    return [a % ndim for a in axes] == list(range(ndim - nin, ndim))


def smile_apply(apply_fn: Callable[..., Any], smile: SmileModel, *args: Any, routing: Any = None,
                **kwargs: Any) -> Any:
    """Run ``apply_fn(smile.params, *args, **kwargs)`` (a Flax linen apply) with SMILE layers (jittable).

    Every ``nn.Dense`` / ``nn.DenseGeneral`` call whose kernel path (``module path + ".kernel"``, with or
    without a leading ``params``) has a SMILE layer runs :func:`smile_linear` instead, with ``routing``
    (None: zero-shot; an int: forced to that expert; weights).

    Raises:
      MergeInputError: a SMILE layer was never called through ``Dense``/``DenseGeneral`` (naming its path), or a
        ``DenseGeneral`` contracts axes other than the trailing fan-in axes.

    References: Tang et al., "SMILE" (2024).
    """
    import flax.linen as nn  # noqa: PLC0415 - flax is needed only here

    used: set[str] = set()

    def interceptor(next_fun, a, kw, ctx):
        if ctx.method_name != "__call__" or not isinstance(ctx.module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*a, **kw)
        scope = ctx.module.scope
        mpath = ".".join(str(p) for p in (scope.path if scope is not None else ()))
        for key in (mpath + ".kernel", "params." + mpath + ".kernel"):
            layer = smile.layers.get(key)
            if layer is not None:
                break
        else:
            return next_fun(*a, **kw)
        x = a[0] if a else kw["inputs"]
        if isinstance(ctx.module, nn.DenseGeneral) and not _trailing_axes_ok(ctx.module, len(layer.in_shape),
                                                                              jnp.ndim(x)):
            raise MergeInputError(f"smile_apply: layer '{key}' is a DenseGeneral over axes {ctx.module.axis} "
                                  f"(batch_dims {ctx.module.batch_dims}); only trailing fan-in axes are supported.")
        used.add(key)
        return smile_linear(layer, x, routing)

    with nn.intercept_methods(interceptor):
        out = apply_fn(smile.params, *args, **kwargs)
    missing = sorted(set(smile.layers) - used)
    if missing:
        raise MergeInputError(f"smile_apply: SMILE layer(s) {missing[:5]} were never called as a flax.linen "
                              "Dense/DenseGeneral, so they would run without their experts; call smile_linear for "
                              "them in the model, or leave them out with smile_upscale(layers=...).")
    return out


def smile_storage(smile: SmileModel) -> dict:
    """Entries and bytes stored by a SMILE model against ``T`` full fine-tuned models.

    Returns:
      ``{"num_tasks", "model_params" (one model), "base_params", "gate_params", "expert_params" (down, up,
      bias deltas), "total_params", "full_models_params" (T · model_params), "ratio"}``, and the same totals in
      bytes (``total_bytes``, ``full_models_bytes``, ``ratio_bytes``; each array at its own dtype); the base
      counts each linear kernel and bias once (the params tree and the layer share them).

    References: Tang et al., "SMILE" (2024), Sec. 5 (parameter counts).
    """
    n_model = sum(int(np.size(x)) for x in jax.tree.leaves(smile.params))
    gate = sum(int(np.size(lay.gate)) for lay in smile.layers.values())
    experts = sum(int(np.size(lay.down)) + int(np.size(lay.up))
                  + (0 if lay.bias_delta is None else int(np.size(lay.bias_delta))) for lay in smile.layers.values())
    total = n_model + gate + experts
    T = smile.num_tasks
    b_model = _nbytes(jax.tree.leaves(smile.params))
    total_b = b_model + _nbytes([a for lay in smile.layers.values() for a in (lay.gate, lay.down, lay.up,
                                                                              lay.bias_delta) if a is not None])
    return {"num_tasks": T, "model_params": n_model, "base_params": n_model, "gate_params": gate,
            "expert_params": experts, "total_params": total, "full_models_params": T * n_model,
            "ratio": T * n_model / total, "total_bytes": total_b, "full_models_bytes": T * b_model,
            "ratio_bytes": T * b_model / total_b}


def _nbytes(arrays) -> int:
    return int(sum(int(np.size(a)) * np.dtype(jnp.asarray(a).dtype).itemsize for a in arrays))

