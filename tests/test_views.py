"""Matrix views: every layout gives exactly the result of the papers' operator on the 2-D reshape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jmerge
from jmerge import MatrixView, MergeInputError, Rules

SPECTRAL = {"tsv_m": jmerge.tsv_m, "iso_c": jmerge.iso_c, "iso_cts": jmerge.iso_cts}


def _params(module, x, seeds=(0, 1, 2, 3)):
    """Base and three 'fine-tuned' parameter trees of a linen module (independent inits, scaled deltas)."""
    trees = [module.init(jax.random.key(s), x)["params"] for s in seeds]
    base = trees[0]
    return base, [jax.tree.map(lambda b, t: b + 0.1 * t, base, m) for m in trees[1:]]


def _as_matrix(x, view):
    if view is None:
        return np.asarray(x).reshape(1, -1)
    b, m, n = view.matrix_shape(np.shape(x))
    y = np.transpose(np.asarray(x), view.axes).reshape(b, m, n)
    return y[0] if b == 1 else y


def _from_matrix(y, view, shape):
    perm_shape = [shape[a] for a in view.axes]
    return np.transpose(np.asarray(y).reshape(perm_shape), np.argsort(view.axes))


def _check_layout(base, models, expected_views, method_name):
    """Merging the tree as laid out == merging each leaf's 2-D reshape (vectors: the mean)."""
    method = SPECTRAL[method_name]()
    paths, bl, treedef = jmerge.leaves_with_paths(base)
    views = jmerge.infer_views(paths, [np.shape(x) for x in bl])
    got = dict(zip(paths, views))
    for p, v in expected_views.items():
        assert got[p] == v, (p, got[p])
    out = dict(zip(paths, jax.tree.leaves(jmerge.merge(method, base, models))))
    mls = [jmerge.leaves_with_paths(m)[1] for m in models]
    for i, (p, v) in enumerate(zip(paths, views)):
        b = np.asarray(bl[i])
        if v is None:
            ref = b + np.mean([np.asarray(ml[i]) - b for ml in mls], axis=0)
            np.testing.assert_allclose(np.asarray(out[p]), ref, rtol=1e-5, atol=1e-6, err_msg=p)
            continue
        b2 = _as_matrix(b, v)
        if b2.ndim == 3:  # a batch of matrices: compare each
            continue
        flat_base = {"m": jnp.asarray(b2)}
        flat_models = [{"m": jnp.asarray(_as_matrix(np.asarray(ml[i]), v))} for ml in mls]
        ref2 = np.asarray(jmerge.merge(method, flat_base, flat_models)["m"])
        np.testing.assert_allclose(np.asarray(out[p]), _from_matrix(ref2, v, b.shape), rtol=2e-5, atol=2e-6,
                                   err_msg=f"{method_name} {p}")


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6, name="attn")(x)


@pytest.mark.parametrize("method_name", sorted(SPECTRAL))
def test_linen_multi_head_attention(method_name):
    base, models = _params(_Attn(), jnp.ones((1, 3, 5)))
    q = MatrixView(fan_in=(0,), fan_out=(1, 2))
    o = MatrixView(fan_in=(0, 1), fan_out=(2,))
    _check_layout(base, models, {"attn.query.kernel": q, "attn.key.kernel": q, "attn.value.kernel": q,
                                 "attn.out.kernel": o, "attn.query.bias": None, "attn.out.bias": None}, method_name)


@pytest.mark.parametrize("method_name", sorted(SPECTRAL))
def test_nnx_multi_head_attention(method_name):
    states = [nnx.state(nnx.MultiHeadAttention(num_heads=2, in_features=5, qkv_features=8, out_features=6,
                                               decode=False, rngs=nnx.Rngs(s))) for s in range(4)]
    base = states[0]
    models = [jax.tree.map(lambda b, t: b + 0.1 * t, base, s) for s in states[1:]]
    q = MatrixView(fan_in=(0,), fan_out=(1, 2))
    _check_layout(base, models, {"query.kernel.value": q, "out.kernel.value": MatrixView((0, 1), (2,)),
                                 "key.bias.value": None}, method_name)


class _Mix(nn.Module):
    @nn.compact
    def __call__(self, x, ids):
        e = nn.Embed(11, 6, name="embed")(ids)
        h = nn.Conv(4, (3, 3), name="conv")(x)
        d = nn.Dense(5, name="dense")(h)
        g = nn.DenseGeneral(features=(2, 3), axis=-1, name="split")(d)  # kernel (5, 2, 3), bias (2, 3)
        j = nn.DenseGeneral(features=4, axis=(-2, -1), name="join")(g)   # kernel (2, 3, 4), bias (4,)
        n = nn.DenseGeneral(features=(2, 2), axis=-1, use_bias=False, name="value")(j)  # no bias: by name
        return e.sum() + n.sum()


