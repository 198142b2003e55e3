"""Matrix views of parameter leaves: which axes are fan-in, which are fan-out, which are a batch.

Methods that work on matrices (SVD-based merges such as TSV-M, ISO-C, ISO-CTS) need each leaf as
the matrix the layer applies, not as its storage layout. A :class:`MatrixView` says how to read a
leaf as a batch of ``(fan_in, fan_out)`` matrices; ``None`` means the leaf is a vector (biases,
norm scales, scalars), which those methods merge by averaging.

Inferred without hints (:func:`infer_views`) for:

* Flax linen / NNX ``Dense``/``Linear`` kernels ``(in, out)``;
* ``DenseGeneral``/``LinearGeneral`` kernels ``(*in, *out)``: the fan-out axes are those of the sibling
  bias (``bias.shape == kernel.shape[-bias.ndim:]``); without a bias, by module name;
* ``MultiHeadDotProductAttention``/``MultiHeadAttention``: ``query``/``key``/``value`` kernels
  ``(in, heads, head_dim)`` are ``in x (heads*head_dim)``; the ``out`` kernel ``(heads, head_dim, out)``
  is ``(heads*head_dim) x out``; their ``(heads, head_dim)`` biases are vectors;
* ``Conv`` kernels ``(*window, in, out)``: ``(window*in) x out``;
* ``Embed`` tables ``(vocab, features)``;
* Hugging Face ``Linear`` weights ``(out, in)`` (and GPT-2 ``Conv1D`` weights ``(in, out)``), conv
  weights ``(out, in, *window)``, embedding tables;
* scan-stacked kernels ``(L, in, out)`` (a bias ``(L, out)`` beside them): a batch of L matrices.

Any other leaf of three or more dimensions is read as a batch over its leading axes of matrices over
its last two. Override per path with ``Rules`` of :class:`MatrixView` (or ``None``) values, a mapping
``{path: view}`` or a callable ``f(path, shape) -> view``.

References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR 2025) and Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025), whose operators act on these matrices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .errors import MergeInputError

__all__ = ["MatrixView", "infer_views", "infer_view", "leaf_name", "variable_path"]


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How to read a leaf as matrices: axes ``batch`` index the matrices, ``fan_in`` axes are
    flattened into rows and ``fan_out`` axes into columns (row-major, in the order given).

    ``MatrixView(fan_in=(0,), fan_out=(1, 2))`` reads a ``(in, heads, head_dim)`` query kernel as an
    ``in x (heads*head_dim)`` matrix.

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025);
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
    (ICML 2025), whose operators act on these matrices.
    """

    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]
    batch: tuple[int, ...] = ()

    def __post_init__(self):
        for f in ("fan_in", "fan_out", "batch"):
            object.__setattr__(self, f, tuple(int(a) for a in getattr(self, f)))
        if not self.fan_in or not self.fan_out:
            raise MergeInputError(f"MatrixView needs at least one fan-in and one fan-out axis, got {self}.")

    @property
    def axes(self) -> tuple[int, ...]:
        return self.batch + self.fan_in + self.fan_out

    def check(self, shape: Sequence[int], path: str = "") -> None:
        """Raise unless the view's axes are a permutation of ``range(len(shape))``."""
        if sorted(self.axes) != list(range(len(shape))):
            raise MergeInputError(f"leaf '{path}': matrix view {self} does not cover the axes of shape "
                                  f"{tuple(shape)} exactly once; give each axis to batch, fan_in or fan_out.")

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """``(batch, rows, cols)`` of a leaf of ``shape`` under this view."""
        sz = lambda ax: math.prod(int(shape[a]) for a in ax)
        return sz(self.batch), sz(self.fan_in), sz(self.fan_out)

    def to_matrices(self, x: Float[Array, "*lead leaf"], lead: int = 0) -> Float[Array, "*lead b m n"]:
        """``x`` (with ``lead`` extra leading axes, e.g. the model axis) as ``(*lead, batch, rows, cols)``."""
        shape = x.shape[lead:]
        perm = tuple(range(lead)) + tuple(lead + a for a in self.axes)
        return jnp.transpose(x, perm).reshape(x.shape[:lead] + self.matrix_shape(shape))

    def from_matrices(self, m: Float[Array, "*lead b m n"], shape: Sequence[int]) -> Float[Array, "*lead leaf"]:
        """Inverse of :meth:`to_matrices`: back to a leaf of ``shape`` (leading axes kept)."""
        lead = m.ndim - 3
        perm_shape = tuple(int(shape[a]) for a in self.axes)
        y = m.reshape(m.shape[:lead] + perm_shape)
        inv = np.argsort(self.axes)
        return jnp.transpose(y, tuple(range(lead)) + tuple(lead + int(a) for a in inv))


def leaf_name(path: str) -> tuple[str, str]:
    """``(parent module, leaf name)`` of a dotted path, ignoring Flax NNX's trailing ``value``.

    References: none (infrastructure).
    """
    parts = variable_path(path).split(".")
    return (".".join(parts[:-1]), parts[-1])


