"""WEMoE: weight-ensembling mixture of experts (Tang et al., ICML 2024) for Flax linen models.

Every weight outside the named MLPs is merged once by task arithmetic (``base + scaling * sum_t tau_t``,
through :func:`jmerge.merge`). Each named MLP becomes a *weight-ensembling* MoE: a small router reads the
hidden state entering the MLP and outputs one weight ``r_t`` per task (no softmax), and the MLP runs
with the weights ``theta_0 + sum_t r_t(x) * tau_t``, merged per input:

- ``granularity="sample"`` (the paper and FusionBench): router outputs averaged over the tokens of each
  sample; one merged MLP per sample.
- ``"token"``: one merged MLP per token (the MLP must act token-wise).
- ``"batch"``: router outputs averaged over the whole batch (FusionBench's ``batch_reduce``).

The router is ``relu(h W1 + b1) W2 + b2`` (``router_layers=2``), ``h W2 + b2`` (1) or a constant
``b2`` (0); ``W2`` starts at zero and ``b2`` at ``init_lambda``, so the untrained model *is* task
arithmetic with ``init_lambda`` (FusionBench draws ``W2`` with std 0.01 instead). Routers are trained by
test-time adaptation: Adam on the Shannon entropy of the predictions on unlabeled inputs
(:func:`wemoe_tta`); nothing else changes.

The MLPs are found by module path: the model runs under ``flax.linen.intercept_methods`` and a call of a
named module is replaced by the same module applied with the merged weights. An MLP may be one module
(an ``MlpBlock`` submodule) or several (``fc1`` and ``fc2`` inside a block: one *group*, one router,
whose input is the first module's input).

References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); FusionBench ``we_moe`` (Tang et al. 2024).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..core.driver import merge
from ..core.errors import MergeInputError
from ..methods.basic import task_arithmetic

__all__ = ["WEMoE", "build_wemoe", "wemoe_apply", "wemoe_tta", "wemoe_storage", "with_constant_routing",
           "vit_mlp_groups", "wemoe_router_init", "wemoe_router", "entropy_loss", "reduce_routing"]

Path = tuple[str, ...]
MlpSpec = Union[Mapping[str, Sequence[Union[str, Path]]], Sequence[Union[str, Path]], Callable[[str], Any]]
_GRANULARITIES = ("sample", "token", "batch")


def entropy_loss(logits: jax.Array) -> jax.Array:
    """Mean Shannon entropy of ``softmax(logits)`` over the rows: the test-time-adaptation objective.

    Computed from ``log_softmax`` (FusionBench adds 1e-8 inside the log instead).

    References: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization" (ICLR 2021);
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def wemoe_router_init(key: jax.Array, hidden_size: int, num_experts: int, *, layers: int = 2, init_lambda: Any = 0.3,
                init_std: float = 0.01) -> dict:
    """Parameters of a WEMoE router with ``layers`` (0, 1 or 2) linear layers whose output starts at ``init_lambda``.

    ``layers=2``: ``{"hidden": {"kernel" (D, D) ~ N(0, init_std), "bias" 0}, "out": {"kernel" (D, T) = 0,
    "bias" = init_lambda}}``; ``layers=1``: ``{"out": ...}``; ``layers=0``: ``{"bias": init_lambda}``.

    Raises:
      MergeInputError: no experts (tasks), a bad layer count, or a non-positive hidden size.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    if int(num_experts) < 1:
        raise MergeInputError("a router needs at least one expert (task): got 0 fine-tuned models / experts")
    if layers not in (0, 1, 2):
        raise MergeInputError(f"router layers must be 0, 1 or 2, got {layers}")
    lam = jnp.broadcast_to(jnp.asarray(init_lambda, jnp.float32), (int(num_experts),))
    if layers == 0:
        return {"bias": lam}
    if int(hidden_size) < 1:
        raise MergeInputError(f"router hidden size must be positive, got {hidden_size}")
    out = {"kernel": jnp.zeros((int(hidden_size), int(num_experts)), jnp.float32), "bias": lam}
    if layers == 1:
        return {"out": out}
    hid = {"kernel": init_std * jax.random.normal(key, (int(hidden_size), int(hidden_size)), jnp.float32),
           "bias": jnp.zeros((int(hidden_size),), jnp.float32)}
    return {"hidden": hid, "out": out}


def wemoe_router(router: Mapping[str, Any], h: jax.Array) -> jax.Array:
    """Router outputs ``(..., T)`` for hidden states ``(..., D)`` (float32; no softmax, as in WEMoE).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    h = jnp.asarray(h, jnp.float32)
    if "out" not in router:
        return jnp.broadcast_to(router["bias"], (*h.shape[:-1], router["bias"].shape[-1]))
    if "hidden" in router:
        h = jax.nn.relu(h @ router["hidden"]["kernel"] + router["hidden"]["bias"])
    return h @ router["out"]["kernel"] + router["out"]["bias"]


