"""Lazy safetensors reader, atomic sharded writer, aux files: checked against the safetensors library."""

from __future__ import annotations

import json
import os
import struct
import threading

import ml_dtypes
import numpy as np
import yaml
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jmerge.io import (
    CheckpointError,
    CheckpointWriter,
    copy_aux_files,
    model_card,
    open_checkpoint,
)
from tests._files import hash_dir as _hash_dir, same_bytes as _same_bytes
from jmerge import MergeInputError

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
          ml_dtypes.float8_e5m2, np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32, np.uint16,
          np.uint8, np.bool_]
SHAPES = [(7,), (16, 12), (3, 4, 5), (), (0, 3)]


def _rand(rng, shape, dt):
    dt = np.dtype(dt)
    if dt == np.bool_:
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 3).astype(np.float32).astype(dt)


def _tensors(seed=0, f8=True):
    rng = np.random.default_rng(seed)
    out = {}
    for i, dt in enumerate(DTYPES):
        if not f8 and np.dtype(dt).name.startswith("float8"):
            continue
        for j, shp in enumerate(SHAPES):
            out[f"layer.{i}.{np.dtype(dt).name}.t{j}"] = np.asarray(_rand(rng, shp, dt), dtype=dt)
    return out


def _write_sharded_reference(d, tensors, n_shards):
    """Independent sharded HF checkpoint written with safetensors' own save_file + a hand-made index."""
    os.makedirs(d, exist_ok=True)
    names = list(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    wm = {}
    for s, g in enumerate(groups):
        fn = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in g}, os.path.join(d, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in g})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    return wm


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------


def test_reader_single_file_all_dtypes(tmp_path):
    t = _tensors()
    p = str(tmp_path / "m.safetensors")
    save_file(t, p, metadata={"format": "pt", "k": "v"})
    with open_checkpoint(p) as r:
        assert sorted(r.keys()) == sorted(t)
        assert r.metadata == {"format": "pt", "k": "v"}
        assert r.config is None
        assert r.dir == str(tmp_path)
        for k, v in t.items():
            assert r.shape(k) == v.shape
            assert r.dtype(k) == v.dtype
            assert r.nbytes(k) == v.nbytes
            got = r.get(k)
            assert _same_bytes(got, v), k
    # keys are in storage (offset) order, which is what the safetensors library's own header says
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__")
    with open_checkpoint(p) as r:
        assert r.keys() == sorted(hdr, key=lambda k: hdr[k]["data_offsets"][0])


def test_reader_hf_dir_and_config(tmp_path):
    t = _tensors(1)
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with open_checkpoint(tmp_path) as r:
        assert r.config == {"model_type": "llama", "hidden_size": 8}
        for k, v in t.items():
            assert _same_bytes(r.get(k), v)
            assert _same_bytes(r[k], v)


def test_reader_sharded(tmp_path):
    t = _tensors(2)
    wm = _write_sharded_reference(str(tmp_path), t, 3)
    with open_checkpoint(tmp_path) as r:
        assert sorted(r.keys()) == sorted(t)
        for k, v in t.items():
            assert _same_bytes(r.get(k), v)
            assert os.path.basename(r.file_of(k)) == wm[k]
        # storage order: shard by shard
        files = [os.path.basename(r.file_of(k)) for k in r.keys()]
        assert files == sorted(files)


