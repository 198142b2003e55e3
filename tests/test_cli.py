"""The `jmerge` command: dry run, exit codes, overwrite refusal, atomic output, methods list, version."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jmerge
from jmerge.cli import main, parse_size


def _cfg(tmp_path, text, name="c.yml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_version_and_methods(capsys):
    assert main(["--version"]) == 0 and jmerge.__version__ in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in jmerge.available_methods():
        assert f"\n{name}(" in "\n" + out
    assert "ties(density=0.2" in out and "sce(" in out and "[mergekit: select" not in out


def test_bad_config_exit_2_one_line_with_location(tmp_path, capsys):
    p = _cfg(tmp_path, "merge_method: tiez\nbase_model: b\nmodels:\n  - model: m\n")
    assert main(["merge", p, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{p}:1:15" in err and "unknown merge method 'tiez'" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_plan_and_writes_nothing(tiny_base, tiny_fts, tmp_path, capsys):
    p = _cfg(tmp_path, f"merge_method: ties\nbase_model: {tiny_base}\nmodels:\n"
             + "".join(f"  - model: {f}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for f in tiny_fts))
    assert main(["merge", p, str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: ties" in out and "model.layers.*.self_attn.q_proj.weight x3" in out
    assert "density=0.5" in out and "output tensors:" in out and "peak memory estimate" in out
    assert not (tmp_path / "out").exists()


def test_merge_overwrite_refusal_and_outputs(tiny_base, tiny_fts, tmp_path, capsys):
    p = _cfg(tmp_path, f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {tiny_fts[0]}\n"
             "parameters: {lambda: 0.5}\nchat_template: 'hi {{ x }}'\n")
    out = tmp_path / "out"
    assert main(["merge", p, str(out), "--quiet", "--out-shard-size", "50KB"]) == 0
    files = os.listdir(out)
    assert "README.md" in files and "config.json" in files and "tokenizer.json" in files
    assert "chat_template.jinja" in files and "model.safetensors.index.json" in files
    assert main(["merge", p, str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", p, str(out), "--quiet", "--overwrite", "--no-copy-tokenizer"]) == 0
    assert "tokenizer.json" not in os.listdir(out)


def test_failure_leaves_no_output(tiny_base, tmp_path, capsys):
    # a model with another architecture fails after the plan is made: nothing is written
    other = os.path.join(os.path.dirname(tiny_base), "gpt2_base")
    if not os.path.isdir(other):
        pytest.skip("gpt2 fixture missing")
    p = _cfg(tmp_path, f"merge_method: task_arithmetic\nbase_model: {tiny_base}\nmodels:\n  - model: {other}\n")
    assert main(["merge", p, str(tmp_path / "out"), "--quiet"]) == 1
    assert "--allow-crimes" in capsys.readouterr().err  # mixed architectures: refused before any read
    assert os.listdir(tmp_path) == ["c.yml"]
    assert main(["merge", p, str(tmp_path / "out"), "--quiet", "--allow-crimes"]) == 1
    assert "missing from model" in capsys.readouterr().err  # the tensors do not match either
    assert os.listdir(tmp_path) == ["c.yml"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(Exception):
        parse_size("five")


def test_demo_entry(capsys, monkeypatch):
    import jmerge.demo as demo
    if not hasattr(demo, "run_demo"):
        assert main(["demo"]) == 1
        assert "not available" in capsys.readouterr().err
    else:
        calls = []
        monkeypatch.setattr(demo, "run_demo", lambda args: calls.append(args) or 0)
        assert main(["demo", "--steps", "3"]) == 0 and calls == [["--steps", "3"]]


def test_merge_fills_the_compile_cache_and_rerun_is_identical(tiny_base, tiny_fts, tmp_path):
    # conftest points $JMERGE_COMPILE_CACHE at a temp dir (JAX initialises its cache once per process,
    # so every CLI merge in this process uses that directory).
    cache = os.environ["JMERGE_COMPILE_CACHE"]
    p = _cfg(tmp_path, f"merge_method: ties\nbase_model: {tiny_base}\nmodels:\n"
             + "".join(f"  - model: {f}\n    parameters: {{weight: 1.0, density: 0.3}}\n" for f in tiny_fts))
    outs = [tmp_path / "a", tmp_path / "b"]
    assert main(["merge", p, str(outs[0]), "--quiet"]) == 0
    assert any("_leaf_program" in f for f in os.listdir(cache)), os.listdir(cache)  # the per-leaf programs
    assert main(["merge", p, str(outs[1]), "--quiet"]) == 0
    from jmerge.io.safetensors import open_checkpoint
    with open_checkpoint(str(outs[0])) as a, open_checkpoint(str(outs[1])) as b:
        for k in a.keys():
            np.testing.assert_array_equal(a.get(k), b.get(k))
    assert main(["merge", p, str(tmp_path / "c"), "--quiet", "--no-compile-cache"]) == 0


def test_convert_refuses_then_overwrites(tiny_base, tmp_path, capsys):
    dst = tmp_path / "orbax"
    assert main(["convert", tiny_base, str(dst), "--to", "orbax"]) == 0
    assert main(["convert", tiny_base, str(dst), "--to", "orbax"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", tiny_base, str(dst), "--to", "orbax", "--overwrite"]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(dst), str(back), "--to", "safetensors"]) == 0
    from jmerge.io import open_checkpoint
    with open_checkpoint(tiny_base) as a, open_checkpoint(str(back)) as b:
        for k in a.keys():
            np.testing.assert_array_equal(a.get(k), b.get(k))


def test_cuda_flag_without_a_gpu_is_one_clear_line(tiny_base, tmp_path):
    """mergekit's --cuda maps to --device gpu; on a machine without a JAX GPU backend: exit 2, one line."""
    import subprocess
    import sys

    import jax
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is visible")
    p = _cfg(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_base}\n  - model: {tiny_base}\n")
    r = subprocess.run([sys.executable, "-m", "jmerge.cli", "merge", p, str(tmp_path / "out"), "--cuda", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "--device gpu" in r.stderr and "jax[cuda12]" in r.stderr
    assert not (tmp_path / "out").exists()
