"""The fused masked-merge Pallas kernel (interpret mode on CPU) equals jmerge's XLA path bit for bit.

Two levels: the kernel called directly (thresholds from an independent NumPy top-k, or the masks jmerge
returns) against ``jmerge.merge`` of the same TIES-family method on XLA; and ``jmerge.merge`` with the
backend forced to Pallas (the route in ``disjoint_merge``) against the same merge on XLA, with a check
that the Pallas call is really in the traced program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.kernels import masked_merge, masked_merge_bytes, merge_backend, requested_merge_backend


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bitwise(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = _bits(got) != _bits(want)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} entries differ; first: got "
                           f"{got[bad][:4].astype(np.float32)} want {want[bad][:4].astype(np.float32)}")


def np_thresholds(tau, k):
    """Exact per-row top-k of |tau| as (v, cut): NumPy sort of jmerge's magnitude keys, ties to the lowest index."""
    T = tau.shape[0]
    v, cut = np.zeros(T, np.int32), np.zeros(T, np.int32)
    for t in range(T):
        key = np.minimum(np.ascontiguousarray(tau[t], np.float32).reshape(-1).view(np.int32) & 0x7FFFFFFF,
                         0x7F800000)
        n, kk = key.size, int(k[t])
        if kk <= 0:
            v[t], cut[t] = 0x7F800001, 0
        elif kk >= n:
            v[t], cut[t] = -1, n
        else:
            v[t] = np.sort(key)[::-1][kk - 1]
            q = kk - int(np.sum(key > v[t]))
            cut[t] = np.nonzero(key == v[t])[0][q - 1] + 1
    return v, cut


def _inputs(shape, T, dtype, seed, ties_frac=0.0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    ms = []
    for t in range(T):
        d = rng.normal(size=shape).astype(np.float32) * 0.1
        if ties_frac:  # repeated magnitudes and exact zeros: ties at the threshold, zero votes
            d = np.round(d * 8) / 8
        ms.append((base + d).astype(dtype))
    return base.astype(dtype), ms


# (shape, T, input dtype, weights, options, block_rows)
CASES = [
    ((37, 128), 3, np.float32, [0.5, 1.0, 2.0], {}, 8),                        # ragged last block of rows
    ((5, 7, 3), 2, np.float32, [1.0, 1.0], {"normalize_by": "weight"}, None),  # 105 entries: the (1, n) view
    ((3000,), 4, np.float32, [0.3, -0.7, 1.1, 2.0], {"reduce": "sum"}, None),  # 3 ragged flat blocks
    ((1,), 1, np.float32, [1.5], {}, None),
    ((64, 96), 1, jnp.bfloat16, [0.8], {"normalize_by": "weight"}, 16),
    ((40, 128), 2, jnp.bfloat16, [0.25, 1.75], {"weighted": False}, 8),
    ((33, 128), 4, jnp.bfloat16, [1.0, 0.5, 0.5, 2.0], {"sign_method": "count"}, 8),
    ((24, 128), 3, np.float32, [0.9, 1.1, 1.3], {"normalize_by": "weight", "rounding": "floor"}, 8),
]


@pytest.mark.parametrize("shape,T,dtype,w,opts,br", CASES)
@pytest.mark.parametrize("compute", [None, "bfloat16"])
def test_kernel_thresholds_equal_xla_ties(shape, T, dtype, w, opts, br, compute):
    base, ms = _inputs(shape, T, dtype, seed=T * 7 + len(shape), ties_frac=0.5 if dtype == jnp.bfloat16 else 0)
    density, scale = 0.3, 0.7
    rounding = opts.get("rounding", "round")
    kw = {k: v for k, v in opts.items() if k != "rounding"}
    with merge_backend("xla"):
        method_xla = jmerge.methods.ties(density=density, scale=scale, weight=jmerge.PerModel(w), rounding=rounding,
                                         **kw)
    want = jmerge.merge(method_xla, base, ms, compute_dtype=compute)
    # The task vectors exactly as jmerge forms them, then an independent top-k (round(density * n)).
    r = (lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))) if compute \
        else (lambda a: np.asarray(a, np.float32))
    tau = np.stack([r(r(m) - r(base)) for m in ms])
    n = tau[0].size
    x = np.float32(density) * np.float32(n)
    k = np.full(T, np.round(x) if rounding == "round" else max(1, np.floor(x * np.float32(1 + 2.0 ** -21))))
    got = masked_merge(ms, base, thresholds=np_thresholds(tau, k), weights=np.asarray(w, np.float32),
                       scale=scale, precision=compute, block_rows=br, **{k_: v for k_, v in kw.items()})
    assert_bitwise(got, want)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_kernel_masks_equal_xla_breadcrumbs_ties(T):
    base, ms = _inputs((19, 128), T, np.float32, seed=T)
    w = np.linspace(0.5, 1.5, T).astype(np.float32)
    with merge_backend("xla"):
        method = jmerge.methods.breadcrumbs_ties(density=0.5, gamma=0.05, weight=jmerge.PerModel(list(w)),
                                                 normalize_by="weight")
    want, extras = jmerge.merge(method, base, ms, return_extras=True)
    got = masked_merge(ms, base, masks=np.asarray(extras["breadcrumbs_mask"]), weights=w, normalize_by="weight",
                       scale=1.0, block_rows=8)
    assert_bitwise(got, want)