def test_reader_out_buffer(tmp_path):
    t = {"a": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.ones((3, 5), ml_dtypes.bfloat16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as r:
        buf = np.full((4, 6), -1.0, np.float32)
        got = r.get("a", out=buf)
        assert np.shares_memory(got, buf)
        assert _same_bytes(buf, t["a"])
        raw = np.zeros(30, np.uint8)  # any dtype with the right byte count
        got = r.get("b", out=raw)
        assert np.shares_memory(got, raw) and _same_bytes(got, t["b"])
        with pytest.raises(CheckpointError, match="'a'"):
            r.get("a", out=np.zeros(5, np.float32))
        with pytest.raises(CheckpointError, match="no tensor named 'zz'"):
            r.get("zz")


def test_reader_tiny_fixture_matches_safetensors(tiny_base, tiny_fts):
    for d in [tiny_base, *tiny_fts]:
        with open_checkpoint(d) as r, safe_open(os.path.join(d, "model.safetensors"), "np") as ref:
            assert sorted(r.keys()) == sorted(ref.keys())
            for k in ref.keys():
                assert _same_bytes(r.get(k), ref.get_tensor(k)), (d, k)
                assert r.dtype(k) == np.dtype(ml_dtypes.bfloat16)
            assert r.config["model_type"] == "llama"


# ------------------------------------------------------------------------------------------------
# reader errors
# ------------------------------------------------------------------------------------------------


def test_error_is_merge_input_error():
    assert issubclass(CheckpointError, MergeInputError) and issubclass(CheckpointError, ValueError)


def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors only"):
        open_checkpoint(tmp_path / "empty")


def test_error_missing_shard(tmp_path):
    wm = _write_sharded_reference(str(tmp_path), _tensors(3), 3)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing") as e:
        open_checkpoint(tmp_path)
    assert any(repr(k) in str(e.value) for k, v in wm.items() if v.startswith("model-00002"))


def test_error_tensor_in_index_absent(tmp_path):
    _write_sharded_reference(str(tmp_path), _tensors(4), 2)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="'ghost.weight'.*model.safetensors.index.json|ghost.weight"):
        open_checkpoint(tmp_path)


def test_error_truncated(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": np.ones((10, 10), np.float32), "b": np.ones(50, np.float32)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in str(e.value) and ("'a'" in str(e.value) or "'b'" in str(e.value))


def test_error_truncated_after_open(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": np.ones(1000, np.float32)}, str(p))
    r = open_checkpoint(p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    with pytest.raises(CheckpointError, match="'a'.*truncated"):
        r.get("a")
    r.close()


@pytest.mark.parametrize("kind", ["short", "huge_len", "bad_json", "not_object"])
def test_error_corrupt_header(tmp_path, kind):
    p = tmp_path / "model.safetensors"
    if kind == "short":
        p.write_bytes(b"\x01\x02")
    elif kind == "huge_len":
        p.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    elif kind == "bad_json":
        body = b'{"a": {"dtype": "F32"'
        p.write_bytes(struct.pack("<Q", len(body)) + body)
    else:
        body = b"[1, 2]  "
        p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in str(e.value)


def _raw_file(p, header, data: bytes):
    body = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_error_unknown_dtype(tmp_path):
    _raw_file(tmp_path / "model.safetensors", {"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'w'.*unknown dtype 'C64'"):
        open_checkpoint(tmp_path)


def test_error_shape_listed_wrong(tmp_path):
    # shape says 3x4 float32 = 48 bytes but offsets span 40
    _raw_file(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}},
              b"\0" * 48)
    with pytest.raises(CheckpointError, match="'w'.*inconsistent"):
        open_checkpoint(tmp_path)


def test_reader_closed(tmp_path):
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "model.safetensors"))
    r = open_checkpoint(tmp_path)
    r.close()
    with pytest.raises(CheckpointError, match="closed"):
        r.get("a")


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------


def _layout(t):
    return [(k, v.shape, v.dtype) for k, v in t.items()]


def _check_against_safetensors(out_dir, t):
    files = [f for f in os.listdir(out_dir) if f.endswith(".safetensors")]
    seen = {}
    for fn in files:
        with safe_open(os.path.join(out_dir, fn), "np") as f:
            assert f.metadata()["format"] == "pt"
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    assert sorted(seen) == sorted(t)
    for k, v in t.items():
        assert _same_bytes(seen[k], v), k


def test_writer_single_any_order(tmp_path):
    t = _tensors(5, f8=False)
    out = tmp_path / "out"
    with CheckpointWriter(out, _layout(t), metadata={"merged_by": "jmerge"}, fsync=False) as w:
        for k in reversed(list(t)):
            w.write(k, t[k])
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    _check_against_safetensors(out, t)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt", "merged_by": "jmerge"}
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []


def test_writer_float8_via_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    t = {k: v for k, v in _tensors(9).items() if v.dtype.name.startswith("float8")}
    assert len(t) == 2 * len(SHAPES)
    with CheckpointWriter(tmp_path / "out", _layout(t)) as w:
        for k in reversed(list(t)):
            w.write(k, t[k])
    ref = torch_load(str(tmp_path / "out" / "model.safetensors"))
    for k, v in t.items():
        assert str(ref[k].dtype) == {"float8_e4m3fn": "torch.float8_e4m3fn", "float8_e5m2": "torch.float8_e5m2"}[v.dtype.name]
        assert ref[k].view(torch.uint8).numpy().tobytes() == v.tobytes() and tuple(ref[k].shape) == v.shape


def test_writer_shard_planning_threads(tmp_path):
    rng = np.random.default_rng(6)
    t = {f"m.l{i}.w": rng.standard_normal(s).astype(np.float32)
         for i, s in enumerate([(10, 10), (30,), (5, 5), (50, 4), (7,), (100,)])}
    # sizes 400, 120, 100, 800, 28, 400 bytes; max 500 -> [400] [120,100] [800] [28,400]
    out = tmp_path / "out"
    w = CheckpointWriter(out, _layout(t), max_shard_bytes=500)
    assert w.shard_files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    names = list(t)
    expect = {names[0]: 1, names[1]: 2, names[2]: 2, names[3]: 3, names[4]: 4, names[5]: 4}
    assert w.weight_map() == {k: f"model-0000{s}-of-00004.safetensors" for k, s in expect.items()}
    order = names[::-1]
    threads = [threading.Thread(target=w.write, args=(k, t[k])) for k in order]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    w.commit()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == w.weight_map()
    assert idx["metadata"]["total_size"] == sum(v.nbytes for v in t.values())
    _check_against_safetensors(out, t)
    for fn in w.shard_files:
        with safe_open(str(out / fn), "np") as f:
            sz = sum(f.get_tensor(k).nbytes for k in f.keys())
        assert sz <= 500 or len(list(safe_open(str(out / fn), "np").keys())) == 1
    with open_checkpoint(out) as r:  # and our reader reads the writer's output
        for k, v in t.items():
            assert _same_bytes(r.get(k), v)


def test_writer_casts_and_validates(tmp_path):
    out = tmp_path / "out"
    lay = [("a", (2, 3), ml_dtypes.bfloat16), ("b", (4,), np.float32)]
    with pytest.raises(CheckpointError, match="shape"):
        with CheckpointWriter(out, lay) as w:
            x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
            w.write("a", x)  # float32 -> bfloat16 cast
            with pytest.raises(CheckpointError, match="not in the writer's layout"):
                w.write("zz", x)
            with pytest.raises(CheckpointError, match="written twice"):
                w.write("a", x)
            w.write("b", np.zeros(5, np.float32))
    assert not out.exists() and os.listdir(tmp_path) == []
    with CheckpointWriter(out, lay) as w:
        w.write("a", x)
        w.write("b", np.zeros(4, np.float64))
    r = load_file(str(out / "model.safetensors"))
    assert _same_bytes(r["a"], x.astype(ml_dtypes.bfloat16))
    assert _same_bytes(r["b"], np.zeros(4, np.float32))


def test_writer_atomic_on_exception(tmp_path):
    t = _tensors(7, f8=False)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, _layout(t), max_shard_bytes=300) as w:
            for k in list(t)[:5]:
                w.write(k, t[k])
            raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_writer_missing_tensor_at_commit(tmp_path):
    t = _tensors(8, f8=False)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="never written"):
        with CheckpointWriter(out, _layout(t)) as w:
            for k in list(t)[1:]:
                w.write(k, t[k])
    assert not out.exists() and os.listdir(tmp_path) == []


