"""The per-leaf state that merge steps transform.

References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Shaped

from .views import MatrixView

__all__ = ["MergeState", "diff_rows"]


def diff_rows(base_leaf: Shaped[ArrayLike, "*shape"], model_leaves: Sequence[Shaped[ArrayLike, "*shape"]],
              guard: Callable[[Any], Any] = lambda a: a) -> list[Float[Array, "*shape"]]:
    """The rows of ``tau``: ``float32(model_t) - float32(base)``, each input passed through ``guard``.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) for task vectors.
    """
    b = jnp.asarray(guard(base_leaf), jnp.float32)
    return [jnp.asarray(guard(m), jnp.float32) - b for m in model_leaves]


def stack_diffs(base_leaf: Shaped[ArrayLike, "*shape"],
                model_leaves: Sequence[Shaped[ArrayLike, "*shape"]]) -> Float[Array, "T *shape"]:
    """``tau`` as one ``(T, *shape)`` float32 array. Differences first, then the stack: XLA builds
    ``tau`` in one fusion instead of materializing the stacked models and subtracting later."""
    return jnp.stack(diff_rows(base_leaf, model_leaves))


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

    @property
    def num_models(self) -> int:
        return self.tau.shape[0]

    def tau_rebuild(self) -> Callable[[Callable[[Any], Any]], list[Float[Array, "*shape"]]] | None:
        """While ``tau`` is still ``models - base`` as built: ``guard -> [tau[0], ..., tau[T-1]]``, the
        rows recomputed from the original leaves, each leaf wrapped in ``guard``; else None. A step
        that reads ``tau`` in a loop recomputes it this way instead of materializing it."""
        if self.source is None or self.source[0] is not self.tau or self.source[1] is None:
            return None
        _, base_leaf, model_leaves = self.source
        return lambda guard: diff_rows(base_leaf, model_leaves, guard)

    def raw_tau(self) -> Float[Array, "T *shape"]:
        """The task vectors as given to the merge (before any step changed ``tau``)."""
        if self.source is None:
            return self.tau
        tau0, base_leaf, model_leaves = self.source
        return tau0 if base_leaf is None else stack_diffs(base_leaf, model_leaves)

    def models(self) -> Float[Array, "T *shape"]:
        """The fine-tuned leaves ``base + tau`` as a ``(T, *shape)`` float32 array."""
        return self.base[None] + self.tau

    def replace(self, **kw: Any) -> "MergeState":
        return dataclasses.replace(self, **kw)