def test_zero_votes_elect_plus_and_zeros_never_agree():
    # entry 0: +1 and -1 cancel -> +1 elected, the mean of the positive entries (1.0);
    # entry 1: all zero -> 0; entry 2: -2 and +1 -> -1 elected -> -2; entry 3: +3, 0 -> 3 (the zero does not count)
    tau = np.array([[1.0, 0.0, -2.0, 3.0], [-1.0, 0.0, 1.0, 0.0]], np.float32)
    got = masked_merge(tau, stacked=True, add_base=False)
    np.testing.assert_array_equal(np.asarray(got), [1.0, 0.0, -2.0, 3.0])
    got = masked_merge(tau, stacked=True, add_base=False, reduce="sum", weights=[2.0, 2.0])
    np.testing.assert_array_equal(np.asarray(got), [2.0, 0.0, -4.0, 6.0])
    base = np.full((4,), 10.0, np.float32)
    with merge_backend("xla"):
        want = jmerge.merge(jmerge.methods.ties(density=1.0), base, list(base + tau))
    assert_bitwise(masked_merge(list(base + tau), base, scale=1.0), want)


def test_stacked_task_vectors_and_out_dtype():
    base, ms = _inputs((16, 128), 3, np.float32, seed=11)
    tv = np.stack([m - base for m in ms])
    with merge_backend("xla"):
        method = jmerge.methods.ties(density=1.0, scale=0.5)
    want = jmerge.merge(method, base, task_vectors=tv, out_dtype=jnp.bfloat16)
    got = masked_merge(tv, base, stacked=True, scale=0.5, out_dtype=jnp.bfloat16, block_rows=4)
    assert_bitwise(got, want)
    assert masked_merge_bytes([((16, 128), np.float32)] * 3, jnp.bfloat16) == 16 * 128 * (4 * 4 + 2)


