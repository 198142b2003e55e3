"""A mixture of LoRA experts: several LoRA adapters of one base, a per-token top-k router per adapted layer.

Each adapted linear layer computes ``base(x) + sum_{e in top_k(x)} w_e(x) * s_e * B_e A_e x``, with
``w = softmax(x W_r + b_r)`` restricted to the ``top_k`` experts (renormalised when ``normalize``; with
``top_k=1`` renormalising makes every weight 1 and gives the router no gradient, so the default is
``normalize = top_k > 1``). The expert part is the MoE dispatch kernel with linear experts
(:func:`jmerge.kernels.moe_dispatch` with ``expert="linear"``: top-k routing, tokens grouped by expert, two
grouped matmuls ``x A_e`` and ``(x A_e) s_e B_e`` as ``jax.lax.ragged_dot`` on CPU or the Pallas grouped matmul
on GPU/TPU, weighted combine), so each token pays for its ``top_k`` experts only. Experts of different ranks
are zero-padded to the largest rank (exact: the padded rows and columns add nothing).

Experts come from PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``; :func:`read_peft_expert`)
or Flax LoRA factor pytrees (``{"lora_a": (in, r), "lora_b": (r, out)}`` nodes as ``flax.nnx.LoRA`` stores
them; :func:`lora_expert_from_flax`). The model is a linen model whose adapted layers are ``Dense``-like
modules named by path; it runs under ``flax.linen.intercept_methods`` (:func:`lora_moe_apply`). Routers
are trained on a small labelled or unlabelled set with any loss (:func:`train_lora_router`).

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Wu et al.,
"Mixture of LoRA Experts" (ICLR 2024); Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts"
(2024); Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition" (COLM 2024);
Fedus et al., "Switch Transformers" (JMLR 2022).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import MergeInputError
from ..io.errors import CheckpointNotFoundError
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from ..io.safetensors import CheckpointReader
from ..kernels.moe import moe_dispatch

__all__ = ["LoraFactors", "LoraExpert", "LoraMoE", "read_peft_expert", "lora_expert_from_flax", "build_lora_moe",
           "lora_moe_delta", "lora_moe_apply", "train_lora_router", "with_forced_expert"]

_PEFT_PREFIX = "base_model.model."
_IMPLS = ("auto", "ragged", "pallas", "dense")


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One adapted layer of one expert: ``delta W = scale * b @ a`` (PyTorch layout, ``W`` is ``(out, in)``).

    Attributes:
      a: ``(r, in)`` float32.
      b: ``(out, r)`` float32.
      scale: ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
      a_name: the tensor ``a`` came from (for messages).
      b_name: the tensor ``b`` came from.

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022).
    """

    a: np.ndarray
    b: np.ndarray
    scale: float
    a_name: str = "lora_A"
    b_name: str = "lora_B"


