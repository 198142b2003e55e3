"""Host memory reuse of in-memory merges on CPU (jmerge.core.heap): pages are reused inside the setting,
returned after it, and a merge's results do not change."""

import ctypes
import json
import os
import pathlib
import resource
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.core import heap

LIB = heap.glibc()
needs_glibc = pytest.mark.skipif(LIB is None, reason="glibc's mallopt only")


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


# Faults are counted per 4 KiB page: with transparent huge pages on every mapping they come 2 MiB at a time.
counts_pages = pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': faults per 2 MiB")
SIZE = 48 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB): a fresh mapping by default
PAGES = SIZE // 4096


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _touch_and_free() -> None:
    """malloc, write every page, free (what an XLA temporary does)."""
    LIB.malloc.restype = ctypes.c_void_p
    LIB.free.argtypes = [ctypes.c_void_p]
    p = LIB.malloc(ctypes.c_size_t(SIZE))
    assert p
    ctypes.memset(p, 1, SIZE)
    LIB.free(ctypes.c_void_p(p))


def _faults_of(rounds: int) -> int:
    f = _faults()
    for _ in range(rounds):
        _touch_and_free()
    return _faults() - f


_ROUNDS = """
import json
from jmerge.core import heap
from tests.test_heap import _faults_of, _touch_and_free
outside = _faults_of(2)
with heap.keep_host_memory() as on:
    active = heap.active()
    _touch_and_free()  # the first block faults in its pages once
    inside = _faults_of(3)
print(json.dumps({"outside": outside, "on": on, "active": active, "inside": inside, "active_after": heap.active(),
                  "after": _faults_of(2)}))
"""


def _run_fresh(code: str) -> dict:
    """``code`` in a fresh interpreter (its last line of output, JSON): page faults depend on the process's
    malloc and mapping history, which earlier tests in a pytest worker change (after some, a 48 MiB block came
    back in 2 MiB huge pages: 24 faults, CI of 43cd0d4)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@needs_glibc
@counts_pages
def test_freed_pages_are_reused_inside_and_returned_after():
    got = _run_fresh(_ROUNDS)
    assert got["outside"] >= 2 * PAGES * 0.9, got  # a fresh, zeroed mapping every time
    assert got["on"] and got["active"]
    assert got["inside"] < 0.05 * PAGES, got  # the next blocks reuse them
    assert not got["active_after"]
    # glibc's thresholds again: fresh mappings, the kept memory was returned
    assert got["after"] >= 2 * PAGES * 0.9, got


@needs_glibc
@counts_pages
def test_nested_and_threaded_use_keeps_the_setting_until_the_last_exit():
    with heap.keep_host_memory():
        with heap.keep_host_memory():
            pass
        assert heap.active()  # the inner exit does not restore
        _touch_and_free()
        assert _faults_of(1) < 0.05 * PAGES
        seen = []
        t = threading.Thread(target=lambda: seen.append(heap.active()))
        t.start()
        t.join()
        assert seen == [True]
    assert not heap.active()


def _tree(n_leaves=8, shape=(1024, 2816)):
    rng = np.random.default_rng(0)
    base = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(shape, np.float32))} for i in range(n_leaves)}
    models = [jax.tree.map(lambda x, j=j: x + 0.01 * jnp.asarray(rng.standard_normal(x.shape, np.float32)), base)
              for j in range(3)]
    return base, models


_LOOP = """
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
import jmerge
from tests.test_heap import _tree
base, models = _tree()
method = jmerge.model_stock()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def faults_of_calls():
    outs, f = [], faults()
    for _ in range(3):
        outs.append(jax.block_until_ready(jmerge.merge(method, base, models)))
        del outs[0:-1]  # the previous result is freed, as in a loop
    return outs[-1], (faults() - f) / 3

jax.block_until_ready(jmerge.merge(method, base, models))  # compile
ref, f_off = faults_of_calls()
with jmerge.keep_host_memory():
    faults_of_calls()  # each thread's malloc arena holds freed memory after a few calls
    out, f_on = faults_of_calls()
same = all(np.array_equal(np.asarray(out[k]["kernel"]), np.asarray(ref[k]["kernel"])) for k in base)
print(json.dumps({"on": f_on, "off": f_off, "same": same}))
"""


@needs_glibc
@counts_pages
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host memory: the CPU backend")
def test_a_loop_of_merges_reuses_pages():
    """A loop of merges inside the setting: results bit-identical, and no more page faults per call than
    outside it. Model Stock used to write a stacked intermediate per leaf (3 x 11 MiB), which the setting
    let a loop reuse (faults 0.24-0.26x); since it reads the models in one variadic reduction it writes
    none, and its calls reuse their pages with or without the setting (ratio 0.28-0.65 in both after a
    first round, 1.1 after a warm-up round outside too; measured 2026-12-01), so the gain is no longer
    asserted here. The setting itself is checked by the malloc rounds above (0 faults inside, a full
    mapping outside)."""
    got = _run_fresh(_LOOP)
    assert got["same"]
    assert got["on"] <= 1.5 * got["off"], got  # never worse: measured 0.28-0.65


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host memory: the CPU backend")
def test_merges_inside_the_setting_are_unchanged():
    """Inside the setting, bit-identical results, and the formula (NumPy): ``t = T cos / (1 + (T - 1) cos)``,
    ``cos`` the mean pairwise cosine of the task vectors."""
    base, models = _tree(2)
    method = jmerge.model_stock()
    ref = jax.block_until_ready(jmerge.merge(method, base, models))
    with jmerge.keep_host_memory():
        out = [jax.block_until_ready(jmerge.merge(method, base, models)) for _ in range(2)][-1]
    for k in base:
        np.testing.assert_array_equal(np.asarray(out[k]["kernel"]), np.asarray(ref[k]["kernel"]))
    b = np.asarray(base["l0"]["kernel"], np.float64)
    tau = [np.asarray(mm["l0"]["kernel"], np.float64) - b for mm in models]
    cos = np.mean([np.sum(tau[i] * tau[j]) / np.linalg.norm(tau[i]) / np.linalg.norm(tau[j])
                   for i in range(3) for j in range(i + 1, 3)])
    t = 3 * cos / (1 + 2 * cos)
    np.testing.assert_allclose(np.asarray(out["l0"]["kernel"]), b + t * np.mean(tau, axis=0), rtol=0, atol=2e-6)
    assert not heap.active()
