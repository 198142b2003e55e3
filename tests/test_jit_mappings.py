"""The test suite's guard against running out of memory mappings (``tests/conftest.py``).

Every XLA:CPU executable keeps its JIT-compiled code in anonymous executable mappings of its own, and JAX's
caches keep executables alive; a pytest worker that runs half of this suite nears the kernel's
``vm.max_map_count`` (the likely cause of CI workers crashing inside XLA). ``conftest._release_compiled_programs`` calls
``jax.clear_caches()`` after every module: this checks that doing so releases those mappings, also for
jitted functions that are still alive (module-level ones are).
"""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")


def _exec_mappings() -> int:
    """Anonymous mappings with execute permission (JIT code), from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        fields = [line.split() for line in f]
    return sum(1 for x in fields if len(x) < 6 and x[1].startswith("r-x"))


def test_clear_caches_releases_the_jit_mappings_of_live_functions():
    x = jnp.ones((8, 8))
    jax.clear_caches()
    gc.collect()
    before = _exec_mappings()
    fs = [jax.jit(lambda a, c=float(i): jnp.tanh(a * c) + c) for i in range(40)]  # 40 distinct programs
    for f in fs:
        f(x).block_until_ready()
    grown = _exec_mappings() - before
    assert grown >= 40, f"expected one or more executable mappings per compiled program, got {grown} for 40"
    jax.clear_caches()
    gc.collect()
    assert _exec_mappings() - before <= 2, "jax.clear_caches() kept the executables' mappings"
    assert float(fs[0](x)[0, 0]) == 0.0  # the functions still work (recompiled): tanh(0) + 0
