"""Flax LoRA pytrees: find the LoRA factors of a Flax parameter tree and merge them into its kernels.

Flax keeps a LoRA as two factors next to (or around) the kernel they adapt, in the kernel's fan-in x
fan-out orientation (no transpose, unlike PEFT's ``(out, in)`` weights)::

    ΔW = scale · lora_a @ lora_b        lora_a (fan_in, r)    lora_b (r, fan_out)

``flax.nnx.LoRA`` computes ``x @ lora_a @ lora_b`` (scale 1). Layouts recognised, by path (``X`` is any
module path; NNX's trailing ``.value`` / ``.raw_value`` is ignored):

* ``nnx.LoRALinear``: ``X.kernel`` with ``X.lora.lora_a`` / ``X.lora.lora_b``;
* ``nnx.LoRA(base_module=...)``: ``X.base_module.kernel`` with ``X.lora_a`` / ``X.lora_b``;
* factors beside the kernel: ``X.kernel`` with ``X.lora_a`` / ``X.lora_b`` (also ``lora_A``/``lora_B``).

The kernel is read as matrices through its :class:`~jmerge.MatrixView` (a ``DenseGeneral`` kernel
``(in, heads, head_dim)`` is one ``in x (heads*head_dim)`` matrix, a scan-stacked ``(L, in, out)`` kernel L
matrices, whose factors carry the same leading axes); factors may keep the kernel's fan-in / fan-out axes
unflattened (``lora_b`` ``(r, heads, head_dim)``). The update is computed in float32 and the sum rounded
once to the kernel's dtype. The factors may sit in the base tree itself (a model built with LoRA layers)
or in a separate tree with the same paths (an adapter saved on its own).

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Flax NNX
``nnx.LoRA`` / ``nnx.LoRALinear`` (parameters ``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..core import MatrixView, MergeInputError, infer_views, leaves_with_paths, path_str
from ..core.views import variable_path

__all__ = ["FlaxLoraPair", "find_flax_loras", "flax_lora_deltas", "merge_flax_lora"]

_A_NAMES = ("lora_a", "lora_A")
_B_NAMES = ("lora_b", "lora_B")


@dataclasses.dataclass(frozen=True)
class FlaxLoraPair:
    """One LoRA of a Flax tree: the kernel it adapts and its two factors (dotted paths).

    References: Flax NNX ``nnx.LoRA``.
    """

    kernel: str
    a: str
    b: str


def find_flax_loras(lora_paths: list[str], kernel_paths: list[str]) -> list[FlaxLoraPair]:
    """Pair LoRA factor paths with the kernels they adapt (the layouts of the module docstring).

    Args:
      lora_paths: dotted paths of the tree holding the factors (other paths are ignored).
      kernel_paths: dotted paths of the base tree.

    Raises:
      MergeInputError: a factor without its partner, or whose kernel is not in the base tree (naming the path).

    References: Flax NNX ``nnx.LoRA`` / ``nnx.LoRALinear``.
    """
    kernels = {variable_path(p): p for p in kernel_paths}
    groups: dict[str, dict[str, str]] = {}
    for p in lora_paths:
        q = variable_path(p)
        parent, _, name = q.rpartition(".")
        if name in _A_NAMES:
            groups.setdefault(parent, {})["a"] = p
        elif name in _B_NAMES:
            groups.setdefault(parent, {})["b"] = p
    pairs = []
    for parent, g in sorted(groups.items()):
        if set(g) != {"a", "b"}:
            have = g.get("a") or g.get("b")
            raise MergeInputError(f"Flax LoRA factor '{have}' has no partner ({'lora_b' if 'a' in g else 'lora_a'} "
                                  f"missing under '{parent}'); give both factors of each LoRA")
        join = lambda *parts: ".".join(x for x in parts if x)  # noqa: E731
        looked = [join(parent, "base_module", "kernel"), join(parent, "kernel")]
        if parent == "lora" or parent.endswith(".lora"):  # nnx.LoRALinear: X.kernel beside X.lora
            looked.insert(0, join(parent[:-len("lora")].rstrip("."), "kernel"))
        cands = [kernels[c] for c in looked if c in kernels]
        if not cands:
            raise MergeInputError(f"Flax LoRA '{parent or '(top level)'}' ({g['a']}, {g['b']}): no kernel to adapt in "
                                  f"the base tree (looked for {', '.join(repr(c) for c in looked)}); use the base the "
                                  "LoRA was trained on")
        pairs.append(FlaxLoraPair(cands[0], g["a"], g["b"]))
    return pairs


def _as_factors(a, b, kernel_shape, view: MatrixView, pair: FlaxLoraPair):
    """``(B, m, r)`` and ``(B, r, n)`` float32 factors of one LoRA, checked against the kernel's view."""
    nb, m, n = view.matrix_shape(tuple(kernel_shape))
    a, b = jnp.asarray(a), jnp.asarray(b)
    batch = tuple(kernel_shape[i] for i in view.batch)
    where = f"kernel '{pair.kernel}' {tuple(kernel_shape)} (fan-in {m}, fan-out {n}"
    where += f", {nb} stacked matrices)" if nb > 1 else ")"
    nlead = len(batch)
    if a.ndim < nlead + 2 or b.ndim < nlead + 2 or tuple(a.shape[:nlead]) != batch or tuple(b.shape[:nlead]) != batch:
        raise MergeInputError(f"Flax LoRA '{pair.a}' {tuple(a.shape)} / '{pair.b}' {tuple(b.shape)} does not fit {where}: "
                              "factors need the kernel's stacked axes first; use the base the LoRA was trained on")
    r = a.shape[-1]
    if b.shape[nlead] != r:
        raise MergeInputError(f"Flax LoRA '{pair.a}' {tuple(a.shape)} and '{pair.b}' {tuple(b.shape)}: rank {r} vs "
                              f"{b.shape[nlead]} (lora_a is (fan_in, r), lora_b (r, fan_out))")
    if r > min(m, n):
        raise MergeInputError(f"Flax LoRA '{pair.a}': rank {r} is larger than {where} allows (min = {min(m, n)})")
    if math.prod(a.shape[nlead:-1]) != m or math.prod(b.shape[nlead + 1:]) != n:
        raise MergeInputError(f"Flax LoRA '{pair.a}' {tuple(a.shape)} / '{pair.b}' {tuple(b.shape)} does not fit "
                              f"{where}: lora_a must be (fan_in={m}, r), lora_b (r, fan_out={n}); use the base the "
                              "LoRA was trained on")
    return (a.reshape((nb, m, r)).astype(jnp.float32), b.reshape((nb, r, n)).astype(jnp.float32))


