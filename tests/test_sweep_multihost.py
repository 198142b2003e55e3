"""Sweeps across two processes (jax.distributed on 127.0.0.1, 4 simulated CPU devices each, gloo collectives):
the gathered results equal a one-process run and one-by-one merges, the two processes computed disjoint shares
that cover every setting, only process 0 writes the sweep directory, and a resumed two-process sweep equals an
uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
import jmerge.sweep as sw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: same trees, settings and evaluation in every process (and in this test process). It records what
# its own devices computed (SettingsProgram.local: metrics read from its addressable shards, before the gather).
_CHILD = r"""
import os, sys, json
import jmerge.sweep as sw
if os.environ["NPROC"] != "1":
    sw.init_distributed("127.0.0.1:" + os.environ["PORT"], int(os.environ["NPROC"]), int(os.environ["PID"]))
import jax, jmerge
sys.path.insert(0, os.environ["TESTS"])
from test_sweep_multihost import trees, settings, evaluate
seen = {"local": {}, "shares": {}}
_call = sw.SettingsProgram.__call__
def call(self, *a, **k):
    r = _call(self, *a, **k)
    seen["local"].update({str(i): v["metric"] for i, v in self.local.items()})
    for p, rows in self.shares.items():
        seen["shares"].setdefault(str(p), []).extend(rows)
    return r
sw.SettingsProgram.__call__ = call
base, models, target = trees()
res = sw.run_sweep(jmerge.ties(), base, models, settings(), lambda m: evaluate(m, target), out_dir=os.environ["OUT"],
                   progress=False)
print("RESULT" + json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                             "local_devices": len(jax.local_devices()), "evaluated": res.evaluated,
                             "metrics": [r["metrics"].get("metric") for r in res.records],
                             "best": res.best["index"], **seen}), flush=True)
"""


def trees(T: int = 3):
    rng = np.random.default_rng(11)
    base = {"w": rng.normal(size=(24, 16)).astype(np.float32), "b": rng.normal(size=(16,)).astype(np.float32)}
    models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)]
    target = jax.tree.map(lambda x: x + 0.3, base)
    return base, models, target


def settings():
    return sw.grid({"density": [0.2, 0.4, 0.6, 0.8, 1.0], "scale": [0.5, 0.9]})  # 10 settings, padded to 16


def evaluate(merged, target):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(target)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TESTS=os.path.join(ROOT, "tests"),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _launch(nproc: int, **kw) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT, env=_env(NPROC=nproc, PID=i, PORT=port, **kw),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, so, se))
    results = []
    for rc, so, se in outs:
        if rc != 0 and ("gloo" in se.lower() and "not" in se.lower() and "support" in se.lower()):
            pytest.skip(f"this JAX has no gloo CPU collectives: {se.strip().splitlines()[-1]}")
        assert rc == 0, se[-4000:]
        results.append(json.loads(next(x for x in so.splitlines() if x.startswith("RESULT"))[6:]))
    return sorted(results, key=lambda r: r["process"])


def _one_by_one():
    base, models, target = trees()
    out = []
    for s in settings():
        m = jmerge.merge(jmerge.ties(), base, models, hparams=s)
        out.append(float(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                             for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(target)))))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh")
    one = _launch(1, OUT=d / "one")
    two = _launch(2, OUT=d / "two")
    return d, one[0], two


def test_two_processes_equal_one_process_and_one_by_one(runs):
    _, one, two = runs
    assert one["devices"] == 4 and [r["devices"] for r in two] == [8, 8]
    assert [r["local_devices"] for r in two] == [4, 4]
    ref = _one_by_one()
    np.testing.assert_allclose(one["metrics"], ref, rtol=1e-5)
    for r in two:  # every process holds every result after the gather, equal to the one-process run
        np.testing.assert_allclose(r["metrics"], one["metrics"], rtol=1e-6)
        assert r["best"] == one["best"] == int(np.argmin(ref))
    assert len(set(np.round(ref, 4))) == 10


def test_two_processes_evaluated_disjoint_shares(runs):
    _, one, two = runs
    mine = [set(map(int, r["local"])) for r in two]  # settings whose metrics each process computed itself
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(range(10))
    for r, rows in zip(two, mine):
        assert sorted(set(r["shares"][str(r["process"])])) == sorted(rows)
        for i in rows:  # what a process computed on its own devices equals the one-process number
            np.testing.assert_allclose(r["local"][str(i)], one["metrics"][i], rtol=1e-6)


def test_only_process_zero_writes_and_resume_across_processes(runs):
    d, one, two = runs
    out = d / "two"
    names = sorted(os.listdir(out))
    assert {"sweep.json", "results.jsonl", "results.csv", "results.json", "best.json"} <= set(names)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 10  # one writer: no line twice
    assert json.loads((out / "best.json").read_text())["index"] == one["best"]
    # resume: keep 4 finished lines and half of a fifth (a killed run), then rerun on two processes
    (out / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:12])
    again = _launch(2, OUT=out)
    assert [r["evaluated"] for r in again] == [6, 6]
    for r in again:
        np.testing.assert_allclose(r["metrics"], one["metrics"], rtol=1e-6)
    assert len((out / "results.jsonl").read_text().splitlines()) == 10
    body = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose([x["metrics"]["metric"] for x in sorted(body["results"], key=lambda x: x["index"])],
                               one["metrics"], rtol=1e-6)
