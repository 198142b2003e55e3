"""Reinforced Agent Merging (RAM) and its tensor-local RAM+ for sparse, heterogeneous task vectors.

Per entry, a model *contributes* when ``|τ_t| > epsilon``. An entry with several contributors is
*shared*: their task-vector values are averaged (non-contributors are left out of the mean). An entry
with exactly one contributor is *unique*: its value is kept whole (RAM) instead of being diluted by
the other models' zeros, or scaled up by that model's factor ``λ_t`` (RAM+). Entries nobody changed
keep the base. RAM+'s factor compares, per model and tensor, how many of the model's contributed
entries are shared and how many are unique: ``ρ_t = shared_t / max(unique_t, epsilon)`` and
``λ_t = 1 + r · clip(ρ_t, 0, alpha)``. ``ramplus_tl`` counts per tensor (leaf-local), as mergekit
0.1.5's method of that name. The results match mergekit 0.1.5's ``ram`` and ``ramplus_tl``
(``tests/test_methods_fusion_ram.py``, mergekit goldens).

References: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (arXiv:2601.13572,
2026).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..core import HParamSpec, MergeState, Transform, transform
from ..core.xla import counts as xla_counts

__all__ = ["ram", "ramplus_tl", "ram_contributors"]

_INF = float("inf")


def ram_contributors(tau: Float[Array, "T *shape"], epsilon: float | Float[Array, ""]
                     ) -> tuple[Bool[Array, "T *shape"], Int[Array, "*shape"]]:
    """RAM's contributor masks ``|τ_t| > epsilon`` and, per entry, the number of contributing models.

    References: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models"
    (arXiv:2601.13572, 2026).
    """
    tau = jnp.asarray(tau, jnp.float32)
    eps = jnp.asarray(epsilon, jnp.float32)
    nz = [jnp.abs(tau[t]) > eps for t in range(tau.shape[0])]
    count = nz[0].astype(jnp.int32)
    for m in nz[1:]:  # unrolled over models (see jmerge.core.model_sum)
        count = count + m.astype(jnp.int32)
    return jnp.stack(nz), count


def _ram(state: MergeState, hp, *, plus: bool) -> MergeState:
    T = state.num_models
    tau = state.tau
    eps = jnp.asarray(hp["epsilon"], jnp.float32)
    nz, count = ram_contributors(tau, eps)
    unique = count == 1
    shared = count > 1
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    if plus:
        r = jnp.asarray(hp["r"], jnp.float32)
        alpha = jnp.asarray(hp["alpha"], jnp.float32)
        # the 2T counts in one variadic integer reduction (exact; as 2T sums XLA:CPU wrote each mask to
        # memory and read the inputs 2T times)
        counts = xla_counts(*[nz[t] & shared for t in range(T)], *[nz[t] & unique for t in range(T)])
        lams = []
        for t in range(T):
            n_shared = counts[t].astype(jnp.float32)
            n_unique = counts[T + t].astype(jnp.float32)
            rho = n_shared / jnp.maximum(n_unique, eps)
            lams.append(1.0 + r * jnp.minimum(jnp.maximum(rho, 0.0), alpha))
    merged = None
    for t in range(T):
        v = jnp.where(nz[t], tau[t], 0.0)
        u = v * lams[t] if plus else v
        c = jnp.where(unique, u, jnp.where(shared, v / denom, 0.0))
        merged = c if merged is None else merged + c
    extras = {**state.extras, "ram_contributors": nz}
    if plus:
        extras["ram_lambda"] = jnp.stack(lams)
    return state.replace(merged=merged, extras=extras)


# each entry from the same entries alone, except RAM+'s per-tensor counts (read by jmerge.core.chunks.entrywise)
_ram.entrywise = lambda step: not dict(step.static).get("plus", False)


def ram(epsilon: HParamSpec = 1e-5) -> Transform:
    """RAM: average the shared task-vector entries over their contributors, keep the unique ones whole.

    Per entry, model ``t`` contributes when ``|τ_t| > epsilon``; with ``c`` contributors,
    ``τ = Σ_t [|τ_t| > epsilon] τ_t / max(c, 1)``, so an entry one model changed keeps that model's
    value and one nobody changed keeps the base. The contributor masks are returned as
    ``extras["ram_contributors"]``.

    Args:
      epsilon: magnitude above which a task-vector entry counts as changed (mergekit's default 1e-5).

    References: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models"
    (arXiv:2601.13572, 2026).
    """
    return transform("ram", _ram, hparams={"epsilon": epsilon}, static={"plus": False},
                     ranges={"epsilon": (0.0, _INF)})


def ramplus_tl(r: HParamSpec = 0.1, alpha: HParamSpec = 0.2, epsilon: HParamSpec = 1e-5) -> Transform:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled up by ``λ_t``.

    Per tensor and model: ``shared_t`` and ``unique_t`` count the entries model ``t`` contributes
    (``|τ_t| > epsilon``) that other models also change, or that only it changes;
    ``ρ_t = shared_t / max(unique_t, epsilon)`` and ``λ_t = 1 + r · clip(ρ_t, 0, alpha)``. Unique entries
    become ``λ_t τ_t``; shared entries are averaged over their contributors as in :func:`ram`. The
    factors are returned as ``extras["ram_lambda"]`` (shape ``(T,)``). The counts are per tensor
    (mergekit's ``ramplus_tl``), not over the whole model.

    Args:
      r: strength of the rescaling.
      alpha: cap on the overlap ratio ``ρ_t`` (so ``λ_t <= 1 + r · alpha``).
      epsilon: magnitude above which a task-vector entry counts as changed.

    References: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models"
    (arXiv:2601.13572, 2026).
    """
    return transform("ramplus_tl", _ram, hparams={"r": r, "alpha": alpha, "epsilon": epsilon},
                     static={"plus": True},
                     ranges={"r": (0.0, _INF), "alpha": (0.0, _INF), "epsilon": (0.0, _INF)})


METHODS = {"ram": ram, "ramplus_tl": ramplus_tl}
