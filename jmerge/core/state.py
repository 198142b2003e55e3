"""The per-leaf state that merge steps transform, and the compute precision of a merge.

A merge computes in float32 (exactly: bf16/fp16 inputs and their differences are exact in float32),
or emulates a narrower compute dtype (``"bfloat16"``, ``"float16"``): the math stays float32 but
values are rounded to the dtype where an implementation computing in that dtype rounds them
(mergekit casts every input to its config's ``dtype`` and runs each torch operation in it). The core
rounds the inputs, the task vectors ``model - base`` and the merged output; steps round their own
intermediates with :meth:`MergeState.rounded`, which is the identity when computing in float32.

References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

from .errors import MergeInputError
from .views import MatrixView

__all__ = ["MergeState", "diff_rows", "diff_stack", "compute_precision", "round_to", "EMULATED_DTYPES"]

EMULATED_DTYPES = ("bfloat16", "float16")
"""Compute dtypes narrower than float32 that a merge emulates (float32 math rounded to the dtype)."""

_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32",
                "float64": "float64", "fp64": "float64", "double": "float64"}


def compute_precision(compute_dtype: Any) -> str | None:
    """The precision a merge runs in for ``compute_dtype``: None for float32 (``None`` too), else the
    emulated dtype's name (``"bfloat16"`` or ``"float16"``).

    Raises:
      MergeInputError: for float64 (jmerge computes in float32 at most: its exact top-k keys,
        whole-model statistics and resolved hyperparameters are float32, so a float64 run would be
        float32 arithmetic in disguise) and for any other dtype.

    References: Micikevicius et al., "Mixed Precision Training" (ICLR 2018) for reduced-precision compute.
    """
    if compute_dtype is None:
        return None
    name = _DTYPE_NAMES.get(str(compute_dtype)) if isinstance(compute_dtype, str) else None
    if name is None:
        try:
            name = jnp.dtype(compute_dtype).name
        except TypeError:
            name = str(compute_dtype)
    if name == "float32":
        return None
    if name in EMULATED_DTYPES:
        return name
    if name == "float64":
        raise MergeInputError("compute dtype float64 is not supported: jmerge computes in float32 at most (its top-k "
                              "keys, statistics and hyperparameters are float32); compute in float32 and write "
                              "float64 outputs (out_dtype) instead.")
    raise MergeInputError(f"compute dtype {compute_dtype!r} is not supported; use float32, bfloat16 or float16.")


def round_to(x: ArrayLike, precision: str | None) -> Float[Array, "..."]:
    """``x`` as float32, rounded to ``precision`` (the value of a cast to that dtype: round to nearest
    even, float16 subnormals and overflow to infinity included); unchanged for ``None``.

    A cast there and back (``x.astype(bfloat16).astype(float32)``) is not used: XLA may drop such a
    pair inside a fusion (it allows excess precision), so the rounding would silently not happen.
    ``lax.reduce_precision`` is kept; it flushes float16 subnormals, which are rounded to multiples
    of ``2**-24`` separately.

    References: IEEE 754-2019 (roundTiesToEven).
    """
    x = jnp.asarray(x, jnp.float32)
    if precision is None:
        return x
    if precision == "bfloat16":
        return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if precision == "float16":
        sub = jnp.abs(x) < 2.0 ** -14
        return jnp.where(sub, jnp.round(x * 2.0 ** 24) * 2.0 ** -24, lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10))
    raise MergeInputError(f"cannot round to {precision!r}; emulated compute dtypes are {EMULATED_DTYPES}.")


def diff_rows(base_leaf: Shaped[ArrayLike, "*shape"], model_leaves: Sequence[Shaped[ArrayLike, "*shape"]],
              guard: Callable[[Any], Any] = lambda a: a, precision: str | None = None,
              form: Literal["m-b", "m+(-b)", "b-m"] = "m-b") -> list[Float[Array, "*shape"]]:
    """The rows of ``tau``: ``float32(model_t) - float32(base)``, each input passed through ``guard``.

    With an emulated ``precision`` the inputs and each difference are rounded to it (the task vector
    as computed in that dtype). ``form`` picks the expression: ``"m+(-b)"`` has the same bits as
    ``"m-b"``; ``"b-m"`` is ``-tau_t`` bit for bit (rounding to nearest is symmetric) except that a zero
    is ``+0``. Passes that read tau through different forms do not share it: with one expression in
    two passes, XLA:CPU writes it to memory once (fresh pages) and reads it in each.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
    """
    b = round_to(guard(base_leaf), precision)
    if form == "b-m":
        return [round_to(b - round_to(guard(m), precision), precision) for m in model_leaves]
    if form == "m+(-b)":
        return [round_to(round_to(guard(m), precision) + (-b), precision) for m in model_leaves]
    return [round_to(round_to(guard(m), precision) - b, precision) for m in model_leaves]


def stack_diffs(base_leaf: Shaped[ArrayLike, "*shape"], model_leaves: Sequence[Shaped[ArrayLike, "*shape"]],
                precision: str | None = None) -> Float[Array, "T *shape"]:
    """``tau`` as one ``(T, *shape)`` float32 array. Differences first, then the stack: XLA builds
    ``tau`` in one fusion instead of materializing the stacked models and subtracting later."""
    return jnp.stack(diff_rows(base_leaf, model_leaves, precision=precision))


def diff_stack(base_leaf: Shaped[ArrayLike, "*shape"], models: Shaped[ArrayLike, "T *shape"],
               precision: str | None = None) -> Float[Array, "T *shape"]:
    """``tau`` from the models stacked in one ``(T, *shape)`` array: the values of :func:`stack_diffs`
    (the same rounding, entry by entry), as one elementwise expression of the stacked input, which XLA
    fuses into every consumer (slices included) instead of materializing a concatenation of the rows.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
    """
    b = round_to(base_leaf, precision)
    return round_to(round_to(models, precision) - b[None], precision)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MergeState:
    """Per-leaf state threaded through the steps of a merge.

    Attributes:
      tau: ``(T, *shape)`` float32 task vectors (after any sparsification so far).
      base: ``(*shape)`` float32 base parameters.
      merged: ``(*shape)`` float32 merged task vector, or None before aggregation.
      key: PRNG key of this leaf (from the seed and the leaf path).
      stats: whole-model statistics of the running step, by phase name.
      extras: named per-leaf outputs (masks, rescalers ...) returned with ``return_extras=True``.
      source: ``(tau0, base_leaf, model_leaves)``: the task vectors as first built and the raw inputs
        (``base_leaf`` and ``model_leaves`` are None when stacked task vectors were given).
      view: the leaf's matrix view (fan-in x fan-out axes), or None for vectors; static.
      precision: None (float32) or the emulated compute dtype (``"bfloat16"``, ``"float16"``); static.
        ``tau``, ``base`` and the raw inputs are then rounded to it; see :meth:`rounded`.
      offset: where the leaf is a block of a larger tensor's entries (the out-of-core executor's blocks of
        rows), the flat index of its first entry in that tensor (a uint32 scalar), else None: random draws
        keyed by flat index (DARE's) add it, so a block draws the whole tensor's bits at its entries.
      whole: with ``offset``, the entries of that whole tensor (static), else None.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
    """

    tau: Float[Array, "T *shape"]
    base: Float[Array, "*shape"]
    merged: Float[Array, "*shape"] | None
    key: Any
    stats: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)
    source: tuple | None = None
    view: MatrixView | None = dataclasses.field(default=None, metadata=dict(static=True))
    precision: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    offset: Any = None
    whole: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_models(self) -> int:
        return self.tau.shape[0]

    def rounded(self, x: ArrayLike) -> Float[Array, "..."]:
        """``x`` rounded to the emulated compute dtype, where an implementation computing in that dtype
        rounds a result (after each arithmetic operation or reduction); ``x`` itself in float32."""
        return x if self.precision is None else round_to(x, self.precision)

    def tau_rebuild(self, form: Literal["m-b", "m+(-b)", "b-m"] = "m-b"
                    ) -> Callable[[Callable[[Any], Any]], list[Float[Array, "*shape"]]] | None:
        """While ``tau`` is still ``models - base`` as built: ``guard -> [tau[0], ..., tau[T-1]]``, the
        rows recomputed from the original leaves, each leaf wrapped in ``guard``; else None. A step
        that reads ``tau`` in a loop recomputes it this way instead of materializing it. ``form`` as in
        :func:`diff_rows` (``"b-m"``: ``-tau``, for statistics that cannot tell ``x`` from ``-x``)."""
        if self.source is None or self.source[0] is not self.tau or self.source[1] is None:
            return None
        _, base_leaf, model_leaves = self.source
        return lambda guard: diff_rows(base_leaf, model_leaves, guard, self.precision, form)

    def tau_rows(self, form: Literal["m-b", "m+(-b)", "b-m"] = "m-b") -> list[Float[Array, "*shape"]]:
        """The rows of ``tau``: recomputed from the inputs while tau is as built (in ``form``, see
        :meth:`tau_rebuild`), else its slices. A step that works row by row and stacks its results lets a
        later step's row fold into the expression that built it (XLA:CPU writes the whole stack, models x
        leaf, when an op takes it whole)."""
        rebuild = self.tau_rebuild(form)
        return rebuild(lambda a: a) if rebuild is not None else [self.tau[t] for t in range(self.num_models)]

    def raw_tau(self) -> Float[Array, "T *shape"]:
        """The task vectors as given to the merge (before any step changed ``tau``)."""
        if self.source is None:
            return self.tau
        tau0, base_leaf, model_leaves = self.source
        return tau0 if base_leaf is None else stack_diffs(base_leaf, model_leaves, self.precision)

    def models(self) -> Float[Array, "T *shape"]:
        """The fine-tuned leaves ``base + tau`` as a ``(T, *shape)`` float32 array. With an emulated
        precision and ``tau`` as built, the (rounded) inputs themselves: ``base + tau`` would add the
        rounding error of the task vectors."""
        if self.precision is not None and self.source is not None and self.source[0] is self.tau \
                and self.source[1] is not None:
            return jnp.stack([round_to(m, self.precision) for m in self.source[2]])
        return self.base[None] + self.tau

    def model_rows(self) -> list[Float[Array, "*shape"]]:
        """The fine-tuned leaves as float32, row by row (never stacked): while ``tau`` is as built, the
        inputs themselves (rounded to an emulated precision, as :meth:`models`; in float32 they can
        differ from ``base + tau`` in the last bit), else ``base + tau``'s rows. Read in several passes,
        the inputs are read again; ``base + tau`` would be written to memory once first."""
        if self.source is not None and self.source[0] is self.tau and self.source[1] is not None:
            return [round_to(jnp.asarray(m, jnp.float32), self.precision) for m in self.source[2]]
        return [self.base + t for t in self.tau_rows()]

    def replace(self, **kw: Any) -> "MergeState":
        return dataclasses.replace(self, **kw)
