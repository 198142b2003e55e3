"""Dynamic merging for Flax NNX models: SMILE, WEMoE and LoRA-MoE layers swapped into a copy of the module.

The builders (:func:`~jmerge.dynamic.smile.smile_upscale`, :func:`~jmerge.dynamic.wemoe.build_wemoe`,
:func:`~jmerge.dynamic.lora_experts.build_lora_moe`) take parameter trees; for an NNX model give them
:func:`nnx_params` (``nnx.state(model, nnx.Param)`` as a plain nested dict with string keys, so the list
index of an ``nnx.List`` is ``"0"``; an NNX ``Linear`` kernel is ``(in, out)`` like linen's ``Dense``). The
functions here then return a NEW module (the input is cloned, never modified) in which:

* :func:`smile_nnx`: each ``nnx.Linear`` whose kernel has a SMILE layer is an :class:`SmileLinearNNX`
  (zero-shot routing over rank-k SVD experts, :func:`~jmerge.dynamic.smile.smile_linear`);
* :func:`lora_moe_nnx`: each adapted ``nnx.Linear`` is a :class:`LoraMoELinearNNX` (the base layer plus
  routed LoRA experts through :func:`~jmerge.dynamic.lora_experts.lora_moe_delta`, i.e.
  ``kernels.moe_dispatch(expert="linear")``);
* :func:`wemoe_nnx`: each named MLP module is a :class:`WEMoEBlockNNX` (base MLP + routed task vectors,
  merged per sample/token/batch); non-MLP weights are the task-arithmetic merge.

Layers are matched by the same paths the linen versions use (the kernel's path in :func:`nnx_params` for
SMILE, ``"/"``-joined module paths for WEMoE and LoRA-MoE). Routers are :class:`RouterParam` variables (an
``nnx.Param`` subclass), expert tensors :class:`ExpertParam`: ``nnx.state(model, RouterParam)`` is what a
router trainer differentiates (:func:`wemoe_tta_nnx`, :func:`train_routers_nnx`).

References: Tang et al., "SMILE" (2024); Tang et al., "Merging Multi-Task Models via Weight-Ensembling
Mixture of Experts" (ICML 2024); Wu et al., "Mixture of LoRA Experts" (ICLR 2024); Flax NNX documentation.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core.errors import MergeInputError
from ..core.tree import leaves_with_paths
from ..core.views import variable_path
from .lora_experts import LoraMoE, lora_moe_delta
from .smile import SmileLinear, SmileModel, smile_linear
from .wemoe import WEMoE, entropy_loss, reduce_routing, wemoe_router

__all__ = ["RouterParam", "ExpertParam", "SmileLinearNNX", "LoraMoELinearNNX", "WEMoEBlockNNX", "nnx_params",
           "smile_nnx", "lora_moe_nnx", "wemoe_nnx", "train_routers_nnx", "wemoe_tta_nnx"]

_GRANULARITIES = ("sample", "token", "batch")


class RouterParam(nnx.Param):
    """A router parameter of a dynamic NNX model (the only variables router training changes).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """


class ExpertParam(nnx.Param):
    """A frozen expert tensor of a dynamic NNX model (SVD experts, LoRA factors, task vectors).

    References: Tang et al., "SMILE" (2024); Wu et al., "Mixture of LoRA Experts" (ICLR 2024).
    """


def _stringify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def nnx_params(model: nnx.Module) -> dict:
    """``nnx.state(model, nnx.Param)`` as a plain nested dict with string keys (the builders' input).

    References: Flax NNX documentation (``nnx.state``, ``nnx.to_pure_dict``).
    """
    return _stringify(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _modules(model: nnx.Module) -> dict[str, tuple[tuple, Any]]:
    """``"."``-joined module path -> (path, module) for every submodule (the root is ``""``)."""
    return {".".join(str(k) for k in p): (tuple(p), m) for p, m in nnx.iter_modules(model)}


def _set_module(root: nnx.Module, path: tuple, new: Any) -> Any:
    """Put ``new`` at ``path`` inside ``root``; returns the (possibly new) root."""
    if not path:
        return new
    parent = root
    for k in path[:-1]:
        parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)
    return root


def _load_params(module: nnx.Module, tree: Any, where: str) -> None:
    """Set every ``nnx.Param`` of ``module`` (in place: call on a clone) from a params tree (dict or State)."""
    paths, leaves, _ = leaves_with_paths(tree)
    src = {variable_path(p): x for p, x in zip(paths, leaves)}
    state = nnx.state(module, nnx.Param)
    mpaths, mleaves, treedef = leaves_with_paths(state)
    new = []
    for p, old in zip(mpaths, mleaves):
        key = variable_path(p)
        if key not in src:
            raise MergeInputError(f"{where}: the model's parameter '{key}' is not in the built params tree; build "
                                  "from nnx_params(model) of this model")
        x = jnp.asarray(src[key])
        if x.shape != jnp.shape(old):
            raise MergeInputError(f"{where}: parameter '{key}' has shape {jnp.shape(old)} in the model but "
                                  f"{x.shape} in the built params tree; build from nnx_params(model) of this model")
        new.append(x.astype(jnp.asarray(old).dtype))
    nnx.update(module, treedef.unflatten(new))


def _linear_at(mods: dict, mpath: str, where: str, what: str, exact: bool) -> tuple[tuple, nnx.Linear]:
    """The ``nnx.Linear`` at ``mpath`` (``exact``: not a subclass such as ``nnx.LoRALinear``, whose own
    forward a replacement would drop)."""
    hit = mods.get(mpath)
    if hit is None:
        raise MergeInputError(f"{where}: {what} '{mpath}' is not a module of the model (module paths look like "
                              f"{', '.join(repr(k) for k in list(mods)[:4] if k)}); build from nnx_params(model)")
    if not (type(hit[1]) is nnx.Linear if exact else isinstance(hit[1], nnx.Linear)):
        raise MergeInputError(f"{where}: {what} '{mpath}' is a {type(hit[1]).__name__}, not an nnx.Linear; only "
                              "nnx.Linear layers can be adapted: leave this layer out when building")
    return hit


class SmileLinearNNX(nnx.Module):
    """An ``nnx.Linear`` replaced by a SMILE mixture: ``x K_0 + b_0 + Σ_{t∈top-k} w_t(x)·expert_t(x)``.

    ``routing`` (static): None (zero-shot routing), an int (every input to that expert) or a tuple of
    per-expert weights; see :func:`~jmerge.dynamic.smile.smile_linear`.

    References: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
    Pre-Trained Foundation Models" (2024).
    """

    def __init__(self, layer: SmileLinear, routing: Any = None):
        self.kernel = nnx.Param(jnp.asarray(layer.kernel))
        self.bias = None if layer.bias is None else nnx.Param(jnp.asarray(layer.bias))
        self.gate = ExpertParam(jnp.asarray(layer.gate))
        self.down = ExpertParam(jnp.asarray(layer.down))
        self.up = ExpertParam(jnp.asarray(layer.up))
        self.bias_delta = None if layer.bias_delta is None else ExpertParam(jnp.asarray(layer.bias_delta))
        self.path, self.in_shape, self.out_shape = layer.path, layer.in_shape, layer.out_shape
        self.top_k = layer.top_k
        if routing is not None and not isinstance(routing, (int, np.integer)):
            routing = tuple(float(v) for v in np.asarray(routing, np.float32).ravel())
        self.routing = routing if routing is None or isinstance(routing, tuple) else int(routing)

    def layer(self) -> SmileLinear:
        """This layer's arrays as a :class:`~jmerge.dynamic.smile.SmileLinear`.

        References: Tang et al., "SMILE" (2024).
        """
        val = (lambda v: None if v is None else v[...])
        return SmileLinear(self.kernel[...], val(self.bias), self.gate[...], self.down[...], self.up[...],
                           val(self.bias_delta), self.path, self.in_shape, self.out_shape, self.top_k)

    def __call__(self, x: jax.Array) -> jax.Array:
        routing = jnp.asarray(self.routing, jnp.float32) if isinstance(self.routing, tuple) else self.routing
        return smile_linear(self.layer(), x, routing)


def smile_nnx(model: nnx.Module, smile: SmileModel, *, routing: Any = None) -> nnx.Module:
    """A copy of ``model`` with SMILE layers: each SMILE kernel's ``nnx.Linear`` becomes a :class:`SmileLinearNNX`.

    Build ``smile`` with ``smile_upscale(nnx_params(base), [nnx_params(m) for m in finetuned], ...)``; the
    copy's other parameters are ``smile.params`` (the base's, or the average with ``others="average"``).

    Args:
      model: the base NNX module (not modified).
      smile: from :func:`~jmerge.dynamic.smile.smile_upscale` on this model's parameter trees.
      routing: None (zero-shot), an int task index (forced, weight 1) or per-expert weights ``(T,)``.

    Returns:
      A new module; jittable with ``nnx.jit`` or ``nnx.split`` + ``jax.jit``.

    Raises:
      MergeInputError: a SMILE layer's module is missing or not an ``nnx.Linear`` (naming its path), or the
        params tree does not fit the model.

    References: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
    Pre-Trained Foundation Models" (2024).
    """
    new = nnx.clone(model)
    _load_params(new, smile.params, "smile_nnx")
    mods = _modules(new)
    swaps = []
    for kpath, layer in smile.layers.items():
        mpath = variable_path(kpath)
        if not mpath.endswith("kernel"):
            raise MergeInputError(f"smile_nnx: SMILE layer '{kpath}' is not a 'kernel' leaf")
        mpath = mpath[:-len("kernel")].rstrip(".")
        path, lin = _linear_at(mods, mpath, "smile_nnx", "SMILE layer", exact=True)
        if tuple(lin.kernel.shape) != tuple(layer.kernel.shape):
            raise MergeInputError(f"smile_nnx: layer '{mpath}' kernel {tuple(lin.kernel.shape)} differs from the "
                                  f"SMILE layer's {tuple(layer.kernel.shape)}; build from nnx_params(model)")
        swaps.append((path, SmileLinearNNX(layer, routing)))
    for path, mod in swaps:
        new = _set_module(new, path, mod)
    return new


class LoraMoELinearNNX(nnx.Module):
    """An ``nnx.Linear`` plus a mixture of LoRA experts: ``base(h) + Σ_{e∈top-k} w_e(h)·s_e·(h A_e) B_e``.

    Attributes:
      base: the original ``nnx.Linear``; ``A`` ``(E, in, R)``, ``B`` ``(E, R, out)``, ``scale`` ``(E,)``
        (:class:`ExpertParam`); ``router_kernel`` ``(in, E)``, ``router_bias`` ``(E,)`` (:class:`RouterParam`).

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024); Hu et al., "LoRA" (ICLR 2022).
    """

    def __init__(self, base: nnx.Linear, experts: dict, router: dict, *, top_k: int, normalize: bool, impl: str):
        self.base = base
        self.A, self.B = ExpertParam(jnp.asarray(experts["A"])), ExpertParam(jnp.asarray(experts["B"]))
        self.scale = ExpertParam(jnp.asarray(experts["scale"]))
        self.router_kernel = RouterParam(jnp.asarray(router["kernel"], jnp.float32))
        self.router_bias = RouterParam(jnp.asarray(router["bias"], jnp.float32))
        self.top_k, self.normalize, self.impl = int(top_k), bool(normalize), impl

    def __call__(self, h: jax.Array) -> jax.Array:
        out = self.base(h)
        hf = h.reshape(-1, h.shape[-1])
        logits = hf.astype(jnp.float32) @ self.router_kernel[...] + self.router_bias[...]
        d, _ = lora_moe_delta(hf, logits, self.A[...], self.B[...], self.scale[...], top_k=self.top_k,
                              normalize=self.normalize, impl=self.impl)
        return out + d.reshape(*h.shape[:-1], d.shape[-1]).astype(out.dtype)


def lora_moe_nnx(model: nnx.Module, spec: LoraMoE, state: dict, *, impl: Optional[str] = None) -> nnx.Module:
    """A copy of ``model`` whose adapted ``nnx.Linear`` layers are :class:`LoraMoELinearNNX` mixtures.

    Build with ``build_lora_moe(nnx_params(model), experts, ...)`` (module paths ``"blocks/0/mlp/fc1"``);
    force an expert with :func:`~jmerge.dynamic.lora_experts.with_forced_expert` on ``state`` first.

    Args:
      model: the base NNX module (not modified).
      spec, state: from :func:`~jmerge.dynamic.lora_experts.build_lora_moe`.
      impl: override ``spec.impl`` (``"auto"``, ``"ragged"``, ``"pallas"``, ``"dense"``).

    Raises:
      MergeInputError: an adapted path is not a module of the model or not an ``nnx.Linear`` (naming it), or
        its kernel does not fit the experts.

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024).
    """
    new = nnx.clone(model)
    mods = _modules(new)
    swaps = []
    for key, mpath in spec.layers:
        path, lin = _linear_at(mods, ".".join(mpath), "lora_moe_nnx", "adapted layer", exact=False)
        ex = state["experts"][key]
        want = (int(ex["A"].shape[1]), int(ex["B"].shape[2]))
        if tuple(lin.kernel.shape) != want:
            raise MergeInputError(f"lora_moe_nnx: layer '{key}' kernel {tuple(lin.kernel.shape)} does not fit its "
                                  f"experts (in, out) = {want}; build from nnx_params(model)")
        swaps.append((path, LoraMoELinearNNX(lin, ex, state["routers"][key], top_k=spec.top_k,
                                             normalize=spec.normalize, impl=impl or spec.impl)))
    for path, mod in swaps:
        new = _set_module(new, path, mod)
    return new


class WEMoEBlockNNX(nnx.Module):
    """An MLP module run with ``θ_0 + Σ_t r_t(h)·τ_t``, merged per sample, token or batch by its router.

    Attributes:
      mlp: the base MLP module (its ``nnx.Param`` values are ``θ_0``); tau: the task vectors, one
        :class:`ExpertParam` ``(T, *shape)`` per MLP parameter in ``jax.tree.leaves`` order; router
        (:class:`RouterParam`): ``hidden_kernel``/``hidden_bias``, ``out_kernel``/``out_bias`` (or only ``bias``).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """

    def __init__(self, mlp: nnx.Module, taus: Sequence[jax.Array], router: dict, granularity: str):
        self.mlp = mlp
        self.tau = nnx.List([ExpertParam(jnp.asarray(t, jnp.float32)) for t in taus])
        r = lambda x: RouterParam(jnp.asarray(x, jnp.float32))  # noqa: E731
        self.hidden_kernel = r(router["hidden"]["kernel"]) if "hidden" in router else None
        self.hidden_bias = r(router["hidden"]["bias"]) if "hidden" in router else None
        self.out_kernel = r(router["out"]["kernel"]) if "out" in router else None
        self.out_bias = r(router["out"]["bias"]) if "out" in router else None
        self.bias = None if "out" in router else r(router["bias"])
        self.granularity = granularity

    def router(self) -> dict:
        """The router as the dict :func:`~jmerge.dynamic.wemoe.wemoe_router` reads.

        References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
        """
        if self.out_kernel is None:
            return {"bias": self.bias[...]}
        out = {"out": {"kernel": self.out_kernel[...], "bias": self.out_bias[...]}}
        if self.hidden_kernel is not None:
            out["hidden"] = {"kernel": self.hidden_kernel[...], "bias": self.hidden_bias[...]}
        return out

    def routing(self, x: jax.Array) -> jax.Array:
        """Routing weights for the input ``x``: ``(B, T)`` (sample), ``(..., T)`` (token) or ``(T,)`` (batch).

        References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
        """
        return reduce_routing(wemoe_router(self.router(), x), self.granularity)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        x = jnp.asarray(x)
        w = self.routing(x)
        graphdef, params, rest = nnx.split(self.mlp, nnx.Param, ...)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        taus = [t[...] for t in self.tau]

        def call(wi, xi):
            merged = [(jnp.asarray(b, jnp.float32) + jnp.tensordot(wi, t, axes=1)).astype(jnp.asarray(b).dtype)
                      for b, t in zip(leaves, taus)]
            return nnx.merge(graphdef, treedef.unflatten(merged), rest)(xi, *args, **kwargs)

        if w.ndim == 1:
            return call(w, x)
        lead = w.shape[:-1]
        if x.shape[:len(lead)] != lead:
            raise MergeInputError(f"WEMoE block: input {x.shape} does not share the routing shape {lead} "
                                  "(token routing needs a token-wise MLP)")
        xs = x.reshape(-1, *x.shape[len(lead):])
        out = jax.vmap(lambda wi, xi: call(wi, xi[None])[0])(w.reshape(-1, w.shape[-1]), xs)
        return out.reshape(*lead, *out.shape[1:])


def wemoe_nnx(model: nnx.Module, spec: WEMoE, state: dict, *, granularity: Optional[str] = None) -> nnx.Module:
    """A copy of ``model`` as a WEMoE model: task-arithmetic weights, each named MLP a :class:`WEMoEBlockNNX`.

    Build with ``build_wemoe(nnx_params(base), [nnx_params(m) for m in finetuned], mlps)`` where each group
    is ONE MLP module path (``["blocks/0/mlp", ...]``); constant routing: apply
    :func:`~jmerge.dynamic.wemoe.with_constant_routing` to ``state`` first.

    Args:
      model: the base NNX module (not modified).
      spec, state: from :func:`~jmerge.dynamic.wemoe.build_wemoe`.
      granularity: override ``spec.granularity`` (``"sample"``, ``"token"``, ``"batch"``).

    Raises:
      MergeInputError: a group of several modules (name the MLP block that holds them), a path that is not a
        module of the model, or a params tree that does not fit the model.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
    Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    gran = granularity or spec.granularity
    if gran not in _GRANULARITIES:
        raise MergeInputError(f"granularity must be one of {', '.join(_GRANULARITIES)}, got {gran!r}")
    new = nnx.clone(model)
    _load_params(new, state["params"], "wemoe_nnx")
    mods = _modules(new)
    swaps = []
    for g, paths in spec.groups:
        if len(paths) != 1:
            raise MergeInputError(f"wemoe_nnx: MLP group '{g}' has {len(paths)} modules "
                                  f"({', '.join('/'.join(p) for p in paths)}); for NNX name the one MLP module "
                                  "that holds them (e.g. 'blocks/0/mlp')")
        ukey = "/".join(paths[0])
        hit = mods.get(".".join(paths[0]))
        if hit is None or not paths[0]:
            raise MergeInputError(f"wemoe_nnx: MLP path '{ukey}' is not a submodule of the model")
        path, mlp = hit
        unit = state["experts"][g][ukey]
        tpaths, tleaves, _ = leaves_with_paths(unit["tau"])
        tau = {variable_path(p): t for p, t in zip(tpaths, tleaves)}
        mpaths, mleaves, _ = leaves_with_paths(nnx.state(mlp, nnx.Param))
        taus = []
        for p, leaf in zip(mpaths, mleaves):
            t = tau.get(variable_path(p))
            if t is None or tuple(t.shape) != (spec.num_tasks, *jnp.shape(leaf)):
                raise MergeInputError(f"wemoe_nnx: MLP '{ukey}' parameter '{variable_path(p)}' has no task vectors of shape "
                                      f"{(spec.num_tasks, *jnp.shape(leaf))}; build from nnx_params(model)")
            taus.append(t)
        swaps.append((path, WEMoEBlockNNX(mlp, taus, state["routers"][g], gran)))
    for path, mod in swaps:
        new = _set_module(new, path, mod)
    return new