def _views(paths, shapes, views):
    return dict(zip(paths, infer_views(paths, shapes, views)))


def flax_lora_deltas(base: Any, lora: Optional[Any] = None, *, scale: float = 1.0, views: Any = None
                     ) -> dict[str, jax.Array]:
    """The float32 update ``scale · lora_a @ lora_b`` of every adapted kernel, shaped like the kernel.

    Args:
      base: the Flax parameter tree (nested dicts, ``nnx.State`` ...).
      lora: the tree holding the factors (default: ``base`` itself).
      scale: multiplies every update (``flax.nnx.LoRA`` uses 1; PEFT-style ``alpha / r`` if trained so).
      views: matrix-view overrides, as :func:`jmerge.merge`'s ``views``.

    Returns:
      ``{kernel path: update}``.

    Raises:
      MergeInputError: a factor pair that does not fit its kernel (naming both paths and shapes), a rank
        larger than the kernel's matrix, a factor without partner or kernel.

    References: Hu et al., "LoRA" (ICLR 2022); Flax NNX ``nnx.LoRA``.
    """
    paths, leaves, _ = leaves_with_paths(base)
    by_path = dict(zip(paths, leaves))
    lpaths, lleaves, _ = leaves_with_paths(base if lora is None else lora)
    lby = dict(zip(lpaths, lleaves))
    pairs = find_flax_loras(lpaths, paths)
    if not pairs:
        raise MergeInputError("no Flax LoRA factors (lora_a / lora_b) found" + ("" if lora is None else " in the LoRA tree"))
    vs = _views(paths, [np.shape(x) for x in leaves], views)  # siblings (biases) inform DenseGeneral kernels
    out = {}
    for pair in pairs:
        k = by_path[pair.kernel]
        view = vs[pair.kernel]
        if view is None:
            raise MergeInputError(f"Flax LoRA '{pair.a}': kernel '{pair.kernel}' {tuple(np.shape(k))} is not a matrix")
        a, b = _as_factors(lby[pair.a], lby[pair.b], np.shape(k), view, pair)
        out[pair.kernel] = view.from_matrices(jnp.float32(scale) * (a @ b), np.shape(k))
    return out


def merge_flax_lora(base: Any, lora: Optional[Any] = None, *, scale: float = 1.0, views: Any = None,
                    zero_factors: bool = True) -> Any:
    """``base`` with every adapted kernel replaced by ``kernel + scale · lora_a @ lora_b`` (a new tree).

    The sum is computed in float32 and rounded once to the kernel's dtype. When the factors live in
    ``base`` (a model built with ``nnx.LoRALinear``), ``zero_factors`` sets its ``lora_b`` to zeros, so the
    returned tree still runs through the LoRA layers with the same outputs (the update is not applied
    twice); a separate ``lora`` tree is not changed. Nothing is modified in place.

    Args:
      base: the Flax parameter tree.
      lora: the tree holding the factors (default: ``base``).
      scale: multiplies every update.
      views: matrix-view overrides.
      zero_factors: zero ``lora_b`` in the returned tree when the factors are in ``base``.

    Raises:
      MergeInputError: as :func:`flax_lora_deltas`.

    References: Hu et al., "LoRA" (ICLR 2022); Flax NNX ``nnx.LoRALinear``.
    """
    deltas = flax_lora_deltas(base, lora, scale=scale, views=views)
    zero = set()
    if lora is None and zero_factors:
        lpaths, _, _ = leaves_with_paths(base)
        zero = {p.b for p in find_flax_loras(lpaths, lpaths)}

    def update(keypath, x):
        p = path_str(keypath)
        if p in deltas:
            x = jnp.asarray(x)
            return (x.astype(jnp.float32) + deltas[p]).astype(x.dtype)
        if p in zero:
            return jnp.zeros_like(x)
        return x

    return jax.tree_util.tree_map_with_path(update, base)