def variable_path(path: str) -> str:
    """A dotted leaf path without Flax NNX's trailing variable attribute (``.value`` / ``.raw_value``).

    References: none (infrastructure).
    """
    for suffix in (".value", ".raw_value"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


_ATTN_IN = re.compile(r"(^|[._])(query|key|value|q|k|v|q_proj|k_proj|v_proj|qkv)$")
_ATTN_OUT = re.compile(r"(^|[._])(out|o|o_proj|out_proj|attn_out)$")
_CONV1D_HF = re.compile(r"(^|\.)(c_attn|c_fc|c_proj)$")  # GPT-2's Conv1D stores (in, out)
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings|embedding")


def _tail(n: int, k: int) -> tuple[int, ...]:
    return tuple(range(n - k, n))


def _default(ndim: int) -> MatrixView:
    return MatrixView(fan_in=(ndim - 2,), fan_out=(ndim - 1,), batch=tuple(range(ndim - 2)))


def _kernel_view(parent: str, shape: tuple, bias: tuple | None) -> MatrixView:
    n = len(shape)
    if bias is not None and 0 < len(bias) < n:
        b = len(bias)
        if tuple(shape[-b:]) == tuple(bias):  # (*in, *out) with bias (*out,)
            return MatrixView(fan_in=tuple(range(n - b)), fan_out=_tail(n, b))
        if b >= 2 and shape[0] == bias[0] and tuple(shape[-(b - 1):]) == tuple(bias[1:]):  # scan: (L, *in, *out)
            return MatrixView(fan_in=tuple(range(1, n - b + 1)), fan_out=_tail(n, b - 1), batch=(0,))
    last = parent.split(".")[-1] if parent else ""
    if n == 3 and _ATTN_IN.search(last):
        return MatrixView(fan_in=(0,), fan_out=(1, 2))
    if n == 3 and _ATTN_OUT.search(last):
        return MatrixView(fan_in=(0, 1), fan_out=(2,))
    if n >= 3 and ("conv" in last.lower() or n == 4):
        return MatrixView(fan_in=tuple(range(n - 1)), fan_out=(n - 1,))
    return _default(n)


def _hf_weight_view(parent: str, shape: tuple) -> MatrixView:
    n = len(shape)
    if n == 2:
        if _CONV1D_HF.search(parent) or _EMBED.search(parent):
            return MatrixView(fan_in=(0,), fan_out=(1,))
        return MatrixView(fan_in=(1,), fan_out=(0,))  # torch Linear: (out, in)
    if n >= 3 and "conv" in parent.lower():
        return MatrixView(fan_in=tuple(range(1, n)), fan_out=(0,))  # torch Conv: (out, in, *window)
    return _default(n)


def infer_view(path: str, shape: Sequence[int], siblings: Mapping[str, tuple] | None = None) -> MatrixView | None:
    """The matrix view of one leaf from its path, shape and (optionally) the shapes of the other
    leaves of its module (``{leaf name: shape}``); ``None`` for vectors. See the module docstring.

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025);
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
    (ICML 2025), whose operators act on these matrices.
    """
    shape = tuple(int(s) for s in shape)
    parent, name = leaf_name(path)
    low = name.lower()
    if len(shape) < 2 or "bias" in low or low in ("b", "scale", "gamma", "beta"):
        return None
    if low == "kernel":
        bias = (siblings or {}).get("bias")
        return _kernel_view(parent, shape, None if bias is None else tuple(bias))
    if low == "embedding":
        return MatrixView(fan_in=(0,), fan_out=(1,)) if len(shape) == 2 else _default(len(shape))
    if low == "weight":
        return _hf_weight_view(parent, shape)
    if len(shape) == 2:
        return MatrixView(fan_in=(0,), fan_out=(1,))
    return _default(len(shape))


ViewSpec = Any  # Rules of MatrixView/None, {path: view}, or callable(path, shape) -> view


def _override(spec: ViewSpec, path: str, shape: tuple, inferred):
    from .hparams import Rules, _matches  # noqa: PLC0415 - same package; avoids a module cycle
    if spec is None:
        return inferred
    if isinstance(spec, Rules):
        for f, v in spec.rules:
            if _matches(f, path):
                return v
        return inferred if spec.default is None else spec.default
    if isinstance(spec, Mapping):
        return spec.get(path, inferred)
    if callable(spec):
        return spec(path, shape)
    raise MergeInputError(f"views: give Rules([(filter, MatrixView | None), ...]), a mapping {{path: view}} or a "
                          f"callable f(path, shape); got {type(spec).__name__}.")


def infer_views(paths: Sequence[str], shapes: Sequence[Sequence[int]], overrides: ViewSpec = None
                ) -> list[MatrixView | None]:
    """Matrix views of all leaves (siblings inform DenseGeneral kernels), with optional overrides.

    Args:
      paths: leaf paths (dotted).
      shapes: leaf shapes.
      overrides: ``Rules`` whose values are :class:`MatrixView` or ``None`` (first matching filter
        wins; ``default=None`` keeps the inferred view), a mapping ``{path: view}``, or a callable
        ``f(path, shape) -> view``.

    Returns:
      One :class:`MatrixView` or ``None`` (vector) per leaf.

    Raises:
      MergeInputError: when an override does not fit its leaf's shape.

    References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025);
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
    (ICML 2025), whose operators act on these matrices.
    """
    modules: dict[str, dict[str, tuple]] = {}
    for p, s in zip(paths, shapes):
        parent, name = leaf_name(p)
        modules.setdefault(parent, {})[name] = tuple(int(x) for x in s)
    out = []
    for p, s in zip(paths, shapes):
        s = tuple(int(x) for x in s)
        v = infer_view(p, s, modules.get(leaf_name(p)[0]))
        v = _override(overrides, p, s, v)
        if v is not None:
            if not isinstance(v, MatrixView):
                raise MergeInputError(f"views: leaf '{p}' got {v!r}; give a MatrixView or None.")
            v.check(s, p)
        out.append(v)
    return out