def train_routers_nnx(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array],
                      sample: Callable[[jax.Array], Any], *, steps: int = 100, lr: float = 1e-3,
                      key: Optional[jax.Array] = None, optimizer: Any = None) -> tuple[nnx.Module, np.ndarray]:
    """Train only the :class:`RouterParam` variables of ``model`` with optax on ``loss_fn(model, sample(key))``.

    Args:
      model: a module from :func:`wemoe_nnx` or :func:`lora_moe_nnx` (not modified).
      loss_fn: ``(module, batch) -> scalar`` (jit-traceable).
      sample: ``key -> batch`` (jit-traceable), e.g. random rows of a data array.
      steps: optimisation steps; lr: Adam learning rate (ignored with ``optimizer``).
      key: PRNG key (default ``PRNGKey(0)``); optimizer: an optax optimizer (default ``optax.adam(lr)``).

    Returns:
      ``(module, losses)``: a new module (only its routers differ) and the ``(steps,)`` losses before each step.

    Raises:
      MergeInputError: the model has no router parameters.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
    Kingma & Ba, "Adam" (ICLR 2015).
    """
    import optax

    graphdef, routers, rest = nnx.split(model, RouterParam, ...)
    if not jax.tree_util.tree_leaves(routers):
        raise MergeInputError("train_routers_nnx: the model has no RouterParam variables (build it with "
                              "wemoe_nnx or lora_moe_nnx)")
    opt = optimizer if optimizer is not None else optax.adam(lr)
    key = jax.random.PRNGKey(0) if key is None else key

    @jax.jit
    def step(routers, opt_state, rest, k):
        def f(rt):
            return loss_fn(nnx.merge(graphdef, rt, jax.lax.stop_gradient(rest)), sample(k))

        loss, g = jax.value_and_grad(f)(routers)
        upd, opt_state = opt.update(g, opt_state, routers)
        return optax.apply_updates(routers, upd), opt_state, loss

    opt_state, losses = opt.init(routers), []
    for k in jax.random.split(key, int(steps)):
        routers, opt_state, loss = step(routers, opt_state, rest, k)
        losses.append(loss)
    out = np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)
    return nnx.merge(graphdef, routers, rest), out


