"""Exact top-k selection by magnitude (placeholder: argsort; to be replaced by a sort-free version).

Interface contract (other modules rely on it):

* ``topk_mask(x, k)``: bool mask of ``x``'s shape with exactly ``k`` True entries at the ``k``
  largest values of ``x`` (flattened); ties broken by the lowest flat index. ``k`` may be a traced
  integer scalar; ``k <= 0`` gives all False, ``k >= x.size`` all True.
* ``density_to_k(density, n)``: ``round(density * n)`` as int32 (traced-friendly).
* ``global_topk_phases(name, density_key)``: StatsPhases computing, over all leaves, the per-task
  global top-k of ``|state.tau|`` (k = density * total size of each task vector). After them,
  ``global_topk_mask(state, name)`` returns this leaf's ``(T, *shape)`` bool mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._core import MergeState, StatsPhase

__all__ = ["topk_mask", "density_to_k"]


def density_to_k(density, n: int) -> jax.Array:
    return jnp.round(jnp.asarray(density, jnp.float32) * n).astype(jnp.int32)


def topk_mask(x: jax.Array, k) -> jax.Array:
    flat = x.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < k).reshape(x.shape)


def global_topk_phases(name: str = "global_topk", density_key: str = "density"):
    def collect(state: MergeState, hp):
        return jnp.abs(state.tau).reshape(state.tau.shape[0], -1)

    def finalize(collected, hps):
        T = collected[0].shape[0]
        allv = np.concatenate([np.asarray(c) for c in collected], axis=1)
        dens = np.broadcast_to(np.asarray(hps[0][density_key], np.float32), (T,))
        out = [np.zeros(np.shape(c), bool) for c in collected]
        sizes = [c.shape[1] for c in collected]
        offs = np.cumsum([0] + sizes)
        for t in range(T):
            k = int(np.round(dens[t] * allv.shape[1]))
            order = np.argsort(-allv[t], kind="stable")[:k]
            m = np.zeros(allv.shape[1], bool)
            m[order] = True
            for i in range(len(collected)):
                out[i][t] = m[offs[i]:offs[i + 1]]
        return [jnp.asarray(o) for o in out]

    return (StatsPhase(name, collect, finalize),)


def global_topk_mask(state: MergeState, name: str = "global_topk") -> jax.Array:
    return state.stats[name].reshape(state.tau.shape)