@dataclasses.dataclass(frozen=True)
class WEMoE:
    """The static description of a WEMoE model (hashable); its arrays live in the ``state`` dict.

    ``state`` (a pytree, from :func:`build_wemoe`): ``params`` (task-arithmetic merge, MLP leaves from the
    base), ``experts[group][unit] = {"base": subtree, "tau": subtree with leaves (T, ...)}``, ``routers[group]``.

    Attributes:
      groups: ``(group name, (module path, ...))`` pairs; the router of a group reads the first module's input.
      num_tasks: number of task vectors ``T``.
      granularity: ``"sample"``, ``"token"`` or ``"batch"`` (see the module docstring).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """

    groups: tuple[tuple[str, tuple[Path, ...]], ...]
    num_tasks: int
    granularity: str = "sample"

    def unit_names(self) -> dict[Path, tuple[str, str, int]]:
        """Module path -> (group, unit key, position in the group)."""
        return {p: (g, "/".join(p), i) for g, ps in self.groups for i, p in enumerate(ps)}


def _path(p: Union[str, Path]) -> Path:
    return tuple(p.split("/")) if isinstance(p, str) else tuple(str(s) for s in p)


def _subtree(tree: Any, path: Path, what: str) -> Any:
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise MergeInputError(f"MLP path '{'/'.join(path)}' not found in the {what} params "
                                  f"(no '{k}' under '{'/'.join(path[:i]) or '<root>'}'); name existing module paths")
        node = node[k]
    return node


def _resolve_groups(params: Any, mlps: MlpSpec) -> tuple[tuple[str, tuple[Path, ...]], ...]:
    if callable(mlps) and not isinstance(mlps, Mapping):
        found: dict[str, list[Path]] = {}

        def walk(node, path):
            if not isinstance(node, Mapping):
                return
            if path:
                g = mlps("/".join(path))
                if g:
                    found.setdefault("/".join(path) if g is True else str(g), []).append(path)
                    return
            for k in node:
                walk(node[k], (*path, str(k)))

        walk(params, ())
        groups = tuple((g, tuple(ps)) for g, ps in found.items())
    elif isinstance(mlps, Mapping):
        groups = tuple((str(g), tuple(_path(p) for p in ps)) for g, ps in mlps.items())
    else:
        groups = tuple(("/".join(_path(p)), (_path(p),)) for p in mlps)
    if not groups or any(not ps for _, ps in groups):
        raise MergeInputError("no MLP modules named: give module paths (e.g. 'layers_0/mlp'), a mapping group -> "
                              "paths, or a predicate on module paths that matches at least one")
    seen: dict[Path, str] = {}
    for g, ps in groups:
        for p in ps:
            sub = _subtree(params, p, "base")
            leaves = jax.tree_util.tree_leaves(sub)
            if not leaves:
                raise MergeInputError(f"MLP path '{'/'.join(p)}' holds no parameters")
            if not all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in leaves):
                raise MergeInputError(f"MLP path '{'/'.join(p)}' holds non-floating parameters")
            for q in seen:
                if p[:len(q)] == q or q[:len(p)] == p:
                    raise MergeInputError(f"MLP paths '{'/'.join(p)}' and '{'/'.join(q)}' overlap; "
                                          "name disjoint modules")
            seen[p] = g
    return groups


