"""XLA workaround 9 (``jmerge.core.xla.fast_compile_options``): CPU compile options that cut compile time.

The options must be in effect where the pipeline asks for them (the compiled program differs), and they
must not change a single bit of any output: each method is run on the same leaves with and without them
(``np.array_equal`` on the raw bytes), in the leaf program and through ``run_merge``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.core import LeafProgram, driver, xla
from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import parse_config
from jmerge.pipeline import executor, run_merge

JAX_VERSION = tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:2])
T = 3
METHODS = {
    "ties": lambda: jmerge.ties(density=0.2),
    "dare_ties": lambda: jmerge.dare_ties(density=0.5),
    "task_arithmetic": lambda: jmerge.task_arithmetic(),
    "della": lambda: jmerge.della(density=0.7, epsilon=0.15),
    "breadcrumbs": lambda: jmerge.breadcrumbs(density=0.9, gamma=0.01),
}


def _leaves(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    models = np.stack([base + rng.standard_normal(shape, np.float32) * np.float32(0.002) for _ in range(T)])
    return jnp.asarray(base, dtype), jnp.asarray(models, dtype)


def _hp(method):
    return {k: jnp.float32(v) for k, v in method.defaults.items()}


def test_options_are_used_where_this_xla_has_them():
    """JAX 0.10's XLA:CPU takes both options; JAX >= 0.11 has no ``xla_cpu_use_fusion_emitters`` (the
    fusion emitters are its only path), so nothing is passed. A release that changes this shows here."""
    opts = xla.fast_compile_options()
    if jax.default_backend() != "cpu":
        assert opts == {}
    elif JAX_VERSION < (0, 11):
        assert opts == xla.FAST_COMPILE_OPTIONS
        assert opts["xla_cpu_use_fusion_emitters"] is False
        assert "xla_cpu_enable_fast_min_max" not in opts and "xla_cpu_enable_fast_math" not in opts
    else:
        assert opts == {}
        assert driver._fast_jits() == (driver._leaf_jit, driver._collect_jit)


def test_fast_program_is_compiled_with_the_options():
    """Where the options exist, the executable a ``fast_compile=True`` call runs is not the default one:
    XLA's elemental emitters fuse differently, which the optimized HLO shows."""
    if not xla.fast_compile_options():
        pytest.skip("this XLA has none of the options (JAX >= 0.11) or the backend is not the CPU")
    b, ms = _leaves((256, 512), jnp.float32)
    method = jmerge.ties(density=0.2)
    kw = dict(stacked="models", out_dtype="float32", return_extras=False, view=None, precision=None)
    fast_jit = driver._fast_jits()[0]
    assert fast_jit is not driver._leaf_jit
    args = (method, b, ms, _hp(method), jax.random.key(0), {})
    fast = fast_jit.trace(*args, **kw).lower().compile().as_text()
    plain = driver._leaf_jit.trace(*args, **kw).lower().compile().as_text()
    assert fast != plain
    # the same options given to the plain program's compile give the fast program
    explicit = driver._leaf_jit.trace(*args, **kw).lower().compile(compiler_options=xla.FAST_COMPILE_OPTIONS)
    assert explicit.as_text() == fast


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("shape,dtype", [((96, 160), jnp.float32), ((64, 130), jnp.bfloat16), ((300,), jnp.float32)])
def test_outputs_are_bit_identical_with_and_without_the_options(name, shape, dtype):
    method = METHODS[name]()
    b, ms = _leaves(shape, dtype, seed=len(name))
    prog = LeafProgram(method)
    key = jmerge.leaf_key(7, "layer.weight")  # DARE's and DELLA's draws: the same key both ways
    hp = _hp(method)
    outs = [np.asarray(prog(b, ms, hp, key, {}, None, models_stacked=True, fast_compile=f)) for f in (False, True)]
    assert outs[0].dtype == outs[1].dtype == np.dtype(dtype)
    assert np.array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8)), name
    assert np.any(outs[0] != np.asarray(b)), "the merge changed nothing: the comparison would prove little"


def test_fast_compile_shapes_follow_the_work_bound():
    class _Job:
        def __init__(self, shape, n):
            self.shape, self.op = shape, type("Op", (), {"models": (None,) * n})()

    small, big = (1024, 1024), (8192, 8192)  # 3 x 1M entries x 8 tensors; 3 x 64M x 8 = 1.6G > the bound
    fast = executor.fast_compile_shapes([_Job(small, 3)] * 8 + [_Job(big, 3)] * 8)
    assert small in fast and big not in fast
    assert xla.FAST_COMPILE_MAX_WORK >= 3 * 16 * 5632 * 2048  # a 0.54B Llama's largest group stays fast


def _ties_yaml(base, fts):
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.3}}\n" for p in fts)
    return f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n{models}parameters:\n  normalize: true\n" \
           f"dtype: float32\nseed: 3\n"


def _read_raw(d):
    with open_checkpoint(d) as r:
        return {k: np.asarray(r.get(k)).view(np.uint8).copy() for k in r.keys()}


def test_pipeline_uses_the_options_and_writes_the_same_bytes(tiny_base, tiny_fts, tmp_path, monkeypatch):
    plan = parse_config(_ties_yaml(tiny_base, tiny_fts))
    calls = []
    real_call = LeafProgram.__call__

    def spy(self, *a, **kw):
        calls.append(kw.get("fast_compile"))
        return real_call(self, *a, **kw)

    monkeypatch.setattr(LeafProgram, "__call__", spy)
    run_merge(plan, str(tmp_path / "fast"), quiet=True)
    assert calls and all(c is True for c in calls)  # tiny tensors: every program compiles fast
    calls.clear()
    monkeypatch.setattr(executor, "fast_compile_shapes", lambda merges, **kw: frozenset())
    run_merge(plan, str(tmp_path / "plain"), quiet=True)
    assert calls and not any(calls)
    fast, plain = _read_raw(str(tmp_path / "fast")), _read_raw(str(tmp_path / "plain"))
    assert fast.keys() == plain.keys() and len(fast) > 3
    for k in fast:
        assert np.array_equal(fast[k], plain[k]), k