def test_writer_existing_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    lay = [("a", (3,), np.float32)]
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(out, lay)
    w = CheckpointWriter(out, lay, overwrite=True)
    w.write("a", np.ones(3, np.float32))
    assert (out / "old.txt").read_text() == "old"  # replaced only at commit
    w.commit()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]
    # a failed overwrite leaves the previous output intact
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, lay, overwrite=True) as w:
            raise RuntimeError("x")
    assert _same_bytes(load_file(str(out / "model.safetensors"))["a"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["out"]


def test_writer_aux_files_and_inputs_unchanged(tmp_path, tiny_base):
    before = _hash_dir(tiny_base)
    out = tmp_path / "out"
    with open_checkpoint(tiny_base) as r, CheckpointWriter(out, r.layout()) as w:
        for k in r.keys():
            w.write(k, r.get(k))
        copied = copy_aux_files(tiny_base, w)
        w.write_text("README.md", model_card("merge_method: linear\n", "linear", ["a", "b"]))
    assert _hash_dir(tiny_base) == before
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    assert set(copied) | {"model.safetensors", "README.md"} == set(os.listdir(out))
    for fn in copied:
        assert (out / fn).read_bytes() == open(os.path.join(tiny_base, fn), "rb").read()
    assert (out / "model.safetensors").read_bytes() != b""
    _check_against_safetensors(out, load_file(os.path.join(tiny_base, "model.safetensors")))
    with pytest.raises(CheckpointError, match="collides"):
        CheckpointWriter(tmp_path / "o2", [("a", (1,), np.float32)]).write_text("model.safetensors", "x")


def test_copy_aux_tokenizer_source(tmp_path, tiny_base, tiny_fts):
    out = tmp_path / "out"
    with CheckpointWriter(out, [("a", (1,), np.float32)]) as w:
        w.write("a", np.zeros(1, np.float32))
        names = copy_aux_files(tiny_fts[0], w, tokenizer_source=tiny_base)
    assert "tokenizer.json" in names and "config.json" in names
    with pytest.raises(CheckpointError, match="not a directory"):
        copy_aux_files(tmp_path / "nope", None)


def test_model_card():
    import jmerge

    text = model_card("merge_method: ties\nbase_model: b\n", "ties", ["org/m1", "org/m2"])
    assert "jmerge" in text and jmerge.__version__ in text
    assert "`ties`" in text and "- org/m1" in text and "- org/m2" in text
    assert "```yaml\nmerge_method: ties\nbase_model: b\n```" in text


def test_writer_output_loads_in_transformers(tmp_path, tiny_base):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    with open_checkpoint(tiny_base) as r:
        biggest = max(r.nbytes(k) for k in r.keys())
        # force several shards, written in reverse order
        with CheckpointWriter(out, r.layout(), max_shard_bytes=biggest * 3) as w:
            for k in reversed(r.keys()):
                w.write(k, r.get(k))
            copy_aux_files(tiny_base, w)
    assert (out / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    ids = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_base).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert torch.equal(ref, got)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("the cat")["input_ids"] == transformers.AutoTokenizer.from_pretrained(tiny_base)("the cat")["input_ids"]


def test_reader_parallel_threads(tmp_path):
    t = _tensors(10, f8=False)
    _write_sharded_reference(str(tmp_path), t, 2)
    results = {}
    with open_checkpoint(tmp_path) as r:
        def work(names):
            for k in names:
                results[k] = r.get(k)

        names = r.keys()
        ths = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    assert sorted(results) == sorted(t) and all(_same_bytes(results[k], v) for k, v in t.items())


def test_writer_accepts_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.linspace(-3, 3, 35, dtype=jnp.float32).reshape(5, 7)
    lay = [("x.bf16", (5, 7), ml_dtypes.bfloat16), ("x.f32", (5, 7), np.float32)]
    with CheckpointWriter(tmp_path / "o", lay) as w:
        w.write("x.bf16", x.astype(jnp.bfloat16))
        w.write("x.f32", x)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert _same_bytes(got["x.bf16"], np.asarray(x).astype(ml_dtypes.bfloat16))
    assert _same_bytes(got["x.f32"], np.asarray(x))


def test_reader_dir_with_single_nonstandard_file_and_tied(tmp_path, tiny_tied):
    save_file({"w": np.ones(4, np.float32)}, str(tmp_path / "adapter.safetensors"))
    with open_checkpoint(tmp_path) as r:
        assert r.keys() == ["w"]
    save_file({"v": np.ones(4, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no index"):
        open_checkpoint(tmp_path)
    base, fts = tiny_tied
    with open_checkpoint(base) as r:
        assert "lm_head.weight" not in r and "model.embed_tokens.weight" in r
        assert r.config["tie_word_embeddings"] is True


def test_gpt2_fixture(tiny_gpt2):
    base, fts = tiny_gpt2
    with open_checkpoint(base) as b, open_checkpoint(fts[0]) as f:
        assert b.keys() == f.keys() and "transformer.h.1.attn.c_attn.weight" in b
        k = "transformer.h.0.attn.c_attn.bias"
        assert np.any(b.get(k) != f.get(k))  # biases moved too


def test_mergekit_goldens_readable(mergekit_golden):
    from tests.conftest import mergekit_cases

    cases = mergekit_cases()
    assert {"linear", "ties", "slerp", "passthrough", "della", "task_arithmetic_filters"} <= set(cases)
    for c in cases:
        cfg, path = mergekit_golden(c)
        assert "merge_method" in cfg
        with open_checkpoint(path) as r:
            # goldens are written in the config's output dtype (bf16 unless the case sets another)
            c_ = yaml.safe_load(cfg)
            want = {"float32": np.float32}.get(c_.get("out_dtype") or c_.get("dtype"), ml_dtypes.bfloat16)
            assert len(r) >= 30 and r.dtype("model.norm.weight") == np.dtype(want), c


def test_seek_fallback_without_positional_io(tmp_path, monkeypatch):
    """Platforms without pread/pwrite (Windows) use seek + read/write under a lock; same bytes."""
    import jmerge.io.safetensors as st

    monkeypatch.setattr(st, "_HAVE_POSITIONAL_IO", False)
    t = _tensors(11, f8=False)
    with CheckpointWriter(tmp_path / "o", _layout(t), max_shard_bytes=700) as w:
        ths = [threading.Thread(target=w.write, args=(k, v)) for k, v in t.items()]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    _check_against_safetensors(tmp_path / "o", t)
    with open_checkpoint(tmp_path / "o") as r:
        assert all(_same_bytes(r.get(k), v) for k, v in t.items())


def test_checkpoint_error_hierarchy(tmp_path):
    from jmerge.io import CheckpointFormatError, CheckpointNotFoundError, OutputExistsError
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(str(tmp_path / "nope"))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, MergeInputError)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointFormatError, match="corrupt safetensors header"):
        open_checkpoint(str(bad))
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True"):
        CheckpointWriter(str(tmp_path / "out"), [("a", (2,), np.float32)])


# --- temporary directories left by killed runs --------------------------------------------------------------------

_ABANDON = """
import os, sys
import numpy as np
from jmerge.io import CheckpointWriter
w = CheckpointWriter(sys.argv[1], [("a", (4,), np.float32), ("b", (3,), np.float32)], overwrite=True)
w.write("a", np.arange(4, dtype=np.float32))
if len(sys.argv) > 2 and sys.argv[2] == "park":  # stop between the two renames of an overwrite commit
    head, _, tail = os.path.basename(w.tmp_dir).rpartition(".tmp-")
    os.rename(sys.argv[1], os.path.join(os.path.dirname(w.tmp_dir), head + ".old-" + tail))
print(w.tmp_dir, flush=True)
if len(sys.argv) > 2 and sys.argv[2] == "sleep":
    sys.stdin.read()  # alive until the test closes stdin or kills it
os._exit(0)  # like SIGKILL: no abort, no __del__, no atexit
"""


def _abandon(out, mode="exit"):
    """Run a writer in a child that dies without cleaning up; returns (child Popen, its tmp dir)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _ABANDON, str(out), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    tmp = p.stdout.readline().strip()
    assert tmp and os.path.isdir(tmp), tmp
    return p, tmp


def _leftovers(parent):
    return sorted(e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e)


def _commit_one(out, **kw):
    with CheckpointWriter(out, [("x", (2,), np.float32)], fsync=False, **kw) as w:
        w.write("x", np.ones(2, np.float32))


def test_sweep_removes_a_dead_writers_tmp_dir(tmp_path):
    p, tmp = _abandon(tmp_path / "out")
    assert p.wait() == 0
    assert _leftovers(tmp_path) == sorted([os.path.basename(tmp), os.path.basename(tmp) + ".owner"])
    assert os.listdir(tmp) == ["model.safetensors"] and os.path.getsize(os.path.join(tmp, "model.safetensors")) > 28
    _commit_one(tmp_path / "other")  # any later writer into the same parent sweeps it
    assert sorted(os.listdir(tmp_path)) == ["other"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombie detection reads /proc")
def test_sweep_counts_an_unreaped_zombie_as_gone(tmp_path):
    import time

    p, tmp = _abandon(tmp_path / "out")
    deadline = time.monotonic() + 30
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        from jmerge.io.safetensors import sweep_abandoned

        assert tmp in sweep_abandoned(tmp_path)
        assert _leftovers(tmp_path) == []
    finally:
        p.wait()


def test_sweep_keeps_live_writers_then_removes_them_once_killed(tmp_path):
    import signal

    mine = CheckpointWriter(tmp_path / "mine", [("x", (2,), np.float32)], fsync=False)  # this process: alive
    p, tmp = _abandon(tmp_path / "out", "sleep")  # a live child
    try:
        _commit_one(tmp_path / "other")
        assert os.path.isdir(tmp) and os.path.isdir(mine.tmp_dir)
        assert os.listdir(tmp) == ["model.safetensors"]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    _commit_one(tmp_path / "third")
    assert not os.path.exists(tmp) and os.path.isdir(mine.tmp_dir)
    mine.write("x", np.zeros(2, np.float32))
    mine.commit()
    assert sorted(os.listdir(tmp_path)) == ["mine", "other", "third"]


def test_sweep_detects_pid_reuse_and_reboot_and_leaves_foreign_markers(tmp_path):
    """A marker naming this (live) pid with another start time is a previous process's; one from another
    boot is gone; one from another host, or a directory without a marker, is never judged."""
    from jmerge.io.safetensors import sweep_abandoned

    mine = CheckpointWriter(tmp_path / "mine", [("x", (2,), np.float32)], fsync=False)
    rec = json.loads(open(mine.tmp_dir + ".owner").read())
    assert rec["pid"] == os.getpid()

    def fake(name, **change):
        d = tmp_path / f".{name}.tmp-{os.getpid()}-abc"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
        (tmp_path / f".{name}.tmp-{os.getpid()}-abc.owner").write_text(json.dumps({**rec, **change}))
        return str(d)

    kept = [mine.tmp_dir, fake("host", host=rec["host"] + "-elsewhere"), fake("same")]
    gone = [fake("boot", boot="another-boot")] if rec["boot"] else []
    if rec["start"] is not None:
        gone.append(fake("reused", start=rec["start"] - 1))
    bare = tmp_path / f".bare.tmp-{os.getpid() + 10**7}-abc"  # no marker: not ours to judge
    bare.mkdir()
    assert sorted(sweep_abandoned(tmp_path)) == sorted(gone)
    assert all(os.path.isdir(k) for k in kept) and bare.is_dir()
    assert not any(os.path.exists(g) or os.path.exists(g + ".owner") for g in gone)
    mine.abort()
    assert not os.path.exists(mine.tmp_dir + ".owner")


def test_sweep_rolls_back_an_overwrite_killed_between_its_renames(tmp_path):
    out = tmp_path / "out"
    _commit_one(out)
    before = (out / "model.safetensors").read_bytes()
    p, tmp = _abandon(out, "park")
    assert p.wait() == 0 and not out.exists()  # the previous output is parked, the new one unfinished
    from jmerge.io import OutputExistsError

    with pytest.raises(OutputExistsError):  # the sweep restores `out` before the writer checks for it
        _commit_one(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "model.safetensors").read_bytes() == before


def test_killed_jmerge_merge_leaves_a_tmp_dir_that_the_next_merge_sweeps(tmp_path, repo_root):
    """A real ``jmerge merge`` stopped (SIGSTOP) right after it created its output directory, then SIGKILLed."""
    import signal
    import subprocess
    import sys

    arch = os.path.join(repo_root, "tests", "data", "arch", "llama")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {arch}/base\nmodels:\n"
                   f"  - model: {arch}/ft1\n    parameters: {{weight: 0.5}}\n  - model: {arch}/ft2\n"
                   f"    parameters: {{weight: 0.5}}\ndtype: float32\n")
    outs = tmp_path / "outs"
    child = ("import os, signal, sys\n"
             "import jmerge.io.safetensors as st\n"
             "init = st.CheckpointWriter.__init__\n"
             "def stop_after_init(self, *a, **k):\n"
             "    init(self, *a, **k)\n"
             "    os.kill(os.getpid(), signal.SIGSTOP)\n"
             "st.CheckpointWriter.__init__ = stop_after_init\n"
             "from jmerge.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", child, "merge", str(cfg), str(outs / "a"), "--quiet",
                          "--no-compile-cache"], cwd=repo_root)
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        left = _leftovers(outs)
        assert len(left) == 2 and left[0].startswith(".a.tmp-") and left[1] == left[0] + ".owner", left
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _leftovers(outs) == left  # SIGKILL left them
    from jmerge.cli import main

    assert main(["merge", str(cfg), str(outs / "b"), "--quiet", "--no-compile-cache"]) == 0
    assert sorted(os.listdir(outs)) == ["b"]