def vit_mlp_groups(params: Any, *, block: str = r"(layers|blocks?|encoderblock)_\d+",
                   mlp: Sequence[str] = ("fc1", "fc2"), submodule: Sequence[str] = ("mlp", "MlpBlock_0")
                   ) -> dict[str, list[Path]]:
    """The MLP groups of a linen ViT-like model: per transformer block, its MLP submodule or its dense layers.

    A block is a dict node whose key matches ``block``; its MLP is the first ``submodule`` name it has
    (one module, e.g. ``Encoder1DBlock_0/MlpBlock_0``), else its ``mlp`` dense layers in order (e.g.
    ``layers_0/fc1``, ``layers_0/fc2`` in :mod:`jmerge.demo.model`; the router reads ``fc1``'s input).

    Raises:
      MergeInputError: no block with an MLP was found.

    References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); Tang et al., "Merging
    Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    out: dict[str, list[Path]] = {}
    pat = re.compile(block)

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        for k, v in node.items():
            p = (*path, str(k))
            if pat.fullmatch(str(k)) and isinstance(v, Mapping):
                sub = next((s for s in submodule if s in v), None)
                if sub is not None:
                    out["/".join(p)] = [(*p, sub)]
                    continue
                if all(m in v for m in mlp):
                    out["/".join(p)] = [(*p, m) for m in mlp]
                    continue
            walk(v, p)

    walk(params, ())
    if not out:
        raise MergeInputError(f"no transformer block matching {block!r} with an MLP ({'/'.join(submodule)} or "
                              f"{', '.join(mlp)}) found; name the MLP module paths explicitly")
    return out


def _hidden_size(sub: Any, path: Path) -> int:
    if isinstance(sub, Mapping) and "kernel" in sub and jnp.ndim(sub["kernel"]) >= 2:
        return int(jnp.shape(sub["kernel"])[0])
    for k in sub if isinstance(sub, Mapping) else ():
        if isinstance(sub[k], Mapping):  # first Dense inside an MLP submodule
            return _hidden_size(sub[k], path + (k,))
    raise MergeInputError(f"cannot infer the router input size of MLP '{'/'.join(path)}' (no Dense kernel); "
                          "pass hidden_size=")


def build_wemoe(base: Any, finetuned: Sequence[Any], mlps: MlpSpec, *, key: Optional[jax.Array] = None,
                scaling: float = 0.3, init_lambda: Any = None, router_layers: int = 2,
                hidden_size: Union[int, Mapping[str, int], None] = None, granularity: str = "sample",
                router_init_std: float = 0.01) -> tuple[WEMoE, dict]:
    """Build a WEMoE model from a base and fine-tuned linen param trees.

    Args:
      base: pretrained params (a nested dict, e.g. ``model.init(...)["params"]``).
      finetuned: fine-tuned params, one per task, each with the base's structure.
      mlps: the MLP modules: a list of module paths (``"layers_0/mlp"`` or tuples; one group each), a mapping
        group name -> paths (one router per group, reading the first path's input; e.g. :func:`vit_mlp_groups`),
        or a predicate on ``"/"``-joined module paths returning a group name, True or None.
      key: PRNG key of the routers' hidden layers (default ``PRNGKey(0)``).
      scaling: task-arithmetic coefficient of the non-MLP weights (FusionBench uses ``init_lambda`` for it).
      init_lambda: routers' initial output, a number or ``(T,)`` (default ``scaling``).
      router_layers: 0, 1 or 2 router layers (the paper: 2).
      hidden_size: router input size (int or per group); default: the first Dense kernel's input size.
      granularity: ``"sample"`` (default), ``"token"`` or ``"batch"``.
      router_init_std: std of the hidden router layer's initial kernel.

    Returns:
      ``(spec, state)``: the static :class:`WEMoE` and the state pytree (``params``, ``experts``, ``routers``).

    Raises:
      MergeInputError: no fine-tuned models, structures that differ, unknown or overlapping MLP paths.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
    Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    finetuned = list(finetuned)
    if not finetuned:
        raise MergeInputError("WEMoE needs at least one fine-tuned model (a router with no tasks has nothing to route)")
    if granularity not in _GRANULARITIES:
        raise MergeInputError(f"granularity must be one of {', '.join(_GRANULARITIES)}, got {granularity!r}")
    bstruct = jax.tree_util.tree_structure(base)
    for i, ft in enumerate(finetuned):
        if jax.tree_util.tree_structure(ft) != bstruct:
            raise MergeInputError(f"fine-tuned model {i} does not have the base's parameter structure")
    groups = _resolve_groups(base, mlps)
    T = len(finetuned)
    key = jax.random.PRNGKey(0) if key is None else key
    merged = merge(task_arithmetic(scale=scaling), base, finetuned)
    params = jax.tree_util.tree_map(lambda x: x, merged)  # fresh containers we may edit
    experts: dict[str, dict[str, dict]] = {}
    routers: dict[str, dict] = {}
    lam = scaling if init_lambda is None else init_lambda
    for gi, (g, paths) in enumerate(groups):
        experts[g] = {}
        for p in paths:
            b = _subtree(base, p, "base")
            taus = [jax.tree_util.tree_map(lambda f, b0: jnp.asarray(f, jnp.float32) - jnp.asarray(b0, jnp.float32),
                                           _subtree(ft, p, f"fine-tuned model {i}"), b)
                    for i, ft in enumerate(finetuned)]
            tau = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *taus)
            experts[g]["/".join(p)] = {"base": jax.tree_util.tree_map(jnp.asarray, b), "tau": tau}
            node = params
            for k in p[:-1]:
                node = node[k]
            node[p[-1]] = jax.tree_util.tree_map(jnp.asarray, b)  # placeholder: the MLP runs merged per input
        hs = hidden_size[g] if isinstance(hidden_size, Mapping) else hidden_size
        if hs is None and router_layers > 0:
            hs = _hidden_size(_subtree(base, paths[0], "base"), paths[0])
        routers[g] = wemoe_router_init(jax.random.fold_in(key, gi), hs or 0, T, layers=router_layers, init_lambda=lam,
                                 init_std=router_init_std)
    spec = WEMoE(groups=groups, num_tasks=T, granularity=granularity)
    return spec, {"params": params, "experts": experts, "routers": routers}


