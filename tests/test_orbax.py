"""Orbax save/load (incl. NamedSharding restore) and bit-exact HF <-> Orbax conversion."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jmerge.io import (
    CheckpointError,
    convert,
    flat_to_nested,
    load_orbax,
    nested_to_flat,
    open_checkpoint,
    save_orbax,
)
from tests._files import hash_dir as _hash_dir, same_bytes as _same_bytes


def _flat(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for dt in (np.float32, np.float16, ml_dtypes.bfloat16):
        for j, shp in enumerate([(7,), (16, 12), (3, 4, 5)]):
            x = (rng.standard_normal(shp) * 10).astype(np.float32)
            x.reshape(-1)[:2] = [np.float32(1e-30), np.float32(-0.0)]  # subnormal-ish / negative zero survive
            out[f"model.layers.{j}.{np.dtype(dt).name}.weight"] = x.astype(dt)
    out["lm_head.weight"] = rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    return out


def test_flat_nested_round_trip():
    flat = {"a.b.c": 1, "a.b.d": 2, "a.e": 3, "f": 4}
    nested = flat_to_nested(flat)
    assert nested == {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    assert nested_to_flat(nested) == flat
    with pytest.raises(CheckpointError, match="'a.b.c'.*'a.b'|conflict"):
        flat_to_nested({"a.b": 1, "a.b.c": 2})
    with pytest.raises(CheckpointError, match="conflict"):
        flat_to_nested({"a.b.c": 1, "a.b": 2})
    with pytest.raises(CheckpointError, match="empty component"):
        flat_to_nested({"a..b": 1})


def test_save_load_numpy(tmp_path):
    flat = _flat(1)
    p = tmp_path / "ck"
    save_orbax(flat_to_nested(flat), p)
    assert [x for x in os.listdir(tmp_path)] == ["ck"]
    got = nested_to_flat(load_orbax(p))
    assert sorted(got) == sorted(flat)
    for k, v in flat.items():
        assert isinstance(got[k], np.ndarray) and _same_bytes(got[k], v), k
    with pytest.raises(CheckpointError, match="already exists"):
        save_orbax(flat_to_nested(flat), p)
    flat2 = {k: v + np.asarray(1, v.dtype) for k, v in flat.items()}
    save_orbax(flat_to_nested(flat2), p, overwrite=True)
    got = nested_to_flat(load_orbax(p))
    assert all(_same_bytes(got[k], flat2[k]) for k in flat)
    assert os.listdir(tmp_path) == ["ck"]


def test_save_jax_arrays_and_restore_named_sharding(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devs = np.array(jax.devices())
    n = len(devs)
    mesh = Mesh(devs, ("d",))
    params = {"dense": {"kernel": jax.numpy.arange(8 * n * 6, dtype=jax.numpy.float32).reshape(8 * n, 6),
                        "bias": jax.numpy.ones((6,), jax.numpy.bfloat16)}}
    save_orbax(params, tmp_path / "ck")
    sh = {"dense": {"kernel": NamedSharding(mesh, P("d", None)), "bias": NamedSharding(mesh, P())}}
    got = load_orbax(tmp_path / "ck", shardings=sh)
    assert isinstance(got["dense"]["kernel"], jax.Array)
    assert got["dense"]["kernel"].sharding == sh["dense"]["kernel"]
    assert got["dense"]["bias"].sharding == sh["dense"]["bias"]
    assert got["dense"]["bias"].dtype == jax.numpy.bfloat16
    assert _same_bytes(np.asarray(got["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]))
    # one Sharding for all leaves, and a target of ShapeDtypeStructs
    rep = NamedSharding(mesh, P())
    got = load_orbax(tmp_path / "ck", shardings=rep)
    assert got["dense"]["kernel"].sharding == rep
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, sh)
    got = load_orbax(tmp_path / "ck", target=target)
    assert got["dense"]["kernel"].sharding == sh["dense"]["kernel"]
    assert _same_bytes(np.asarray(got["dense"]["bias"]), np.asarray(params["dense"]["bias"]))


def test_failed_save_leaves_nothing(tmp_path):
    class NotAnArray:
        pass

    with pytest.raises(Exception):
        save_orbax({"a": np.ones(3, np.float32), "b": NotAnArray()}, tmp_path / "ck")
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="not found"):
        load_orbax(tmp_path / "ck")


def test_orbax_reader(tmp_path):
    flat = _flat(2)
    save_orbax(flat_to_nested(flat), tmp_path / "ck")
    with open_checkpoint(tmp_path / "ck") as r:
        assert sorted(r.keys()) == sorted(flat)
        for k, v in flat.items():
            assert r.shape(k) == v.shape and r.dtype(k) == v.dtype and r.nbytes(k) == v.nbytes
            assert _same_bytes(r.get(k), v)
            buf = np.empty(v.nbytes, np.uint8)
            assert _same_bytes(r.get(k, out=buf), v) and buf.tobytes() == v.tobytes()
        with pytest.raises(CheckpointError, match="no tensor named"):
            r.get("nope")
    # a CheckpointManager-style step dir with a `params` item
    save_orbax(flat_to_nested(flat), tmp_path / "step" / "params")
    with open_checkpoint(tmp_path / "step") as r:
        assert sorted(r.keys()) == sorted(flat)
        k = sorted(flat)[0]
        assert _same_bytes(r.get(k), flat[k])


@pytest.mark.parametrize("shard_bytes", [2**30, 300])
def test_convert_round_trip_bit_exact(tmp_path, shard_bytes):
    flat = _flat(3)
    src = tmp_path / "hf"
    src.mkdir()
    save_file(flat, str(src / "model.safetensors"), metadata={"format": "pt", "note": "x"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "README.md").write_text("# merged\n")  # a merge's model card and config travel with it
    (src / "mergekit_config.yml").write_text("merge_method: linear\n")
    before = _hash_dir(src)
    with open_checkpoint(src) as r:
        src_order = r.keys()
    convert(src, tmp_path / "ob", to="orbax")
    assert (tmp_path / "ob" / "config.json").exists()
    convert(tmp_path / "ob", tmp_path / "back", to="safetensors", max_shard_bytes=shard_bytes)
    assert _hash_dir(src) == before
    with open_checkpoint(tmp_path / "back") as r:
        assert r.keys() == src_order  # original storage order restored
        assert r.metadata.get("note") == "x"
        for k, v in flat.items():
            assert _same_bytes(r.get(k), v), k
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == {"model_type": "llama"}
    assert (tmp_path / "back" / "README.md").read_text() == "# merged\n"
    assert (tmp_path / "back" / "mergekit_config.yml").read_text() == "merge_method: linear\n"
    if shard_bytes == 300:
        assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    else:
        got = load_file(str(tmp_path / "back" / "model.safetensors"))  # independent reader
        assert all(_same_bytes(got[k], v) for k, v in flat.items())
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src, tmp_path / "ob", to="orbax")
    with pytest.raises(CheckpointError, match="'orbax' or 'safetensors'"):
        convert(src, tmp_path / "x", to="gguf")


def test_convert_tiny_model_loads_in_transformers(tmp_path, tiny_base):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert(tiny_base, tmp_path / "ob", to="orbax")
    params = load_orbax(tmp_path / "ob")
    assert params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    convert(tmp_path / "ob", tmp_path / "back", to="safetensors")
    ref = load_file(os.path.join(tiny_base, "model.safetensors"))
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(ref) == sorted(got) and all(_same_bytes(ref[k], got[k]) for k in ref)
    ids = torch.tensor([[1, 4, 8, 26, 99]])
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(tiny_base).eval()(ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()(ids).logits
    assert torch.equal(a, b)
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))


def test_failed_convert_leaves_nothing(tmp_path, monkeypatch):
    import jmerge.io.orbax as orbax_mod

    src = tmp_path / "hf"
    src.mkdir()
    save_file({"a.b": np.ones((4, 4), np.float32)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_mod, "copy_aux_files", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "ob", to="orbax")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    monkeypatch.undo()
    convert(src, tmp_path / "ob", to="orbax")
    monkeypatch.setattr(orbax_mod, "copy_aux_files", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "ob", tmp_path / "back", to="safetensors")
    assert sorted(os.listdir(tmp_path)) == ["hf", "ob"]


def test_restore_sharded_on_4_cpu_devices(tmp_path):
    """Save from one device, restore split over a 4-device mesh (fresh process with 4 host devices)."""
    import subprocess
    import sys
    import textwrap

    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6).astype(ml_dtypes.bfloat16)
    save_orbax({"w": x, "b": np.arange(6, dtype=np.float32)}, tmp_path / "ck")
    code = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jmerge.io import load_orbax
        assert len(jax.devices()) == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
        sh = {{"w": NamedSharding(mesh, P("a", "b")), "b": NamedSharding(mesh, P("b"))}}
        got = load_orbax({str(tmp_path / "ck")!r}, shardings=sh)
        w = got["w"]
        assert w.sharding == sh["w"] and len(w.addressable_shards) == 4
        assert all(s.data.shape == (4, 3) for s in w.addressable_shards)
        np.save({str(tmp_path / "w.npy")!r}, np.asarray(w).view(np.uint16))
        assert got["b"].sharding == sh["b"]
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert np.load(tmp_path / "w.npy").tobytes() == x.tobytes()
