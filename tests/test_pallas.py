"""The Pallas ``disjoint_merge`` front end (interpret mode on CPU) against a NumPy reference of jmerge's rule:
``c_t = keep_t w_t tau_t``, ``sign = +1`` where ``sum_t c_t >= 0`` (a zero vote elects +1), the agreeing
``c_t`` averaged by count or weight sum, zeros never agreeing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.kernels import disjoint_merge, disjoint_merge_reference

# The Pallas interpreter on CPU; on a GPU/TPU the compiled kernel (scripts/gpu_checks.sh runs these there).
INTERPRET = jax.default_backend() == "cpu"


def ref_disjoint(tau, keep, w, by_weight=False):
    tau = np.asarray(tau, np.float64)
    T = tau.shape[0]
    w = np.broadcast_to(np.asarray(w, np.float64), (T,)).reshape((T,) + (1,) * (tau.ndim - 1))
    c = keep * w * tau
    s = np.where(c.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(c) == s
    num = (agree * c).sum(0)
    den = (agree * (w if by_weight else 1.0)).sum(0)
    return num / np.where(den == 0, 1.0, den)


@pytest.mark.parametrize("shape", [(7,), (16, 12), (3, 4, 5), (1000,), (20, 128)])
@pytest.mark.parametrize("T", [1, 3])
def test_matches_numpy(shape, T):
    rng = np.random.default_rng(T * 100 + len(shape))
    tau = rng.normal(size=(T,) + shape).astype(np.float32)
    tau[..., ::5] = 0.0  # zeros: no sign
    keep = rng.random((T,) + shape) < 0.6
    w = rng.uniform(0.2, 2.0, size=T).astype(np.float32)
    got = np.asarray(disjoint_merge(tau, keep, w, block_rows=8, interpret=INTERPRET))
    np.testing.assert_allclose(got, ref_disjoint(tau, keep, w), rtol=1e-6, atol=1e-7)
    got = np.asarray(disjoint_merge(tau, keep, w, normalize_by="weight", block_rows=8, interpret=INTERPRET))
    np.testing.assert_allclose(got, ref_disjoint(tau, keep, w, True), rtol=1e-6, atol=1e-7)


def test_bfloat16_and_zero_votes():
    tau = np.array([[1.0, -1.0, 2.0, 0.0], [-1.0, -3.0, 0.0, 0.0]], np.float32)
    keep = np.array([[True, True, True, True], [True, True, False, True]])
    got = np.asarray(disjoint_merge(tau, keep, 1.0, interpret=INTERPRET))
    np.testing.assert_allclose(got, [1.0, -2.0, 2.0, 0.0])  # col 0: the votes cancel -> +1 elected -> 1.0
    tb = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 12)), jnp.bfloat16)
    keep = np.random.default_rng(1).random((3, 16, 12)) < 0.5
    got = np.asarray(disjoint_merge(tb, keep, 1.0, interpret=INTERPRET))
    np.testing.assert_allclose(got, ref_disjoint(np.asarray(tb, np.float32), keep, 1.0), rtol=1e-6, atol=1e-7)


def test_jit_multiblock_and_reference():
    rng = np.random.default_rng(4)
    tau = rng.normal(size=(3, 40, 128)).astype(np.float32)
    keep = rng.random((3, 40, 128)) < 0.3
    f = jax.jit(lambda t, k, w: disjoint_merge(t, k, w, block_rows=16, interpret=INTERPRET))  # 3 blocks, last ragged
    got = np.asarray(f(tau, keep, jnp.float32(0.7)))
    np.testing.assert_allclose(got, ref_disjoint(tau, keep, 0.7), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(disjoint_merge_reference(tau, keep, 0.7)), got, rtol=1e-6, atol=1e-7)


def test_bad_inputs():
    with pytest.raises(ValueError):
        disjoint_merge(np.zeros((2, 3)), np.zeros((2, 4), bool), interpret=INTERPRET)
    with pytest.raises(ValueError):
        disjoint_merge(np.zeros((2, 3)), np.zeros((2, 3), bool), normalize_by="sum", interpret=INTERPRET)