def reduce_routing(r: jax.Array, granularity: str) -> jax.Array:
    """Router outputs ``r`` (``..., T``) reduced to the routing granularity: per token, sample or batch.

    ``"token"`` keeps ``r``; ``"sample"`` averages the token axes of a ``(B, ..., T)`` output;
    ``"batch"`` averages everything to one ``(T,)`` vector (FusionBench's ``batch_reduce``).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    if granularity == "token" or r.ndim <= 2:
        return r if granularity != "batch" else jnp.mean(r.reshape(-1, r.shape[-1]), axis=0)
    if granularity == "sample":
        return jnp.mean(r, axis=tuple(range(1, r.ndim - 1)))
    return jnp.mean(r.reshape(-1, r.shape[-1]), axis=0)


def _combine(unit: Mapping[str, Any], w: jax.Array) -> Any:
    """``base + sum_t w_t tau_t`` for one routing vector ``w`` (T,)."""
    return jax.tree_util.tree_map(
        lambda b, t: (jnp.asarray(b, jnp.float32) + jnp.tensordot(w.astype(jnp.float32), t, axes=1)).astype(b.dtype),
        unit["base"], unit["tau"])


def wemoe_apply(apply_fn: Callable[..., Any], spec: WEMoE, state: Mapping[str, Any], x: Any, *args: Any,
                granularity: Optional[str] = None, return_routing: bool = False, **kwargs: Any) -> Any:
    """Run ``apply_fn(state["params"], x, *args, **kwargs)`` with every named MLP merged per input by its router.

    ``apply_fn`` is the user's linen forward, e.g. ``lambda p, x: model.apply({"params": p}, x)``; it must
    call the MLP modules by their paths. Works under ``jax.jit``, ``jax.grad`` and ``vmap``.

    Args:
      apply_fn: ``(params, x, *args, **kwargs) -> output``.
      spec: from :func:`build_wemoe`.
      state: the state pytree (routers may be traced).
      x: the model input (its leading axis is the batch).
      granularity: override ``spec.granularity``.
      return_routing: also return ``{group: routing weights}`` (``(B, T)``, ``(..., T)`` or ``(T,)``).

    Raises:
      MergeInputError: a later module of a group ran before the group's first module (no routing yet).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    import flax.linen as nn

    gran = granularity or spec.granularity
    if gran not in _GRANULARITIES:
        raise MergeInputError(f"granularity must be one of {', '.join(_GRANULARITIES)}, got {gran!r}")
    units = spec.unit_names()
    routing: dict[str, jax.Array] = {}
    nested = [False]

    def run_unit(module, unit, w, a0, rest, kw):
        mod = module.clone(parent=None)

        def call(p, xi):
            nested[0] = True
            try:
                return mod.apply({"params": p}, xi, *rest, **kw)
            finally:
                nested[0] = False

        if w.ndim == 1:  # one merged MLP for the whole batch
            return call(_combine(unit, w), a0)
        lead = w.shape[:-1]
        xs = a0.reshape(-1, *a0.shape[len(lead):])
        out = jax.vmap(lambda wi, xi: call(_combine(unit, wi), xi[None])[0])(w.reshape(-1, w.shape[-1]), xs)
        return out.reshape(*lead, *out.shape[1:])

    def interceptor(next_fun, fargs, fkwargs, context):
        if nested[0] or context.method_name != "__call__":
            return next_fun(*fargs, **fkwargs)
        hit = units.get(tuple(context.module.path))
        if hit is None:
            return next_fun(*fargs, **fkwargs)
        g, ukey, pos = hit
        if not fargs:
            raise MergeInputError(f"MLP module '{ukey}' was called without a positional input")
        a0 = jnp.asarray(fargs[0])
        if pos == 0:
            r = wemoe_router(state["routers"][g], a0)
            routing[g] = reduce_routing(r, gran)
        elif g not in routing:
            raise MergeInputError(f"module '{ukey}' of MLP group '{g}' ran before the group's first module "
                                  f"'{'/'.join(dict(spec.groups)[g][0])}'; list the group's input layer first")
        w = routing[g]
        if w.ndim > 1 and a0.shape[:w.ndim - 1] != w.shape[:-1]:
            raise MergeInputError(f"module '{ukey}': input {a0.shape} does not share the routing shape "
                                  f"{w.shape[:-1]} (token routing needs a token-wise MLP)")
        return run_unit(context.module, state["experts"][g][ukey], w, a0, fargs[1:], fkwargs)

    with nn.intercept_methods(interceptor):
        out = apply_fn(state["params"], x, *args, **kwargs)
    missing = [g for g, _ in spec.groups if g not in routing]
    if missing:
        raise MergeInputError(f"MLP group(s) {', '.join(missing)} never ran: apply_fn does not call the named "
                              "modules (check the module paths against the model)")
    return (out, routing) if return_routing else out