def wemoe_tta_nnx(model: nnx.Module, logits_fn: Callable[[nnx.Module, jax.Array, int], jax.Array],
                  data: Union[Sequence[Any], Any], *, steps: int = 100, lr: float = 1e-3, batch_size: int = 16,
                  key: Optional[jax.Array] = None, optimizer: Any = None) -> tuple[nnx.Module, np.ndarray]:
    """Test-time adaptation of a WEMoE NNX model's routers: Adam on the summed prediction entropy.

    Each step draws ``batch_size`` inputs from every task's unlabeled set and minimises
    ``Σ_t entropy(logits_fn(module, x_t, t))`` (as :func:`~jmerge.dynamic.wemoe.wemoe_tta`); only the
    :class:`RouterParam` variables change.

    Args:
      model: from :func:`wemoe_nnx` (not modified).
      logits_fn: ``(module, x, task_index) -> (batch, classes)`` logits.
      data: one unlabeled input array per task (or one array).
      steps, lr, batch_size, key, optimizer: as in :func:`~jmerge.dynamic.wemoe.wemoe_tta`.

    Returns:
      ``(module, losses)``.

    Raises:
      MergeInputError: no or empty input sets, or a model without routers.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
    Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization" (ICLR 2021).
    """
    sets = [jnp.asarray(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    if not sets or any(d.shape[0] == 0 for d in sets):
        raise MergeInputError("wemoe_tta_nnx needs at least one non-empty unlabeled input set")

    def sample(k):
        ks = jax.random.split(k, len(sets))
        return [d[jax.random.randint(kk, (batch_size,), 0, d.shape[0])] for kk, d in zip(ks, sets)]

    def loss_fn(module, batches):
        return sum(entropy_loss(logits_fn(module, xb, t)) for t, xb in enumerate(batches))

    return train_routers_nnx(model, loss_fn, sample, steps=steps, lr=lr, key=key, optimizer=optimizer)
