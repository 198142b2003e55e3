"""Flax LoRA pytrees (``jmerge.lora.merge_flax_lora``): nnx.LoRALinear / nnx.LoRA layouts and factors in a separate
tree, merged into the kernels; references are NumPy (kernel + a @ b from the factors) and nnx's own forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
from jmerge.core import MergeInputError
from jmerge.lora import find_flax_loras, flax_lora_deltas, merge_flax_lora

nnx = pytest.importorskip("flax.nnx")


def _rand_factors(model, seed):
    """Non-zero lora_b (nnx initialises it to zero) so that the update is not trivially zero."""
    r = np.random.default_rng(seed)
    for _, m in model.iter_modules():
        if isinstance(m, nnx.LoRA):
            m.lora_b[...] = jnp.asarray(r.normal(size=m.lora_b.shape).astype(np.float32))


def test_nnx_lora_linear_merge_matches_numpy_and_forward():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.LoRALinear(6, 5, lora_rank=2, rngs=rngs)
            self.b = nnx.LoRALinear(5, 3, lora_rank=3, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    _rand_factors(model, 1)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    assert [p.kernel for p in find_flax_loras(*(2 * [jmerge.leaves_with_paths(params)[0]]))] == ["a.kernel", "b.kernel"]
    merged = merge_flax_lora(params)
    for name in ("a", "b"):
        k, a, b = (np.asarray(params[name][x]) if x == "kernel" else np.asarray(params[name]["lora"][x])
                   for x in ("kernel", "lora_a", "lora_b"))
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), k + a.astype(np.float64) @ b, rtol=1e-6, atol=1e-6)
        assert not np.asarray(merged[name]["lora"]["lora_b"]).any()  # zeroed: the update is not applied twice
        np.testing.assert_array_equal(np.asarray(params[name]["lora"]["lora_b"]) != 0, True)  # input untouched
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32))
    want = model(x)
    nnx.update(model, merged)  # same LoRA model, merged kernels and zero lora_b: same outputs
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = Net(nnx.Rngs(5))  # and plain kernels (lora factors ignored) give them too
    nnx.update(plain, merged)
    np.testing.assert_allclose(np.asarray(plain.b(jax.nn.relu(x @ plain.a.kernel[...] + plain.a.bias[...]))),
                               np.asarray(want), rtol=1e-5, atol=1e-5)


def test_nnx_lora_wrapper_and_separate_tree_dense_general_stacked_bf16():
    # nnx.LoRA(base_module=Linear): X.base_module.kernel + X.lora_a / X.lora_b
    lin = nnx.Linear(4, 7, rngs=nnx.Rngs(0))
    wrap = nnx.LoRA(4, 2, 7, base_module=lin, rngs=nnx.Rngs(1))
    _rand_factors(wrap, 3)
    st = nnx.state(wrap, nnx.Param).to_pure_dict()
    got = merge_flax_lora(st)
    np.testing.assert_allclose(np.asarray(got["base_module"]["kernel"]),
                               st["base_module"]["kernel"] + np.asarray(st["lora_a"], np.float64) @ st["lora_b"],
                               rtol=1e-6, atol=1e-6)
    # factors in a separate tree: a DenseGeneral (in, heads, head_dim) kernel with lora_b (r, heads, head_dim),
    # a scan-stacked (L, in, out) kernel with stacked factors, a bf16 kernel (rounded once), scale 0.5
    r = np.random.default_rng(4)
    base = {"attn": {"query": {"kernel": r.normal(size=(8, 2, 3)).astype(np.float32),
                               "bias": np.zeros((2, 3), np.float32)}},
            "blocks": {"mlp": {"kernel": r.normal(size=(3, 8, 5)).astype(np.float32)}},
            "head": {"kernel": r.normal(size=(8, 4)).astype(ml_dtypes.bfloat16)}}
    lora = {"attn": {"query": {"lora_a": r.normal(size=(8, 2)), "lora_b": r.normal(size=(2, 2, 3))}},
            "blocks": {"mlp": {"lora_a": r.normal(size=(3, 8, 2)), "lora_b": r.normal(size=(3, 2, 5))}},
            "head": {"lora_a": r.normal(size=(8, 1)), "lora_b": r.normal(size=(1, 4))}}
    lora = jax.tree.map(lambda x: x.astype(np.float32), lora)
    out = merge_flax_lora(base, lora, scale=0.5)
    q = lora["attn"]["query"]
    np.testing.assert_allclose(np.asarray(out["attn"]["query"]["kernel"]),
                               base["attn"]["query"]["kernel"] + 0.5 * (q["lora_a"] @ q["lora_b"].reshape(2, 6)).reshape(8, 2, 3),
                               rtol=1e-5, atol=1e-5)
    m = lora["blocks"]["mlp"]
    np.testing.assert_allclose(np.asarray(out["blocks"]["mlp"]["kernel"]),
                               base["blocks"]["mlp"]["kernel"] + 0.5 * np.einsum("lir,lro->lio", m["lora_a"], m["lora_b"]),
                               rtol=1e-5, atol=1e-5)
    h = lora["head"]
    want = (base["head"]["kernel"].astype(np.float32) + 0.5 * (h["lora_a"] @ h["lora_b"])).astype(ml_dtypes.bfloat16)
    assert out["head"]["kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]).astype(np.float32), want.astype(np.float32))
    assert out["attn"]["query"]["bias"] is base["attn"]["query"]["bias"]
    # the deltas are task vectors jmerge can merge: two LoRAs by task arithmetic = both applied
    d = flax_lora_deltas(base, lora)
    assert set(d) == {"attn.query.kernel", "blocks.mlp.kernel", "head.kernel"}


def test_flax_lora_bad_input_names_the_paths():
    base = {"dense": {"kernel": np.zeros((6, 4), np.float32)}}
    ok_a, ok_b = np.ones((6, 2), np.float32), np.ones((2, 4), np.float32)
    cases = [({"dense": {"lora_a": np.ones((5, 2), np.float32), "lora_b": ok_b}}, r"dense\.lora_a.*\(5, 2\).*dense\.kernel.*\(6, 4\).*fan_in=6"),
             ({"dense": {"lora_a": ok_a, "lora_b": np.ones((3, 4), np.float32)}}, r"dense\.lora_a.*dense\.lora_b.*rank 2 vs 3"),
             ({"dense": {"lora_a": np.ones((6, 5), np.float32), "lora_b": np.ones((5, 4), np.float32)}}, r"rank 5 is larger.*min = 4"),
             ({"dense": {"lora_a": ok_a}}, r"dense\.lora_a.*no partner"),
             ({"other": {"lora_a": ok_a, "lora_b": ok_b}}, r"'other'.*no kernel.*other\.kernel"),
             ({"dense": {"w": ok_a}}, r"no Flax LoRA factors")]
    for lora, msg in cases:
        with pytest.raises(MergeInputError, match=msg):
            merge_flax_lora(base, lora)


@pytest.mark.parametrize("suffix", ["", ".value", ".raw_value"])
def test_find_pairs_with_nnx_variable_suffixes(suffix):
    # NNX state paths may end in the variable's attribute; the pair keeps the paths as given.
    paths = [f"enc.fc.kernel{suffix}", f"enc.fc.lora.lora_a{suffix}", f"enc.fc.lora.lora_b{suffix}", "enc.ln.scale"]
    (pair,) = find_flax_loras(paths, paths)
    assert (pair.kernel, pair.a, pair.b) == (f"enc.fc.kernel{suffix}", f"enc.fc.lora.lora_a{suffix}",
                                            f"enc.fc.lora.lora_b{suffix}")