@dataclasses.dataclass(frozen=True)
class LoraExpert:
    """One LoRA adapter as an expert: its factors per module name.

    Attributes:
      name: the expert's name.
      source: where it came from (the adapter's safetensors file, or ``"<flax pytree>"``).
      modules: module name (``"model.layers.0.mlp.up_proj"`` or ``"layers_0/fc1"``) -> :class:`LoraFactors`.

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022).
    """

    name: str
    source: str
    modules: Mapping[str, LoraFactors]


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matching the end of the module name."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def read_peft_expert(adapter_dir: Union[str, os.PathLike], *, name: Optional[str] = None) -> LoraExpert:
    """Read a PEFT LoRA adapter directory as an expert (factors in float32, scale from its config).

    ``r``/``lora_alpha`` per module follow ``rank_pattern``/``alpha_pattern``; ``use_rslora`` scales by
    ``alpha / sqrt(r)``. Only linear-layer LoRA (``lora_A``/``lora_B`` weights) is accepted.

    Raises:
      CheckpointNotFoundError: no adapter config or no ``adapter_model.safetensors``.
      CheckpointFormatError: not a plain LoRA (DoRA, other PEFT types; from :func:`jmerge.io.lora.read_adapter_config`).
      MergeInputError: an adapter tensor a mixture cannot use (embedding LoRA, ``lora_B.bias``, full tensors,
        an A/B pair of different ranks or a rank other than the config's), naming the tensor and the file.

    References: Hugging Face PEFT ``LoraConfig`` / ``save_pretrained``; Kalajdzievski (2023) for rsLoRA.
    """
    d = os.fspath(adapter_dir)
    cfg = read_adapter_config(d)
    st = os.path.join(d, ADAPTER_WEIGHTS)
    if not os.path.isfile(st):
        raise CheckpointNotFoundError(f"{d}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG} (safetensors adapters only)")
    r0, alpha0, rs = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, str]] = {}
    with CheckpointReader(st) as reader:
        for key in reader.keys():
            rest = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = re.fullmatch(r"(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight", rest)
            if m is None:
                raise MergeInputError(f"{st}: tensor '{key}' is not a linear-layer LoRA factor (lora_A/lora_B); "
                                      "a mixture of LoRA experts supports linear LoRA only "
                                      "(merge this adapter into the base first)")
            pairs.setdefault(m["mod"], {})[m["ab"]] = key
        modules: dict[str, LoraFactors] = {}
        for mod, p in pairs.items():
            if set(p) != {"A", "B"}:
                raise MergeInputError(f"{st}: module '{mod}' has only {'lora_' + next(iter(p))}; "
                                      "a LoRA module needs both lora_A and lora_B")
            a = np.asarray(reader.get(p["A"]), np.float32)
            b = np.asarray(reader.get(p["B"]), np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise MergeInputError(f"{st}: '{p['A']}' {a.shape} and '{p['B']}' {b.shape} are not a rank-r pair "
                                      "((r, in) and (out, r))")
            r = _pattern(cfg.get("rank_pattern") or {}, mod, r0)
            if int(r) != a.shape[0]:
                raise MergeInputError(f"{st}: '{p['A']}' has rank {a.shape[0]} but {ADAPTER_CONFIG} says r={r} "
                                      "for this module; fix rank_pattern/r")
            alpha = float(_pattern(cfg.get("alpha_pattern") or {}, mod, alpha0))
            scale = alpha / (math.sqrt(r) if rs else float(r))
            modules[mod] = LoraFactors(a, b, scale, p["A"], p["B"])
    if not modules:
        raise MergeInputError(f"{st}: the adapter holds no LoRA tensors")
    return LoraExpert(name or os.path.basename(os.path.normpath(d)), st, modules)


def lora_expert_from_flax(tree: Any, *, name: str, scale: float = 1.0) -> LoraExpert:
    """An expert from a Flax LoRA pytree: every node ``{"lora_a": (in, r), "lora_b": (r, out)}`` is a module.

    The module name is the node's ``"/"``-joined path (``"layers_0/fc1"``); ``delta(x) = scale * x @ lora_a @ lora_b``
    (``flax.nnx.LoRA``'s convention, ``scale`` 1 there).

    Raises:
      MergeInputError: no LoRA nodes, or factors that are not a rank-r pair.

    References: Hu et al., "LoRA" (ICLR 2022); Flax ``nnx.LoRA``.
    """
    modules: dict[str, LoraFactors] = {}

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        if "lora_a" in node and "lora_b" in node:
            la, lb = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
            key = "/".join(path)
            if la.ndim != 2 or lb.ndim != 2 or la.shape[1] != lb.shape[0]:
                raise MergeInputError(f"expert '{name}': '{key}/lora_a' {la.shape} and '{key}/lora_b' {lb.shape} are "
                                      "not a rank-r pair ((in, r) and (r, out))")
            modules[key] = LoraFactors(la.T, lb.T, float(scale), f"{key}/lora_a", f"{key}/lora_b")
            return
        for k, v in node.items():
            walk(v, (*path, str(k)))

    walk(tree, ())
    if not modules:
        raise MergeInputError(f"expert '{name}': no {{'lora_a', 'lora_b'}} nodes in the pytree")
    return LoraExpert(name, "<flax pytree>", modules)


@dataclasses.dataclass(frozen=True)
class LoraMoE:
    """Static description of a mixture of LoRA experts (hashable); arrays live in the ``state`` dict.

    ``state``: ``experts[key] = {"A": (E, in, R), "B": (E, R, out), "scale": (E,)}`` (``x @ A`` layout, ranks
    zero-padded to ``R``) and ``routers[key] = {"kernel": (in, E), "bias": (E,)}`` per adapted layer.

    Attributes:
      layers: ``(key, module path)`` of each adapted layer (``key`` is the ``"/"``-joined path).
      expert_names: the experts' names, in router order.
      top_k: experts per token.
      normalize: renormalise the kept routing weights.
      impl: ``"auto"``, ``"ragged"``, ``"pallas"`` or ``"dense"`` (see :func:`lora_moe_delta`).

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024).
    """

    layers: tuple[tuple[str, tuple[str, ...]], ...]
    expert_names: tuple[str, ...]
    top_k: int = 1
    normalize: bool = False
    impl: str = "auto"

    @property
    def num_experts(self) -> int:
        """Number of experts ``E``."""
        return len(self.expert_names)


def _default_map(name: str) -> tuple[str, ...]:
    n = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    return tuple(s for s in re.split(r"[./]", n) if s)


def build_lora_moe(base: Any, experts: Sequence[LoraExpert], *, top_k: int = 1, normalize: Optional[bool] = None,
                   key: Optional[jax.Array] = None, router_std: float = 0.01,
                   module_map: Union[Mapping[str, Any], Callable[[str], Any], None] = None,
                   impl: str = "auto") -> tuple[LoraMoE, dict]:
    """Build a mixture of LoRA experts over a linen base's ``Dense`` layers.

    Args:
      base: the base params (nested dict); each adapted module's node holds a 2-D ``kernel`` ``(in, out)``.
      experts: :class:`LoraExpert` s (PEFT or Flax); a module missing from an expert is a rank-0 expert there.
      top_k: experts per token (``1 <= top_k <= E``).
      normalize: renormalise the kept weights (default ``top_k > 1``).
      key: PRNG key of the routers' initial kernels (default ``PRNGKey(0)``).
      router_std: std of the routers' initial kernels (biases start at 0).
      module_map: module name -> linen module path (tuple or ``"a/b"``), a mapping or a callable; default:
        the name without ``base_model.model.``, split at ``.`` and ``/``.
      impl: expert matmuls: ``"auto"`` (ragged_dot; Pallas is opt-in), ``"ragged"``, ``"pallas"``, ``"dense"``.

    Returns:
      ``(spec, state)``: the static :class:`LoraMoE` and the state pytree.

    Raises:
      MergeInputError: no experts, a bad ``top_k``, a module missing from the base, or an adapter whose factors
        do not fit the base's layer (an adapter for another base: names the tensor and the file).

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024); Hu et al., "LoRA" (ICLR 2022).
    """
    experts = list(experts)
    if not experts:
        raise MergeInputError("a mixture of LoRA experts needs at least one expert (adapter); a router with no "
                              "experts has nothing to route")
    E = len(experts)
    if not 1 <= int(top_k) <= E:
        raise MergeInputError(f"top_k={top_k} must be between 1 and the number of experts ({E})")
    if impl not in _IMPLS:
        raise MergeInputError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    key = jax.random.PRNGKey(0) if key is None else key

    def to_path(name: str) -> tuple[str, ...]:
        if module_map is None:
            p = _default_map(name)
        elif isinstance(module_map, Mapping):
            if name not in module_map:
                raise MergeInputError(f"module '{name}' (LoRA expert module) is not in module_map")
            p = module_map[name]
        else:
            p = module_map(name)
        return tuple(p.split("/")) if isinstance(p, str) else tuple(p)

    names: list[str] = []
    for e in experts:
        names += [m for m in e.modules if m not in names]
    layers: dict[str, tuple[tuple[str, ...], list[str]]] = {}
    for m in names:
        p = to_path(m)
        layers.setdefault("/".join(p), (p, []))[1].append(m)
    experts_state, routers = {}, {}
    for li, (lkey, (path, mods)) in enumerate(layers.items()):
        node = base
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise MergeInputError(f"LoRA module {mods[0]!r} -> base path '{lkey}' not found in the base params; "
                                      "give module_map= (module name -> linen module path)")
            node = node[k]
        if not isinstance(node, Mapping) or "kernel" not in node or np.ndim(node["kernel"]) != 2:
            raise MergeInputError(f"base '{lkey}' is not a Dense layer (no 2-D 'kernel'); "
                                  "LoRA experts adapt Dense layers")
        d_in, d_out = (int(s) for s in np.shape(node["kernel"]))
        facs: list[Optional[LoraFactors]] = []
        for e in experts:
            f = next((e.modules[m] for m in mods if m in e.modules), None)
            if f is not None and (f.a.shape[1] != d_in or f.b.shape[0] != d_out):
                raise MergeInputError(
                    f"LoRA expert '{e.name}' ({e.source}): '{f.a_name}' {tuple(f.a.shape)} and '{f.b_name}' "
                    f"{tuple(f.b.shape)} give a ({f.b.shape[0]}, {f.a.shape[1]}) update, but base '{lkey}/kernel' is "
                    f"(in={d_in}, out={d_out}): the adapter was made for another base model; use adapters of this base")
            facs.append(f)
        R = max([f.a.shape[0] for f in facs if f is not None] + [1])
        A = np.zeros((E, d_in, R), np.float32)
        B = np.zeros((E, R, d_out), np.float32)
        s = np.zeros((E,), np.float32)
        for i, f in enumerate(facs):
            if f is not None:
                r = f.a.shape[0]
                A[i, :, :r], B[i, :r, :], s[i] = f.a.T, f.b.T, f.scale
        experts_state[lkey] = {"A": jnp.asarray(A), "B": jnp.asarray(B), "scale": jnp.asarray(s)}
        routers[lkey] = {"kernel": router_std * jax.random.normal(jax.random.fold_in(key, li), (d_in, E), jnp.float32),
                         "bias": jnp.zeros((E,), jnp.float32)}
    spec = LoraMoE(tuple((k, p) for k, (p, _) in layers.items()), tuple(e.name for e in experts), int(top_k),
                   bool(int(top_k) > 1 if normalize is None else normalize), impl)
    return spec, {"experts": experts_state, "routers": routers}


def lora_moe_delta(x: jax.Array, router_logits: jax.Array, A: jax.Array, B: jax.Array, scale: jax.Array, *,
                   top_k: int = 1, normalize: bool = False, impl: str = "auto", block_rows: int = 128,
                   interpret: Optional[bool] = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The routed LoRA part ``sum_{e in top_k} w_e * scale_e * (x A_e) B_e`` of ``(tokens, in)`` inputs.

    :func:`jmerge.kernels.moe_dispatch` with ``expert="linear"``, ``w_up = A``, ``w_down = scale * B`` (rounded
    to ``x.dtype``) and float32 routing weights in the combine (``cast_weights=False``): float32 softmax, top-k,
    optional renormalisation; rows grouped by expert; ``x A_e`` then ``(.) scale_e B_e`` as grouped matmuls
    (``impl="ragged"``: ``jax.lax.ragged_dot``; ``"pallas"``: the Pallas grouped matmul over tile-padded
    groups, forward only; ``"dense"``: every expert on every token, one-hot combine); outputs summed with the
    routing weights in float32. ``ragged`` and ``dense`` are differentiable in ``router_logits``, ``A``, ``B``
    and ``x``.

    Args:
      x: ``(tokens, in)``.
      router_logits: ``(tokens, E)``.
      A: ``(E, in, R)``; B: ``(E, R, out)``; scale: ``(E,)``.
      top_k: experts per token; normalize: renormalise the kept weights.
      impl: ``"auto"`` (``"ragged"``; Pallas is opt-in), ``"ragged"``, ``"pallas"``, ``"dense"``.
      block_rows: Pallas row tile; interpret: Pallas interpreter (default on CPU).

    Returns:
      ``(delta, (weights, expert_ids))``: ``(tokens, out)`` in ``x.dtype`` and the ``(tokens, top_k)`` routing.

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024); Gale et al., "MegaBlocks" (MLSys 2023).
    """
    if impl not in _IMPLS:
        raise MergeInputError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    x = jnp.asarray(x)
    Bs = (jnp.asarray(B, jnp.float32) * jnp.asarray(scale, jnp.float32)[:, None, None]).astype(x.dtype)
    return moe_dispatch(x, router_logits, None, jnp.asarray(A).astype(x.dtype), Bs, top_k, normalize=normalize,
                        impl=impl, block_rows=block_rows, interpret=interpret, cast_weights=False, expert="linear",
                        return_routing=True)


def lora_moe_apply(apply_fn: Callable[..., Any], spec: LoraMoE, state: Mapping[str, Any], params: Any, x: Any,
                   *args: Any, return_routing: bool = False, impl: Optional[str] = None, **kwargs: Any) -> Any:
    """Run ``apply_fn(params, x, *args, **kwargs)`` with every adapted ``Dense`` layer as a mixture of LoRA experts.

    Each adapted module's output becomes ``module(h) + lora_moe_delta(h, ...)`` for its input ``h``
    (routed per token: all leading axes of ``h`` are tokens). Works under ``jax.jit`` and ``jax.grad``.

    Args:
      apply_fn: ``(params, x, ...) -> output``, e.g. ``lambda p, x: model.apply({"params": p}, x)``.
      spec, state: from :func:`build_lora_moe`.
      params: the base params.
      x: the model input.
      return_routing: also return ``{layer: (weights, expert_ids)}`` (``(tokens, top_k)`` each).
      impl: override ``spec.impl``.

    Raises:
      MergeInputError: an adapted layer never ran (its path does not match the model).

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024).
    """
    import flax.linen as nn

    paths = {p: k for k, p in spec.layers}
    routing: dict[str, Any] = {}

    def interceptor(next_fun, fargs, fkwargs, context):
        lkey = paths.get(tuple(context.module.path)) if context.method_name == "__call__" else None
        if lkey is None:
            return next_fun(*fargs, **fkwargs)
        out = next_fun(*fargs, **fkwargs)
        h = jnp.asarray(fargs[0])
        hf = h.reshape(-1, h.shape[-1])
        r = state["routers"][lkey]
        logits = hf.astype(jnp.float32) @ r["kernel"] + r["bias"]
        ex = state["experts"][lkey]
        d, rt = lora_moe_delta(hf, logits, ex["A"], ex["B"], ex["scale"], top_k=spec.top_k, normalize=spec.normalize,
                               impl=impl or spec.impl)
        routing[lkey] = rt
        return out + d.reshape(*h.shape[:-1], d.shape[-1]).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, x, *args, **kwargs)
    missing = [k for k, _ in spec.layers if k not in routing]
    if missing:
        raise MergeInputError(f"adapted layer(s) {', '.join(missing[:3])} never ran: the module paths do not match the "
                              "model (give build_lora_moe a module_map)")
    return (out, routing) if return_routing else out


def with_forced_expert(spec: LoraMoE, state: Mapping[str, Any], expert: int) -> dict:
    """A copy of ``state`` whose routers send every token to ``expert`` with weight 1 (top-1 = base + that LoRA).

    Raises:
      MergeInputError: ``expert`` out of range.

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024).
    """
    if not 0 <= int(expert) < spec.num_experts:
        raise MergeInputError(f"expert {expert} out of range: the mixture has {spec.num_experts} experts")
    routers = {k: {"kernel": jnp.zeros_like(r["kernel"]),
                   "bias": 1e4 * jax.nn.one_hot(int(expert), spec.num_experts, dtype=jnp.float32)}
               for k, r in state["routers"].items()}
    return {**state, "routers": routers}


def train_lora_router(spec: LoraMoE, state: Mapping[str, Any], loss_fn: Callable[[Any, Any], jax.Array],
                      data: Any, *, steps: int = 100, lr: float = 1e-2, batch_size: int = 32,
                      key: Optional[jax.Array] = None, optimizer: Any = None) -> tuple[dict, np.ndarray]:
    """Train the routers (only them) with Adam on ``loss_fn(state, batch)`` over random batches of ``data``.

    ``data`` is an array or a tuple of arrays with one leading axis (inputs, or inputs and labels); a batch
    is the same rows of each. Labelled: e.g. cross-entropy of :func:`lora_moe_apply`'s logits; unlabelled:
    e.g. :func:`jmerge.dynamic.wemoe.entropy_loss` of them.

    Returns:
      ``(state, losses)``: the new state (experts shared with the input, which is not modified) and ``(steps,)``
      losses before each step.

    Raises:
      MergeInputError: empty data.

    References: Wu et al., "Mixture of LoRA Experts" (ICLR 2024); Kingma & Ba, "Adam" (ICLR 2015).
    """
    import optax

    arrays = tuple(jnp.asarray(a) for a in (data if isinstance(data, (tuple, list)) else (data,)))
    n = arrays[0].shape[0] if arrays else 0
    if n == 0 or any(a.shape[0] != n for a in arrays):
        raise MergeInputError("train_lora_router needs non-empty data arrays with one common leading axis")
    opt = optimizer if optimizer is not None else optax.adam(lr)
    key = jax.random.PRNGKey(0) if key is None else key
    frozen = {k: v for k, v in state.items() if k != "routers"}
    single = not isinstance(data, (tuple, list))

    @jax.jit
    def step(routers, opt_state, frozen, arrays, k):
        idx = jax.random.randint(k, (batch_size,), 0, n)
        batch = tuple(a[idx] for a in arrays)

        def f(rt):
            return loss_fn({**jax.lax.stop_gradient(frozen), "routers": rt}, batch[0] if single else batch)

        loss, g = jax.value_and_grad(f)(routers)
        upd, opt_state = opt.update(g, opt_state, routers)
        return optax.apply_updates(routers, upd), opt_state, loss

    routers, opt_state, losses = state["routers"], opt.init(state["routers"]), []
    for k in jax.random.split(key, int(steps)):
        routers, opt_state, loss = step(routers, opt_state, frozen, arrays, k)
        losses.append(loss)
    return {**frozen, "routers": routers}, np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)
