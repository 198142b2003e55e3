"""MoE dispatch: the Pallas grouped matmul (interpret mode), the ragged_dot path and the dense one-hot
einsum against a float64 NumPy reference written from the formula (softmax, top-k, renormalise, SwiGLU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.kernels import group_by_expert, grouped_matmul, moe_dense_reference, moe_dispatch, top_k_routing

# The Pallas interpreter on CPU; on a GPU/TPU the compiled kernel (scripts/gpu_checks.sh runs these there).
INTERPRET = jax.default_backend() == "cpu"
# float32 matmuls against float64 NumPy: exact on CPU; a GPU's default precision multiplies in tf32 (~1e-3)
F32 = 1e-5 if INTERPRET else 5e-3

IMPLS = ["ragged", "pallas", "dense"]


def np_route(logits, k, normalize=True):
    """float64 softmax, the k largest probabilities (ties to the lower id), optionally renormalised."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, 1)
    if normalize:
        w = w / w.sum(1, keepdims=True)
    return w, ids


def np_moe(x, logits, wg, wu, wd, k, normalize=True):
    """Token by token: sum over its k experts of weight * (silu(x Wg) * (x Wu)) Wd, in float64."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    w, ids = np_route(logits, k, normalize)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(k):
            e = ids[n, j]
            g, u = x[n] @ wg[e], x[n] @ wu[e]
            out[n] += w[n, j] * ((g / (1 + np.exp(-g))) * u) @ wd[e]
    return out


def make(N, H, F, E, seed=0, dead=(), hog=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, H)).astype(np.float32)
    logits = rng.normal(size=(N, E)).astype(np.float32) * 2
    for e in dead:  # empty experts: no token routes to them
        logits[:, e] = -30.0
    if hog is not None:  # uneven groups: most tokens prefer expert `hog`
        logits[: (3 * N) // 4, hog] += 8.0
    wg = (rng.normal(size=(E, H, F)) / np.sqrt(H)).astype(np.float32)
    wu = (rng.normal(size=(E, H, F)) / np.sqrt(H)).astype(np.float32)
    wd = (rng.normal(size=(E, F, H)) / np.sqrt(F)).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (x, logits, wg, wu, wd)]


# (tokens, hidden, ffn, experts, top_k, dead experts, hogged expert, block_rows)
CASES = {
    "top1": (29, 16, 24, 4, 1, (), None, 8),
    "top2": (37, 16, 40, 6, 2, (), None, 8),
    "top2_empty_experts": (33, 8, 16, 6, 2, (0, 4), None, 8),
    "top1_uneven": (50, 16, 24, 5, 1, (2,), 3, 16),
    "top2_few_tokens": (3, 8, 12, 8, 2, (), None, 8),
    "top3_tile128": (20, 8, 12, 4, 3, (), None, 128),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_matches_numpy(case, normalize):
    N, H, F, E, k, dead, hog, br = CASES[case]
    x, lg, wg, wu, wd = make(N, H, F, E, seed=len(case), dead=dead, hog=hog)
    want = np_moe(x, lg, wg, wu, wd, k, normalize)
    assert np.abs(want).max() > 0.1  # the layer does something
    for impl in IMPLS:
        got = moe_dispatch(x, lg, wg, wu, wd, k, normalize=normalize, impl=impl, block_rows=br, block_cols=16,
                           interpret=INTERPRET)
        assert got.dtype == jnp.float32 and got.shape == (N, H)
        np.testing.assert_allclose(np.asarray(got), want, rtol=F32, atol=F32, err_msg=impl)
    if normalize is False:
        # without renormalisation the output differs from the renormalised one (the flag is honoured)
        assert np.abs(np_moe(x, lg, wg, wu, wd, k, True) - want).max() > 1e-3 or k == E


def test_empty_experts_really_empty_and_uneven_groups():
    x, lg, wg, wu, wd = make(33, 8, 16, 6, dead=(0, 4))
    _, ids = top_k_routing(lg, 2)
    sizes = np.asarray(group_by_expert(ids, 6).group_sizes)
    assert sizes[0] == 0 and sizes[4] == 0 and sizes.sum() == 66
    x, lg, *_ = make(50, 16, 24, 5, dead=(2,), hog=3)
    sizes = np.asarray(group_by_expert(top_k_routing(lg, 1)[1], 5).group_sizes)
    assert sizes[2] == 0 and sizes[3] >= 37 and len(set(sizes.tolist())) > 2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_and_capacity(k):
    rng = np.random.default_rng(k)
    N, E = 41, 5
    lg = rng.normal(size=(N, E)).astype(np.float32)
    lg[:, 1] = -50.0
    for normalize in (True, False):
        w, ids = top_k_routing(lg, k, normalize=normalize)
        w_np, ids_np = np_route(lg, k, normalize)
        np.testing.assert_array_equal(np.asarray(ids), ids_np)
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-6, atol=1e-7)
    g = group_by_expert(ids, E)
    sizes = np.asarray(g.group_sizes)
    np.testing.assert_array_equal(sizes, np.bincount(ids_np.ravel(), minlength=E))
    assert sizes.sum() == N * k  # total rows = tokens * top_k
    assert (sizes <= N).all()  # no expert group exceeds the number of tokens (experts distinct per token)
    assert sizes[1] == 0
    eid, tok, order = np.asarray(g.expert_ids), np.asarray(g.token_index), np.asarray(g.order)
    assert (np.diff(eid) >= 0).all()
    np.testing.assert_array_equal(np.sort(order), np.arange(N * k))  # a permutation of the assignments
    np.testing.assert_array_equal(ids_np.ravel()[order], eid)
    np.testing.assert_array_equal(order // k, tok)
    for e in range(E):  # token order kept within a group, each token at most once
        t = tok[eid == e]
        assert (np.diff(t) > 0).all()


@pytest.mark.parametrize("case", ["top1", "top2_empty_experts", "top1_uneven"])
def test_bfloat16(case):
    N, H, F, E, k, dead, hog, br = CASES[case]
    x, lg, wg, wu, wd = make(N, H, F, E, seed=7, dead=dead, hog=hog, dtype=jnp.bfloat16)
    want = np_moe(*(np.asarray(a, np.float32) for a in (x, lg, wg, wu, wd)), k)
    scale = np.abs(want).max()
    outs = {}
    for impl in IMPLS:
        got = moe_dispatch(x, lg, wg, wu, wd, k, impl=impl, block_rows=br, block_cols=16, interpret=INTERPRET)
        assert got.dtype == jnp.bfloat16
        outs[impl] = np.asarray(got, np.float32)
        # bfloat16 rounding of 3 matmul outputs, the activation and the routing weights (measured on CPU:
        # at most 1.04e-2 of the output scale) against float64 from the same bfloat16 inputs
        np.testing.assert_allclose(outs[impl], want, rtol=0, atol=2e-2 * scale, err_msg=impl)
    # all paths round the same intermediates (bit-identical on CPU); allow one bfloat16 ulp of the scale
    for impl in ("pallas", "dense"):
        np.testing.assert_allclose(outs[impl], outs["ragged"], rtol=0, atol=4e-3 * scale, err_msg=impl)


def test_grouped_matmul_direct():
    """Tile-padded groups, one empty, rows outside any group stay zero; n not a multiple of block_cols."""
    rng = np.random.default_rng(3)
    tm, K, Nc = 16, 24, 40  # K and n not multiples of the chunks: padded
    rhs = rng.normal(size=(3, K, Nc)).astype(np.float32)
    starts, tiles = np.array([0, 32, 32], np.int32), np.array([2, 0, 1], np.int32)
    lhs = rng.normal(size=(80, K)).astype(np.float32)
    got = np.asarray(grouped_matmul(lhs, rhs, starts, tiles, block_rows=tm, block_cols=16, block_k=16,
                                    interpret=INTERPRET))
    want = np.zeros((80, Nc))
    want[0:32] = lhs[0:32].astype(np.float64) @ rhs[0]
    want[32:48] = lhs[32:48].astype(np.float64) @ rhs[2]
    np.testing.assert_allclose(got, want, rtol=F32, atol=F32)


def test_auto_jit_and_grad_of_ragged_path():
    x, lg, wg, wu, wd = make(24, 8, 12, 4, seed=11)
    auto = moe_dispatch(x, lg, wg, wu, wd, 2)  # CPU: the ragged path
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(moe_dispatch(x, lg, wg, wu, wd, 2, impl="ragged")))
    for impl in ("ragged", "pallas"):
        f = jax.jit(lambda *a, impl=impl: moe_dispatch(*a, 2, impl=impl, block_rows=8, interpret=INTERPRET))
        np.testing.assert_allclose(np.asarray(f(x, lg, wg, wu, wd)), np_moe(x, lg, wg, wu, wd, 2),
                                   rtol=F32, atol=F32, err_msg=impl)

    def loss(impl):
        return lambda *a: jnp.sum(jnp.sin(moe_dispatch(*a, 2, impl=impl)))

    g_r = jax.jit(jax.grad(loss("ragged"), argnums=(0, 1, 2, 3, 4)))(x, lg, wg, wu, wd)
    g_d = jax.grad(loss("dense"), argnums=(0, 1, 2, 3, 4))(x, lg, wg, wu, wd)
    for name, a, b in zip(["x", "logits", "w_gate", "w_up", "w_down"], g_r, g_d):
        assert np.abs(np.asarray(b)).max() > 1e-3, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=max(1e-4, F32), atol=F32, err_msg=name)


def test_bad_inputs():
    x, lg, wg, wu, wd = make(6, 8, 12, 4)
    with pytest.raises(ValueError, match="top_k"):
        moe_dispatch(x, lg, wg, wu, wd, 5)
    with pytest.raises(ValueError, match="impl"):
        moe_dispatch(x, lg, wg, wu, wd, 2, impl="triton")
    with pytest.raises(ValueError, match="w_down"):
        moe_dispatch(x, lg, wg, wu, wu, 2)
    with pytest.raises(ValueError, match="router_logits"):
        moe_dispatch(x, lg[:, :3], wg, wu, wd, 2)
    with pytest.raises(ValueError, match="x must be"):
        moe_dispatch(x[None], lg, wg, wu, wd, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_cast_weights_option(impl):
    """``cast_weights=False`` keeps the routing weights float32 in the combine (Mixtral in transformers 5):
    in bfloat16 it equals the float64 combine of the implementation's own bf16 expert outputs with the float32
    weights (<= 1 bf16 ulp), and differs from the default rounding of the weights to bf16; no effect in float32."""
    x, lg, wg, wu, wd = make(37, 16, 40, 6, seed=7, dtype=jnp.bfloat16)
    kw = dict(impl=impl, block_rows=8, block_cols=16) if impl == "pallas" else dict(impl=impl)
    keep = moe_dispatch(x, lg, wg, wu, wd, 2, cast_weights=False, **kw)
    cast = moe_dispatch(x, lg, wg, wu, wd, 2, **kw)
    assert keep.dtype == jnp.bfloat16
    w, ids = top_k_routing(lg, 2)
    ys = []  # each expert's bf16 output for each (token, slot): the layer with the one expert forced
    for j in range(2):
        forced = jnp.where(jax.nn.one_hot(ids[:, j], 6, dtype=bool), 0.0, -jnp.inf).astype(jnp.float32)
        ys.append(np.asarray(moe_dispatch(x, forced, wg, wu, wd, 1, **kw), np.float64))
    w64 = np.asarray(w, np.float64)
    want = ys[0] * w64[:, :1] + ys[1] * w64[:, 1:]
    got = np.asarray(keep, np.float64)
    assert np.max(np.abs(got - want) / (np.abs(want) + 1e-2)) <= 2 ** -7
    assert np.any(np.asarray(keep) != np.asarray(cast))
    x32, lg32, wg32, wu32, wd32 = make(37, 16, 40, 6, seed=7)
    np.testing.assert_array_equal(moe_dispatch(x32, lg32, wg32, wu32, wd32, 2, cast_weights=False, **kw),
                                  moe_dispatch(x32, lg32, wg32, wu32, wd32, 2, **kw))


# --- expert="linear": each expert (x @ w_up) @ w_down (a LoRA expert: down to the rank, then up), no gate ---

def np_moe_linear(x, logits, a, b, k, normalize=True):
    """Token by token: sum over its k experts of weight * (x A_e) B_e, in float64 (A (E, H, r), B (E, r, O))."""
    x, a, b = (np.asarray(t, np.float64) for t in (x, a, b))
    w, ids = np_route(logits, k, normalize)
    out = np.zeros((x.shape[0], b.shape[2]))
    for n in range(x.shape[0]):
        for j in range(k):
            e = ids[n, j]
            out[n] += w[n, j] * (x[n] @ a[e]) @ b[e]
    return out


def make_linear(N, H, R, O, E, seed=0, dead=(), hog=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, H)).astype(np.float32)
    logits = rng.normal(size=(N, E)).astype(np.float32) * 2
    for e in dead:
        logits[:, e] = -30.0
    if hog is not None:
        logits[: (3 * N) // 4, hog] += 8.0
    a = (rng.normal(size=(E, H, R)) / np.sqrt(H)).astype(np.float32)
    b = (rng.normal(size=(E, R, O)) / np.sqrt(R)).astype(np.float32)
    return [jnp.asarray(t, dtype) for t in (x, logits, a, b)]


# (tokens, hidden, rank, out, experts, top_k, dead experts, hogged expert, block_rows); out != hidden (LoRA)
LINEAR_CASES = {
    "top1": (29, 16, 4, 10, 4, 1, (), None, 8),
    "top2": (37, 12, 3, 20, 6, 2, (), None, 8),
    "top2_empty_experts": (33, 8, 2, 8, 6, 2, (0, 4), None, 8),
    "top1_uneven_empty": (50, 16, 5, 6, 5, 1, (2,), 3, 16),
    "top2_few_tokens_tile128": (3, 8, 1, 12, 8, 2, (), None, 128),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_float32_matches_numpy(case, normalize):
    N, H, R, O, E, k, dead, hog, br = LINEAR_CASES[case]
    x, lg, a, b = make_linear(N, H, R, O, E, seed=len(case), dead=dead, hog=hog)
    if dead:  # the empty experts really get no rows
        sizes = np.asarray(group_by_expert(top_k_routing(lg, k)[1], E).group_sizes)
        assert all(sizes[e] == 0 for e in dead) and sizes.sum() == N * k
    want = np_moe_linear(x, lg, a, b, k, normalize)
    assert np.abs(want).max() > 0.1
    for impl in IMPLS:
        got, (w, ids) = moe_dispatch(x, lg, None, a, b, k, normalize=normalize, impl=impl, block_rows=br,
                                     block_cols=8, interpret=INTERPRET, expert="linear", return_routing=True)
        assert got.dtype == jnp.float32 and got.shape == (N, O)
        np.testing.assert_allclose(np.asarray(got), want, rtol=F32, atol=F32, err_msg=impl)
        w_np, ids_np = np_route(lg, k, normalize)
        np.testing.assert_array_equal(np.asarray(ids), ids_np)
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(moe_dense_reference(x, lg, None, a, b, k, normalize=normalize,
                                                              expert="linear")), want, rtol=F32, atol=F32)


@pytest.mark.parametrize("case", ["top1", "top2_empty_experts", "top1_uneven_empty"])
@pytest.mark.parametrize("cast_weights", [True, False])
def test_linear_bfloat16(case, cast_weights):
    N, H, R, O, E, k, dead, hog, br = LINEAR_CASES[case]
    x, lg, a, b = make_linear(N, H, R, O, E, seed=5, dead=dead, hog=hog, dtype=jnp.bfloat16)
    want = np_moe_linear(*(np.asarray(t, np.float32) for t in (x, lg, a, b)), k)
    scale = np.abs(want).max()
    outs = {}
    for impl in IMPLS:
        got = moe_dispatch(x, lg, None, a, b, k, impl=impl, block_rows=br, block_cols=8, interpret=INTERPRET,
                           expert="linear", cast_weights=cast_weights)
        assert got.dtype == jnp.bfloat16 and got.shape == (N, O)
        outs[impl] = np.asarray(got, np.float32)
        # bfloat16 rounding of the 2 matmul outputs, the routing weights and the result against float64 from
        # the same bfloat16 inputs (measured on CPU, seeds 5-8: at most 5.7e-3 of the output scale)
        np.testing.assert_allclose(outs[impl], want, rtol=0, atol=1e-2 * scale, err_msg=impl)
    for impl in ("pallas", "dense"):  # the same intermediates are rounded on every path (bit-equal on CPU)
        np.testing.assert_allclose(outs[impl], outs["ragged"], rtol=0, atol=4e-3 * scale, err_msg=impl)


def test_linear_jit_and_grad():
    x, lg, a, b = make_linear(24, 8, 3, 6, 4, seed=11)
    auto = moe_dispatch(x, lg, None, a, b, 2, expert="linear")  # CPU: the ragged path
    np.testing.assert_array_equal(np.asarray(auto),
                                  np.asarray(moe_dispatch(x, lg, None, a, b, 2, impl="ragged", expert="linear")))
    for impl in IMPLS:
        f = jax.jit(lambda *t, impl=impl: moe_dispatch(t[0], t[1], None, t[2], t[3], 2, impl=impl, block_rows=8,
                                                       interpret=INTERPRET, expert="linear"))
        np.testing.assert_allclose(np.asarray(f(x, lg, a, b)), np_moe_linear(x, lg, a, b, 2),
                                   rtol=F32, atol=F32, err_msg=impl)

    def loss(impl):
        return lambda x, lg, a, b: jnp.sum(jnp.sin(moe_dispatch(x, lg, None, a, b, 2, impl=impl, expert="linear")))

    g_r = jax.jit(jax.grad(loss("ragged"), argnums=(0, 1, 2, 3)))(x, lg, a, b)
    g_d = jax.grad(loss("dense"), argnums=(0, 1, 2, 3))(x, lg, a, b)
    for name, u, v in zip(["x", "logits", "w_up", "w_down"], g_r, g_d):
        assert np.abs(np.asarray(v)).max() > 1e-3, name
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=max(1e-4, F32), atol=F32, err_msg=name)


def test_linear_bad_inputs_and_default_unchanged():
    x, lg, a, b = make_linear(6, 8, 3, 5, 4)
    _, _, wg, wu, wd = make(6, 8, 12, 4)
    with pytest.raises(ValueError, match="w_gate=None"):
        moe_dispatch(x, lg, wg, a, b, 2, expert="linear")
    with pytest.raises(ValueError, match="w_gate is None"):
        moe_dispatch(x, lg, None, wu, wd, 2)
    with pytest.raises(ValueError, match="expert must be one of"):
        moe_dispatch(x, lg, None, a, b, 2, expert="gelu")
    with pytest.raises(ValueError, match="w_down"):
        moe_dispatch(x, lg, None, a, b[:, :2], 2, expert="linear")
    with pytest.raises(ValueError, match="w_up"):
        moe_dispatch(x, lg, None, a[:, :5], b, 2, expert="linear")
    with pytest.raises(ValueError, match="router_logits"):
        moe_dispatch(x, lg[:, :3], None, a, b, 2, expert="linear", impl="dense")
    # return_routing on the default SwiGLU form returns the same output and top_k_routing's routing
    y, (w, ids) = moe_dispatch(x, lg, wg, wu, wd, 2, return_routing=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(moe_dispatch(x, lg, wg, wu, wd, 2)))
    w2, ids2 = top_k_routing(lg, 2)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w2))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids2))
