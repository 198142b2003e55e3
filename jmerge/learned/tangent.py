"""Tangent-space (linearised) models for task arithmetic in the tangent space."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..core import check_compatible

__all__ = ["linearize"]


def linearize(apply_fn: Callable[[Any, Any], Any], params0: Any) -> Callable[[Any, Any], Any]:
    """First-order Taylor expansion of a model around ``params0``.

    Returns ``apply_lin(params, batch) = f(theta_0, x) + J_theta f(theta_0, x) (theta - theta_0)``,
    computed with one ``jax.jvp`` (no Jacobian is materialised). Fine-tune ``params`` through
    ``apply_lin`` (it is differentiable and jittable), then merge the resulting task vectors with task
    arithmetic (``jmerge.merge(jmerge.task_arithmetic(...), params0, finetuned)``): in the tangent space
    the merged model's output is exactly the sum of the task vectors' output changes.

    Args:
      apply_fn: ``apply_fn(params, batch) -> outputs``.
      params0: the linearisation point (pretrained params).

    Returns:
      ``apply_lin(params, batch)``.

    References: Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space: Improved Editing of
    Pre-Trained Models" (NeurIPS 2023).
    """

    def apply_lin(params: Any, batch: Any) -> Any:
        check_compatible(params0, [params])
        delta = jax.tree.map(lambda p, p0: (jnp.asarray(p) - jnp.asarray(p0)).astype(jnp.asarray(p0).dtype),
                             params, params0)
        out, jvp = jax.jvp(lambda p: apply_fn(p, batch), (params0,), (delta,))
        return jax.tree.map(jnp.add, out, jvp)

    return apply_lin
