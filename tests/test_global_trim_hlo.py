"""Whole-model TIES (``ties(scope="global")``): the merge pass after the counting phases reads the models
and writes only its output (issue 14). The trim is built per row (``select.global_topk_keep``) and the
tie-cut conditional rebuilds ``tau`` from the inputs, so XLA writes neither the task vectors nor their stack.
The merged values are checked against a NumPy reference of the same thresholds.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

import jmerge
from jmerge.core import LeafProgram

from .test_xla_workarounds import _full_size_buffers

SHAPE = (256, 384)
N = math.prod(SHAPE)


def _inputs():
    rng = np.random.default_rng(0)
    b = rng.standard_normal(SHAPE).astype(np.float32)
    ms = tuple((b + 0.01 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(3))
    return b, ms


def _stats(tau: np.ndarray, keep: int):
    """Thresholds of a top-``keep`` per task with a tie cut inside the leaf (quota < eq forces the cut)."""
    keys = np.abs(tau).reshape(3, -1).view(np.int32)
    v = np.sort(keys, axis=1)[:, -keep]
    eq = np.sum(keys == v[:, None], axis=1)
    quota = keep - np.sum(keys > v[:, None], axis=1)
    return {"trim": {"trim_global_topk": {"v": jnp.asarray(v, jnp.int32), "quota": jnp.asarray(quota, jnp.int32),
                                          "eq": jnp.asarray(eq, jnp.int32)}}}


def test_global_ties_merge_pass_writes_only_its_output():
    b, ms = _inputs()
    tau = np.stack([m - b for m in ms])
    method = jmerge.ties(scope="global")
    prog = LeafProgram(method)
    hp = {k: jnp.float32(v) for k, v in method.defaults.items()}
    stats = _stats(tau, N // 5)
    f = jax.jit(lambda b, ms, hp, st: prog(b, ms, hp, jax.random.key(0), st, None, traced=True))
    txt = f.lower(b, ms, hp, stats).compile().as_text()
    assert _full_size_buffers(txt, N) == []

    # NumPy reference: keep |tau| above v (and the entries equal to v before the cut), elect, disjoint mean.
    st = stats["trim"]["trim_global_topk"]
    keys = np.abs(tau).reshape(3, -1).view(np.int32)
    v, quota = np.asarray(st["v"]), np.asarray(st["quota"])
    eqpos = np.cumsum(keys == v[:, None], axis=1)
    mask = (keys > v[:, None]) | ((keys == v[:, None]) & (eqpos <= quota[:, None]))
    kept = np.where(mask.reshape(tau.shape), tau, 0.0)
    sign = np.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (kept != 0) & (np.sign(kept) == sign)
    ref = b + np.where(agree, kept, 0.0).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(np.asarray(f(b, ms, hp, stats)), ref, rtol=1e-6, atol=1e-6)
