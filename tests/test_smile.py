"""SMILE (jmerge.dynamic.smile): low-rank SVD experts of each linear layer with zero-shot routing.

References are independent: the fine-tuned models' own layer outputs (full rank, routing forced to t),
a NumPy transcription of the paper's forward (SVD of ΔW in torch's (out, in) layout, gate = ‖V_{:gate_k}ᵀx‖,
softmax, top-k renormalised, base + Σ experts incl. bias differences), updates built to live in
orthogonal input subspaces (zero-shot routing must pick their task), and a hand count of the storage.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.core.errors import MergeInputError
from jmerge.dynamic.smile import smile_apply, smile_linear, smile_routing, smile_upscale

T = 3


class TinyViT(nn.Module):
    """Dense patch embedding, attention (DenseGeneral q/k/v/out), MLP, LayerNorm, pooled head."""

    @nn.compact
    def __call__(self, x):  # (N, 4, 4)
        h = nn.Dense(8, name="embed")(x)
        y = nn.LayerNorm(name="ln")(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(y, y)
        h = h + nn.Dense(8, name="fc2")(nn.gelu(nn.Dense(12, name="fc1")(h)))
        return nn.Dense(5, name="head")(h.mean(axis=1))


MODEL = TinyViT()


def apply_fn(p, x):
    return MODEL.apply({"params": p}, x)


KERNELS = ["embed.kernel", "attn.query.kernel", "attn.key.kernel", "attn.value.kernel", "attn.out.kernel",
           "fc1.kernel", "fc2.kernel", "head.kernel"]


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (5, 4, 4))
    base = MODEL.init(jax.random.key(0), x)["params"]
    models = []
    for t in range(T):  # fine-tune every linear layer (kernels and biases), leave the LayerNorm alone
        def bump(path, a, t=t):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if name.startswith("ln"):
                return a
            k = jax.random.fold_in(jax.random.key(10 + t), hash(name) % 1000)
            return a + 0.3 * jax.random.normal(k, a.shape)
        models.append(jax.tree_util.tree_map_with_path(bump, base))
    return base, models, x


def _flat(tree):
    from flax.traverse_util import flatten_dict
    return {".".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def test_layers_found(setup):
    base, models, _ = setup
    sm = smile_upscale(base, models, gate_k=2)
    assert sorted(sm.layers) == sorted(KERNELS)
    assert sm.layers["attn.query.kernel"].in_shape == (8,) and sm.layers["attn.query.kernel"].out_shape == (2, 4)
    assert sm.layers["attn.out.kernel"].in_shape == (2, 4) and sm.layers["attn.out.kernel"].out_shape == (8,)


def test_full_rank_forced_routing_reproduces_model_layers_and_outputs(setup):
    base, models, x = setup
    sm = smile_upscale(base, models, k="full", gate_k=2)
    rng = np.random.default_rng(0)
    for t in range(T):
        fm = _flat(models[t])
        for p, layer in sm.layers.items():
            xin = rng.normal(size=(7,) + layer.in_shape).astype(np.float32)
            kt = fm[p]
            want = np.tensordot(xin, kt, axes=len(layer.in_shape)) + fm[p[:-len("kernel")] + "bias"]
            got = np.asarray(smile_linear(layer, jnp.asarray(xin), routing=t))
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=p)
        # whole model: only linear layers were fine-tuned, so forcing every layer to t gives model t
        got = jax.jit(lambda s, x, t=t: smile_apply(apply_fn, s, x, routing=t))(sm, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(apply_fn(models[t], x)), atol=2e-5, rtol=1e-5)


def _numpy_smile(x, w0, b0, ws, bs, k, gate_k, top_k):
    """The paper's layer in torch's layout: W (out, in), y = W x + b."""
    xm = x.reshape(-1, w0.shape[1]).astype(np.float64)
    logits, experts = [], []
    for w, b in zip(ws, bs):
        u, s, vh = np.linalg.svd((w - w0).astype(np.float64), full_matrices=False)
        v = vh.T
        logits.append(np.linalg.norm(xm @ v[:, :gate_k], axis=1))
        experts.append(xm @ (v[:, :k] * s[:k]) @ u[:, :k].T + (b - b0))
    logits = np.stack(logits, 1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = xm @ w0.T + b0
    for i in range(len(xm)):
        top = np.argsort(-p[i], kind="stable")[:top_k]
        wsum = p[i, top].sum()
        for t in top:
            out[i] += p[i, t] / wsum * experts[t][i]
    return out


@pytest.mark.parametrize("k,gate_k,top_k", [(3, 2, 1), (2, 4, 2), ("full", 1, 3)])
def test_zero_shot_layer_matches_numpy_reference(setup, k, gate_k, top_k):
    base, models, _ = setup
    sm = smile_upscale(base, models, k=k, gate_k=gate_k, top_k=top_k)
    layer = sm.layers["fc1.kernel"]
    fb, fms = _flat(base), [_flat(m) for m in models]
    x = np.random.default_rng(1).normal(size=(9, 8)).astype(np.float32)
    kk = 8 if k == "full" else k
    want = _numpy_smile(x, fb["fc1.kernel"].T, fb["fc1.bias"], [f["fc1.kernel"].T for f in fms],
                        [f["fc1.bias"] for f in fms], kk, gate_k, top_k)
    got = np.asarray(smile_linear(layer, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


def test_zero_shot_routing_picks_the_task_whose_subspace_holds_the_input():
    m, n = 6, 5
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(m, n)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(m, m)))
    base = {"lin": {"kernel": jnp.asarray(w0)}}
    models = []
    for t in range(T):  # update of task t acts only on input direction q[:, t]
        d = np.outer(q[:, t], rng.normal(size=n)) * 2.0
        models.append({"lin": {"kernel": jnp.asarray(w0 + d)}})
    sm = smile_upscale(base, models, k=1, gate_k=1, top_k=1)
    layer = sm.layers["lin.kernel"]
    for t in range(T):
        x = (q[:, t] * 3.0 + 0.1 * q[:, 4]).astype(np.float32)[None]
        w = np.asarray(smile_routing(layer, x))
        np.testing.assert_array_equal(w, np.eye(T)[t][None])
        np.testing.assert_allclose(np.asarray(smile_linear(layer, x)), x @ np.asarray(models[t]["lin"]["kernel"]),
                                   atol=1e-5)


def test_storage_and_others(setup):
    base, models, _ = setup
    k, gk = 2, 3
    sm = smile_upscale(base, models, k=k, gate_k=gk, clamp_rank=True)
    fb = _flat(base)
    n_model = sum(a.size for a in fb.values())
    gate = experts = 0
    for p in KERNELS:
        a = fb[p]
        mshape = {"attn.query.kernel": (8, 8), "attn.key.kernel": (8, 8), "attn.value.kernel": (8, 8),
                  "attn.out.kernel": (8, 8)}.get(p, a.shape)
        mi, no = mshape
        gate += T * mi * min(gk, mi, no)
        experts += T * (mi * min(k, mi, no) + min(k, mi, no) * no + no)
    st = sm.storage()
    assert st["model_params"] == n_model
    assert st["gate_params"] == gate and st["expert_params"] == experts
    assert st["total_params"] == n_model + gate + experts
    assert st["full_models_params"] == T * n_model
    # others: base by default; "average" averages the non-linear leaves (here: LayerNorm, unchanged, and
    # the linear leaves that `layers` leaves out)
    sm2 = smile_upscale(base, models, gate_k=2, layers=r"^fc", others="average")
    assert sorted(sm2.layers) == ["fc1.kernel", "fc2.kernel"]
    got = _flat(sm2.params)
    fms = [_flat(m) for m in models]
    np.testing.assert_allclose(got["head.kernel"], np.mean([f["head.kernel"] for f in fms], 0), atol=1e-6)
    np.testing.assert_array_equal(_flat(sm.params)["head.kernel"], fb["head.kernel"])


def test_bad_inputs(setup):
    base, models, x = setup
    with pytest.raises(MergeInputError, match="at least one task"):
        smile_upscale(base, [])
    with pytest.raises(MergeInputError, match=r"leaf 'embed\.kernel' is a 4x8 matrix: rank 5 is larger"):
        smile_upscale(base, models, k=5, gate_k=2)
    with pytest.raises(MergeInputError, match=r"gate_k.*leaf 'embed\.kernel'"):
        smile_upscale(base, models, k=2, gate_k=6)
    bad = jax.tree.map(lambda a: a, models[1])
    bad["fc2"] = {"kernel": jnp.zeros((12, 9)), "bias": bad["fc2"]["bias"]}
    with pytest.raises(MergeInputError, match=r"fc2\.kernel"):
        smile_upscale(base, [models[0], bad])
    with pytest.raises(MergeInputError, match="top_k"):
        smile_upscale(base, models, top_k=4)
    # a SMILE layer the model never calls through Dense: refused, not silently skipped
    sm = smile_upscale(base, models, gate_k=2)
    sm.layers["ghost.kernel"] = sm.layers["fc1.kernel"]
    with pytest.raises(MergeInputError, match=r"ghost\.kernel"):
        smile_apply(apply_fn, sm, x)
