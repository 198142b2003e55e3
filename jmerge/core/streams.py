"""Execution streams for the per-leaf programs a merge dispatches on the CPU: consecutive leaves run at once.

XLA's CPU client runs the computations dispatched to one device one after another, in the order of
their *execution stream* (a per-thread id, 0 unless set): a computation waits for the previous one of its
stream, not for those of other streams. A leaf program of a top-k method spends much of its time in
small single-threaded kernels (its search's bookkeeping) between its multi-threaded passes, and during
those one of this project's two cores idles. :func:`leaf_stream` dispatches successive eager leaf
programs on :data:`LEAF_STREAMS` streams in turn, so one leaf's bookkeeping runs beside another leaf's
passes. Every program computes what it computed alone (the same compiled code on the same inputs;
``tests/test_streams.py`` checks the merges bit for bit), and data dependencies still order them (an
output consumed by a later computation is waited for, whatever its stream).

Measured on ``scripts/bench_methods.py``'s 102.8M-parameter tree (2 cores, JAX 0.10.2; one stream -> two):
task arithmetic 0.132 -> 0.118 s, TIES 0.47 -> 0.39 s, Breadcrumbs 0.52 -> 0.41 s, Arcee Fusion 0.78 ->
0.64 s, whole-model TIES 0.36 -> 0.31 s; three or four streams gained nothing more.

Only where it is safe and useful: outside a trace, for a leaf of at least :data:`MIN_ENTRIES` entries whose
inputs are host arrays (placed on the default device, a CPU) or live on one CPU device, in a single-process
run, and whose computation holds no linear-algebra decomposition, FFT or host callback. jaxlib's LAPACK
kernels (SVD, eigh, QR, Cholesky, ...) split a batch over XLA's intra-op thread pool and block their thread
until the parts are done: two of them running at once on a two-thread pool wait for each other forever
(measured: two batched SVDs on two streams deadlock at once; ``jax.numpy`` matrix products on two streams do
not). Which programs qualify is read once per program signature from its jaxpr (the trace ``jax.jit`` makes
anyway: its cache serves the call after). Sharded or replicated leaves (programs over several devices, whose
collectives order themselves), other backends and multi-host runs keep the caller's stream.

References: none (XLA's PjRt CPU client orders executions per execution stream).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, ContextManager, Iterator, Mapping

import jax
import numpy as np

try:  # a per-thread execution stream id (jaxlib 0.10 and 0.12 have it); without it, one stream
    from jaxlib.xla_client import execution_stream_id as _execution_stream_id
    from jax._src.lib import _jax as _jax_lib
    _get_stream = _jax_lib.get_execution_stream_id
except (ImportError, AttributeError):  # pragma: no cover - a jaxlib without execution streams
    _execution_stream_id = None
    _get_stream = None

__all__ = ["LEAF_STREAMS", "MIN_ENTRIES", "leaf_stream", "concurrent_safe", "iter_eqns"]

LEAF_STREAMS = 2
"""Execution streams that eager leaf programs take in turn (1: the caller's stream alone, one after another)."""

MIN_ENTRIES = 1 << 16
"""Leaves with fewer entries keep the caller's stream: their programs are too short to overlap, and choosing a
stream (~20 us) would cost more than it saves (32 leaves of 64 x 64 and 64 entries, task arithmetic: 1.5 ->
2.8 ms per merge with streams for every leaf)."""

_NEXT = itertools.count()
_SAFE: dict = {}  # program signature -> whether it may run beside another
_SAFE_MAX = 4096


def _blocking_primitives() -> frozenset:
    """The primitives whose CPU kernels may block an intra-op thread on work queued to the same pool: every
    primitive of ``jax.lax.linalg`` (jaxlib's LAPACK kernels), and FFTs."""
    names = {"svd", "eigh", "eig", "qr", "geqrf", "geqp3", "householder_product", "ormqr", "lu", "cholesky",
             "cholesky_update", "triangular_solve", "schur", "hessenberg", "tridiagonal", "tridiagonal_solve",
             "symmetric_product", "lu_pivots_to_permutation", "fft"}
    try:
        from jax._src.lax import linalg
        from jax._src import core
        names |= {v.name for v in vars(linalg).values() if isinstance(v, core.Primitive)}
    except (ImportError, AttributeError):  # pragma: no cover - the list above
        pass
    return frozenset(names)


_BLOCKING = _blocking_primitives()


def iter_eqns(jaxpr: Any) -> Iterator[Any]:
    """The equations of a jaxpr and of all its sub-jaxprs (loop bodies, branches, nested jits), depth first.

    References: none (infrastructure).
    """
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)


def concurrent_safe(jaxpr: Any) -> bool:
    """Whether a computation with this jaxpr (and its sub-jaxprs: loops, branches, nested jits) may run
    beside another on the CPU: no primitive of :func:`_blocking_primitives` and no host callback.

    References: none (see the module docstring).
    """
    return not any(e.primitive.name in _BLOCKING or "callback" in e.primitive.name for e in iter_eqns(jaxpr))


def _on_one_cpu(leaves: list) -> bool:
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return False
        sh = getattr(x, "sharding", None)
        if sh is None:
            continue  # a host array: placed on the default device
        devs = sh.device_set
        if len(devs) != 1 or next(iter(devs)).platform != "cpu":
            return False
    return True


def _signature(fn: Callable, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    leaves, treedef = jax.tree.flatten(args[1:])
    return (fn, args[0], treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves),
            tuple(sorted(kwargs.items())))


def leaf_stream(fn: Callable, args: tuple, kwargs: Mapping[str, Any], arrays: Any) -> ContextManager:
    """The context to call ``fn(*args, **kwargs)`` (a jitted per-leaf program; ``args[0]`` is its static
    method) in: the next of :data:`LEAF_STREAMS` execution streams where the program runs on one CPU device
    of a single-process run and :func:`concurrent_safe` holds for it, else a context that changes nothing.
    ``arrays``: the program's input arrays, the base leaf first (its size and their devices decide: leaves of
    fewer than :data:`MIN_ENTRIES` entries keep the caller's stream).

    References: none (see the module docstring).
    """
    if _execution_stream_id is None or LEAF_STREAMS <= 1:
        return contextlib.nullcontext()
    leaves = jax.tree.leaves(arrays)
    if (not leaves or np.size(leaves[0]) < MIN_ENTRIES or jax.default_backend() != "cpu"
            or jax.process_count() != 1 or not _on_one_cpu(leaves)):
        return contextlib.nullcontext()
    try:
        sig = _signature(fn, args, kwargs)
        safe = _SAFE.get(sig)
        if safe is None:
            safe = concurrent_safe(fn.trace(*args, **kwargs).jaxpr.jaxpr)  # jit's own trace, cached for the call
            if len(_SAFE) >= _SAFE_MAX:
                _SAFE.clear()
            _SAFE[sig] = safe
    except Exception:  # noqa: BLE001 - unhashable arguments, or a trace that fails: the call itself says why
        return contextlib.nullcontext()
    if not safe:
        return contextlib.nullcontext()
    return _execution_stream_id(_get_stream() + 1 + next(_NEXT) % LEAF_STREAMS)
