"""Timing helper shared by the benchmark scripts (run as ``python scripts/<bench>.py``)."""

from __future__ import annotations

import time

import jax


def best_time(f, *args, repeat: int = 5) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``f(*args)``, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts)