@pytest.mark.parametrize("n", [1, 2, 50, 127, 128, 896, 2310, 3000, 3072, 24 * 128, 37 * 128, 1 << 16, 1000003])
@pytest.mark.parametrize("block_rows", [1, 8, 32, 512])
def test_exact_layout_tiles_the_view(n, block_rows):
    """JAX < 0.12's Triton lowering does not mask overhanging blocks: on a GPU every block must lie inside."""
    from jmerge.kernels.fused import _exact_layout
    (rows, cols), (br, lanes) = _exact_layout(n, block_rows)
    assert rows % br == 0 and cols % lanes == 0 and rows * cols >= n
    assert br & (br - 1) == 0 and lanes & (lanes - 1) == 0 and br <= max(block_rows, 1)
    if n % 128 == 0:  # no copy: the (n/128, 128) view with the largest dividing power-of-two block
        assert (rows, cols) == (n // 128, 128) and (2 * br > min(block_rows, rows) or rows % (2 * br))
    else:  # (1, m): padded by less than one block
        assert rows == 1 and br == 1 and cols - n < lanes <= 1024


@pytest.mark.parametrize("shape", [(1,), (50,), (33, 70), (24, 128), (7, 128), (3000,)])
def test_exact_blocks_equal_the_ragged_layout(shape):
    """The GPU layout (blocks inside the leaf, zero-padded flat views) gives the same bits as the default one."""
    T = 3
    base, ms = _inputs(shape, T, np.float32, seed=len(shape) + shape[0])
    tv = np.stack([m - base for m in ms]).reshape(T, -1)
    v, cut = np_thresholds(tv, np.full(T, max(1, tv.shape[1] // 3)))
    rng = np.random.default_rng(5)
    masks = rng.random((T,) + shape) < 0.7
    common = dict(weights=[0.5, 1.0, 1.5], scale=0.9, block_rows=32)
    for kw in (dict(thresholds=(v, cut)), dict(masks=masks, mask_scale=[1.2, 1.0, 0.8])):
        want = masked_merge(ms, base, exact_blocks=False, **common, **kw)
        for stacked in (False, True):
            models = np.stack(ms) if stacked else ms
            assert_bitwise(masked_merge(models, base, exact_blocks=True, **common, **kw), want)
    got = masked_merge(np.stack(ms) - base, stacked=True, masks=masks, add_base=False, exact_blocks=True, block_rows=8)
    assert_bitwise(got, masked_merge(np.stack(ms) - base, stacked=True, masks=masks, add_base=False,
                                     exact_blocks=False))


def _has_pallas(method, base, models=None, **kw):
    return "pallas_call" in str(jax.make_jaxpr(lambda b, m: jmerge.merge(method, b, m, **kw))(base, models))


METHODS = [  # (name, options, number of models)
    ("ties", dict(density=0.4), 1),
    ("ties", dict(density=0.4, normalize_by="weight", weighted=True), 3),
    ("dare_ties", dict(density=0.6, rescale="l1", reduce="sum"), 2),
    ("dare_ties", dict(density=0.6, trim_density=0.5), 3),
    ("breadcrumbs_ties", dict(density=0.6, gamma=0.05, reduce="sum"), 4),
    ("della", dict(density=0.6, epsilon=0.1, rescale="l1", normalize_by="weight"), 2),
]


@pytest.mark.parametrize("name,opts,T", METHODS)
def test_merge_forced_pallas_equals_xla(name, opts, T):
    rng = np.random.default_rng(T)
    base = {"w": rng.normal(size=(24, 128)).astype(np.float32), "b": rng.normal(size=(50,)).astype(np.float32)}
    models = [jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), base) for _ in range(T)]
    hp = {"weight": jmerge.PerModel(list(np.linspace(0.6, 1.4, T)))}
    factory = jmerge.methods.METHODS[name]
    with merge_backend("xla"):
        mx = factory(**opts)
    with merge_backend("pallas"):
        mp = factory(**opts)
    assert not _has_pallas(mx, base, models, hparams=hp)
    assert _has_pallas(mp, base, models, hparams=hp)
    for compute in (None, "bfloat16"):
        want = jmerge.merge(mx, base, models, hparams=hp, seed=3, compute_dtype=compute)
        got = jmerge.merge(mp, base, models, hparams=hp, seed=3, compute_dtype=compute)
        jax.tree.map(assert_bitwise, got, want)


def test_merge_forced_pallas_bf16_models_t2_t4_by_name():
    rng = np.random.default_rng(5)
    for T in (2, 4):
        base = {"k": jnp.asarray(rng.normal(size=(30, 128)), jnp.bfloat16)}
        models = [{"k": (base["k"].astype(jnp.float32) + 0.05 * rng.normal(size=(30, 128))).astype(jnp.bfloat16)}
                  for _ in range(T)]
        with merge_backend("xla"):
            want = jmerge.merge(jmerge.methods.ties(density=0.3, normalize_by="weight"), base, models)
        with merge_backend("pallas"):
            got = jmerge.merge(jmerge.methods.ties(density=0.3, normalize_by="weight"), base, models)
        jax.tree.map(assert_bitwise, got, want)


def test_float16_compute_stays_on_xla_and_auto_is_xla_on_cpu():
    base = np.zeros((8, 128), np.float32)
    models = [base + 1.0, base - 0.5]
    with merge_backend("pallas"):
        m = jmerge.methods.ties(density=0.5)
    assert not _has_pallas(m, base, models, compute_dtype="float16")
    with merge_backend("auto"):
        m = jmerge.methods.ties(density=0.5)
    big = np.zeros((512, 128), np.float32)  # AUTO_MIN_ENTRIES entries: auto's size floor is met
    want = jax.default_backend() in ("gpu", "tpu") and jax.device_count() == 1
    assert _has_pallas(m, big, [big + 1.0, big - 0.5]) == want
    assert not _has_pallas(m, base, models)  # below the floor: XLA everywhere


def test_env_variable_and_bad_names(monkeypatch):
    monkeypatch.setenv("JMERGE_MERGE_BACKEND", "pallas")
    assert requested_merge_backend() == "pallas"
    assert jmerge.methods.ties().step("disjoint_merge").static == (("backend", "pallas"), ("normalize_by", "count"),
                                                                  ("reduce", "mean"))
    with merge_backend("xla"):
        assert requested_merge_backend() == "xla"
    monkeypatch.setenv("JMERGE_MERGE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="JMERGE_MERGE_BACKEND"):
        requested_merge_backend()
    with pytest.raises(ValueError, match="not a merge backend"):
        with merge_backend("triton"):
            pass


def test_bad_kernel_inputs():
    x = np.zeros((2, 4, 128), np.float32)
    with pytest.raises(ValueError, match="base is needed"):
        masked_merge(x)
    with pytest.raises(ValueError, match="precision"):
        masked_merge(x, stacked=True, add_base=False, precision="float16")
    with pytest.raises(ValueError, match="power of two"):
        masked_merge(x, stacked=True, add_base=False, block_rows=3)
    with pytest.raises(ValueError, match="drop_thresholds needs thresholds"):
        masked_merge(x, stacked=True, add_base=False, drop_thresholds=([0, 0], [0, 0]))
    with pytest.raises(ValueError, match="mask_scale needs masks"):
        masked_merge(x, stacked=True, add_base=False, mask_scale=[1.0, 2.0])


def test_forced_pallas_inside_jit_grouped_leaves_and_vmap():
    rng = np.random.default_rng(9)
    base = {f"l{i}": rng.normal(size=(16, 128)).astype(np.float32) for i in range(3)}
    models = [jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), base) for _ in range(2)]
    with merge_backend("xla"):
        mx = jmerge.methods.ties(density=0.3)
    with merge_backend("pallas"):
        mp = jmerge.methods.ties(density=0.3)
    run = lambda m: jax.jit(lambda b, ms: jmerge.merge(m, b, ms, group_leaves=True))(base, models)
    jax.tree.map(assert_bitwise, run(mp), run(mx))
    ws = jnp.asarray([[0.5, 1.5], [1.0, 1.0]], jnp.float32)  # a sweep over the weights: pallas_call under vmap
    sweep = lambda m: jax.vmap(lambda w: jmerge.merge(m, base["l0"], [t["l0"] for t in models],
                                                      hparams={"weight": jmerge.PerModel([w[0], w[1]])}))(ws)
    assert_bitwise(sweep(mp), sweep(mx))


@pytest.mark.parametrize("with_drop", [False, True])
def test_kernel_masks_rescale_thresholds_and_drop_against_numpy(with_drop):
    # the single-pass route's selection: drop mask, per-model rescale, then top-k of the rescaled values,
    # optionally minus the top outliers (Breadcrumbs); against NumPy from the formula
    T, shape = 3, (20, 128)
    base, ms = _inputs(shape, T, np.float32, seed=21, ties_frac=0.5)  # repeated magnitudes: ties at thresholds
    rng = np.random.default_rng(22)
    masks = rng.random((T,) + shape) < 0.7
    f = np.array([1.5, 0.75, 2.0], np.float32)
    w = np.array([0.5, 1.0, 1.5], np.float32)
    tau = np.stack([m - base for m in ms])
    x = np.where(masks, tau, np.float32(0)) * f[:, None, None]
    k = np.array([500, 1200, 2000])
    thr = np_thresholds(x, k)
    kept = np.zeros_like(x)
    keep = np.zeros(x.shape, bool)
    for t in range(T):
        key = np.minimum(np.abs(x[t]).reshape(-1).view(np.int32), 0x7F800000)
        pos = np.arange(key.size)
        sel = (key > thr[0][t]) | ((key == thr[0][t]) & (pos < thr[1][t]))
        keep[t] = sel.reshape(shape)
    kw = {}
    if with_drop:
        drop = np_thresholds(x, np.array([20, 0, 100]))
        for t in range(T):
            key = np.minimum(np.abs(x[t]).reshape(-1).view(np.int32), 0x7F800000)
            pos = np.arange(key.size)
            keep[t] &= ~((key > drop[0][t]) | ((key == drop[0][t]) & (pos < drop[1][t]))).reshape(shape)
        kw["drop_thresholds"] = drop
    kept = np.where(keep, x, np.float32(0))
    assert keep.sum() == (k.sum() - (120 if with_drop else 0))  # exact counts, ties included
    c = w[:, None, None] * kept
    sign = np.where(c.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(c) == sign) & (c != 0)
    num = np.where(agree, c, 0).sum(0)
    den = agree.sum(0)
    want = base + 0.9 * num / np.where(den == 0, 1, den)
    got = masked_merge(ms, base, masks=masks, mask_scale=f, thresholds=thr, weights=w, scale=0.9, block_rows=8,
                       **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # kernel == its one-fusion reference bit for bit without a scale (with one, XLA:CPU may contract
    # ``base + scale * merged`` into an FMA in one program and not the other; jmerge.merge's XLA path and the
    # kernel agree: tests/test_ties_fused.py)
    kw.update(masks=masks, mask_scale=f, thresholds=thr, weights=w)
    assert_bitwise(masked_merge(ms, base, block_rows=8, **kw), masked_merge(ms, base, reference=True, **kw))
