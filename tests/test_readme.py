"""Every code block of the README runs here.

Python blocks run in order in one namespace, after a prelude that builds what the README calls
``base_params``, ``ft1``..``ft3`` (a small Flax linen model with attention) and the leaves of the
out-of-core example. Command blocks run their commands: ``jmerge ...`` lines through the CLI (outputs
in a temporary directory), the fresh-machine demo command verbatim in a fresh virtual environment
(in CI, or when JMERGE_README_COMMANDS=1: it installs packages and trains the demo), and
``bash scripts/test.sh``, which is what CI itself runs, is checked to be what ``.ci/run`` calls.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jmerge
from tests.conftest import REPO_ROOT

README = os.path.join(REPO_ROOT, "README.md")


def _blocks():
    text = open(README, encoding="utf-8").read()
    return [(lang, body) for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S)]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(x)
        return x + nn.Dense(x.shape[-1], name="mlp")(x)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Block(name=f"layers_{i}")(x)
        return nn.Dense(3, name="head")(x)


def _prelude() -> dict:
    x = jnp.ones((1, 4, 8))
    trees = [_Net().init(jax.random.key(s), x)["params"] for s in range(4)]
    base = trees[0]
    fts = [jax.tree.map(lambda b, t: b + 0.05 * t, base, t) for t in trees[1:]]
    leaf = lambda t: t["layers_1"]["mlp"]["kernel"]
    return {"base_params": base, "ft1": fts[0], "ft2": fts[1], "ft3": fts[2], "base_leaf": leaf(base),
            "m1_leaf": leaf(fts[0]), "m2_leaf": leaf(fts[1])}


def test_readme_has_the_expected_blocks():
    langs = [lang for lang, _ in _blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 3
    assert all(lang in ("python", "bash") for lang in langs), langs


def test_python_blocks_run():
    ns = _prelude()
    for lang, body in _blocks():
        if lang == "python":
            exec(compile(body, README, "exec"), ns)  # noqa: S102 - the README's own code
    # what the blocks claim
    chain = ns["my_method"]
    assert chain.defaults["dare.density"] == 0.3 and chain.defaults["trim.density"] == 0.5
    with pytest.raises(jmerge.MergeInputError, match="ambiguous"):
        jmerge.merge(chain, ns["base_params"], [ns["ft1"], ns["ft2"]], hparams={"density": 0.2})
    ref = jmerge.merge(jmerge.ties(scale=0.7), ns["base_params"], [ns["ft1"], ns["ft2"], ns["ft3"]])
    for a, b in zip(jax.tree.leaves(ns["merged"]), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert ns["leaf"].shape == ns["base_leaf"].shape
    # sharded_leaf() changes where a norm is reduced, not the merge: equal to the eager merge outside it (its
    # numbers against NumPy's DARE-L1: tests/test_chunks.py)
    plain = jmerge.merge(jmerge.dare_ties(rescale="l1"), ns["base_params"], [ns["ft1"], ns["ft2"]])
    for a, b in zip(jax.tree.leaves(ns["merged_sharded"]), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the Rngs key leaf of the merged state is the base's (taken, not merged)
    key = lambda s: np.asarray(jax.random.key_data(nnx.state(ns["Net"](nnx.Rngs(s)))["dropout"]["rngs"]["key"].value))
    got = np.asarray(jax.random.key_data(ns["merged_state"]["dropout"]["rngs"]["key"].value))
    np.testing.assert_array_equal(got, key(0))
    assert not np.array_equal(got, key(1))


def _commands():
    for lang, body in _blocks():
        if lang != "bash":
            continue
        for line in body.splitlines():
            cmd = line.split("#", 1)[0].strip()
            if cmd:
                yield cmd


def test_cli_commands_run(tmp_path, monkeypatch):
    from jmerge.cli import main
    monkeypatch.chdir(REPO_ROOT)
    ran = 0
    for cmd in _commands():
        if not cmd.startswith("jmerge "):
            continue
        argv = shlex.split(cmd)[1:]
        # outputs go to the temporary directory (names as in the README)
        argv = [str(tmp_path / a) if a.startswith("merged-") else a for a in argv]
        assert main(argv + (["--quiet"] if argv[0] == "merge" and "--dry-run" not in argv else [])) == 0, cmd
        ran += 1
    assert ran >= 4
    assert (tmp_path / "merged-ties" / "model.safetensors").exists()
    assert os.path.isdir(tmp_path / "merged-ties-orbax")


def test_the_test_command_is_what_ci_runs():
    cmds = list(_commands())
    assert "bash scripts/test.sh" in cmds
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    assert re.search(r"^bash scripts/test\.sh$", ci, re.M)


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("JMERGE_README_COMMANDS")) or
                    sys.version_info[:2] != (3, 11),
                    reason="installs packages and trains the demo (~3 min): runs in CI on Python 3.11, or with "
                           "JMERGE_README_COMMANDS=1")
def test_fresh_machine_demo_command(tmp_path):
    """The README's main command, verbatim, in a copy of the repository's tracked files."""
    cmd = next(c for c in _commands() if c.startswith("python3 -m venv"))
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        dst = tmp_path / "repo" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isfile(os.path.join(REPO_ROOT, rel)):
            shutil.copy2(os.path.join(REPO_ROOT, rel), dst)
    env = dict(os.environ, HOME=str(tmp_path / "home"))  # empty demo cache: trains from scratch
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", os.path.expanduser("~/.cache/pip"))
    r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path / "repo", env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "individual fine-tuned" in r.stdout and "task_arithmetic" in r.stdout