def with_constant_routing(state: Mapping[str, Any], weights: Any) -> dict:
    """A copy of ``state`` whose routers output ``weights`` ``(T,)`` (or ``{group: (T,)}``) for every input.

    With one-hot ``weights`` on task ``t`` every MLP runs with ``base + tau_t``, i.e. fine-tuned model t's MLPs.

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    routers = {}
    for g, r in state["routers"].items():
        w = jnp.asarray(weights[g] if isinstance(weights, Mapping) else weights, jnp.float32)
        new = jax.tree_util.tree_map(jnp.zeros_like, r)
        if "out" in new:
            new["out"]["bias"] = jnp.broadcast_to(w, new["out"]["bias"].shape)
        else:
            new["bias"] = jnp.broadcast_to(w, new["bias"].shape)
        routers[g] = new
    return {**state, "routers": routers}


def wemoe_tta(spec: WEMoE, state: Mapping[str, Any], logits_fn: Callable[[Any, jax.Array, int], jax.Array],
              data: Union[Sequence[Any], Any], *, steps: int = 100, lr: float = 1e-3, batch_size: int = 16,
              key: Optional[jax.Array] = None, optimizer: Any = None) -> tuple[dict, np.ndarray]:
    """Test-time adaptation of the routers: Adam on the summed prediction entropy of unlabeled batches.

    Each step draws ``batch_size`` inputs from every task's unlabeled set and minimises
    ``sum_t entropy(logits_fn(state, x_t, t))``; only ``state["routers"]`` changes (the returned state shares
    every other array with the input, which is never modified).

    Args:
      spec: from :func:`build_wemoe`.
      state: the state pytree.
      logits_fn: ``(state, x, task_index) -> (batch, classes)`` logits; call :func:`wemoe_apply` inside.
      data: one unlabeled input array per task (or a single array: one task).
      steps: optimisation steps (the paper: 1000, lr 1e-3).
      lr: Adam learning rate (ignored when ``optimizer`` is given).
      batch_size: inputs per task per step.
      key: PRNG key for the batches.
      optimizer: an optax optimizer (default ``optax.adam(lr)``).

    Returns:
      ``(state, losses)``: the adapted state and the ``(steps,)`` losses (the loss before each step).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024);
    Wang et al., "Tent" (ICLR 2021).
    """
    import optax

    sets = [jnp.asarray(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    if not sets or any(d.shape[0] == 0 for d in sets):
        raise MergeInputError("wemoe_tta needs at least one non-empty unlabeled input set")
    opt = optimizer if optimizer is not None else optax.adam(lr)
    key = jax.random.PRNGKey(0) if key is None else key
    rest = {k: v for k, v in state.items() if k != "routers"}

    def loss_fn(routers, frozen, batches):
        st = {**frozen, "routers": routers}
        return sum(entropy_loss(logits_fn(st, xb, t)) for t, xb in enumerate(batches))

    @jax.jit
    def step(routers, opt_state, frozen, sets, k):
        ks = jax.random.split(k, len(sets))
        batches = [d[jax.random.randint(kk, (batch_size,), 0, d.shape[0])] for kk, d in zip(ks, sets)]
        loss, g = jax.value_and_grad(loss_fn)(routers, jax.lax.stop_gradient(frozen), batches)
        upd, opt_state = opt.update(g, opt_state, routers)
        return optax.apply_updates(routers, upd), opt_state, loss

    routers = state["routers"]
    opt_state = opt.init(routers)
    losses = []
    for k in jax.random.split(key, int(steps)):
        routers, opt_state, loss = step(routers, opt_state, rest, sets, k)
        losses.append(loss)
    return {**rest, "routers": routers}, np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)


def wemoe_storage(spec: WEMoE, state: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts and bytes: the WEMoE model (merged + T task-vector MLPs + routers) against T full models.

    Returns:
      ``{"wemoe": ..., "merged": ..., "mlp_experts": ..., "routers": ..., "full_models": T * model size}`` in
      entries, and ``wemoe_bytes`` / ``full_models_bytes`` (each array at its own dtype; the experts' ``base``
      entries are the merged params' own MLP weights, counted once).

    References: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024).
    """
    def count(t):
        return int(sum(np.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(t)))

    def nbytes(t):
        return int(sum(int(np.size(x)) * np.dtype(jnp.asarray(x).dtype).itemsize for x in jax.tree_util.tree_leaves(t)))

    taus = [u["tau"] for g in state["experts"].values() for u in g.values()]
    merged = count(state["params"])
    experts = sum(count(t) for t in taus)
    routers = count(state["routers"])
    b_merged = nbytes(state["params"])
    return {"wemoe": merged + experts + routers, "merged": merged, "mlp_experts": experts, "routers": routers,
            "full_models": spec.num_tasks * merged,
            "wemoe_bytes": b_merged + nbytes(taus) + nbytes(state["routers"]),
            "full_models_bytes": spec.num_tasks * b_merged}