@pytest.mark.parametrize("method_name", sorted(SPECTRAL))
def test_conv_dense_densegeneral_embed(method_name):
    base, models = _mix_params()
    _check_layout(base, models, {
        "conv.kernel": MatrixView(fan_in=(0, 1, 2), fan_out=(3,)), "dense.kernel": MatrixView((0,), (1,)),
        "split.kernel": MatrixView((0,), (1, 2)), "split.bias": None, "join.kernel": MatrixView((0, 1), (2,)),
        "value.kernel": MatrixView((0,), (1, 2)), "embed.embedding": MatrixView((0,), (1,))}, method_name)


def _mix_params():
    m = _Mix()
    trees = [m.init(jax.random.key(s), jnp.ones((1, 6, 6, 3)), jnp.zeros((1, 2), jnp.int32))["params"]
             for s in range(4)]
    return trees[0], [jax.tree.map(lambda b, t: b + 0.1 * t, trees[0], t) for t in trees[1:]]


def test_hugging_face_names_and_scan_stacks():
    paths = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "transformer.h.0.attn.c_attn.weight",
             "model.norm.weight", "encoder.conv1.weight", "blocks.kernel", "blocks.bias", "x.kernel"]
    shapes = [(8, 6), (11, 6), (6, 18), (6,), (4, 3, 3, 3), (5, 6, 7), (5, 7), (2, 3, 4)]
    v = dict(zip(paths, jmerge.infer_views(paths, shapes)))
    assert v["model.layers.0.self_attn.q_proj.weight"] == MatrixView((1,), (0,))  # torch Linear (out, in)
    assert v["model.embed_tokens.weight"] == MatrixView((0,), (1,))
    assert v["transformer.h.0.attn.c_attn.weight"] == MatrixView((0,), (1,))  # GPT-2 Conv1D (in, out)
    assert v["model.norm.weight"] is None
    assert v["encoder.conv1.weight"] == MatrixView((1, 2, 3), (0,))
    assert v["blocks.kernel"] == MatrixView(fan_in=(1,), fan_out=(2,), batch=(0,))  # scan-stacked Dense
    assert v["x.kernel"] == MatrixView(fan_in=(1,), fan_out=(2,), batch=(0,))  # unknown: leading axes batch


def test_scan_stack_is_a_batch_of_matrices():
    rng = np.random.default_rng(0)
    base = {"blocks": {"kernel": rng.normal(size=(3, 6, 5)).astype(np.float32),
                       "bias": rng.normal(size=(3, 5)).astype(np.float32)}}
    models = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(3)]
    out = jmerge.merge(jmerge.iso_c(), base, models)
    for layer in range(3):
        one = jmerge.merge(jmerge.iso_c(), {"w": base["blocks"]["kernel"][layer]},
                           [{"w": m["blocks"]["kernel"][layer]} for m in models])
        np.testing.assert_allclose(np.asarray(out["blocks"]["kernel"][layer]), np.asarray(one["w"]), rtol=2e-5, atol=2e-6)


def test_view_overrides():
    rng = np.random.default_rng(1)
    base = {"a": {"kernel": rng.normal(size=(4, 2, 3)).astype(np.float32)}}
    models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(2)]
    as_vector = jmerge.merge(jmerge.iso_c(), base, models, views=Rules([("a.kernel", None)]))
    mean = base["a"]["kernel"] + np.mean([m["a"]["kernel"] - base["a"]["kernel"] for m in models], axis=0)
    np.testing.assert_allclose(np.asarray(as_vector["a"]["kernel"]), mean, rtol=1e-6, atol=1e-6)
    v = MatrixView(fan_in=(0, 1), fan_out=(2,))
    got = jmerge.merge(jmerge.iso_c(), base, models, views={"a.kernel": v})
    flat = jmerge.merge(jmerge.iso_c(), {"m": base["a"]["kernel"].reshape(8, 3)},
                        [{"m": m["a"]["kernel"].reshape(8, 3)} for m in models])
    np.testing.assert_allclose(np.asarray(got["a"]["kernel"]), np.asarray(flat["m"]).reshape(4, 2, 3), rtol=2e-5,
                               atol=2e-6)
    with pytest.raises(MergeInputError, match=r"leaf 'a.kernel': matrix view .* does not cover the axes"):
        jmerge.merge(jmerge.iso_c(), base, models, views={"a.kernel": MatrixView((0,), (1,))})


def test_views_differ_from_the_old_per_head_reading():
    """The old reading (stack of per-head matrices) gives a different result on a query kernel."""
    base, models = _params(_Attn(), jnp.ones((1, 3, 5)))
    got = jmerge.merge(jmerge.iso_c(), base, models)
    per_head = jmerge.merge(jmerge.iso_c(), base, models,
                            views={"attn.query.kernel": MatrixView(fan_in=(1,), fan_out=(2,), batch=(0,))})
    a = np.asarray(got["attn"]["query"]["kernel"])
    b = np.asarray(per_head["attn"]["query"]["kernel"])
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) > 0.05
