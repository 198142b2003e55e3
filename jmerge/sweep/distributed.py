"""Sweeps across processes (``jax.distributed``): one sweep, each process evaluating its share of the settings.

Every process runs the same :func:`~jmerge.sweep.run_sweep` call with the same settings, models and data. The
settings axis of each batch is sharded over the devices of *all* processes (``jax.devices()``), so each process
computes the settings that land on its own devices; the per-setting metrics (a few floats each) are then
all-gathered once per batch, so every process holds every result and picks the same best setting. Only process 0
reads and writes the sweep directory: it reads the finished settings of a resumed sweep and broadcasts them, and
it alone writes ``results.jsonl``, the tables, the plot and ``best.*``.

Launch (one command per host, or per process on one host)::

    python -c "import jmerge.sweep as sw; sw.init_distributed('10.0.0.1:1234', 2, PROCESS_ID); ..."
    jmerge sweep CONFIG --coordinator 10.0.0.1:1234 --num-processes 2 --process-id PROCESS_ID

On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``), set here before the
backend starts; on GPU/TPU JAX's own collectives are used.

References: Bradbury et al., JAX (``jax.distributed``, multi-controller ``jax.Array``,
``jax.experimental.multihost_utils``).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

__all__ = ["init_distributed", "process_count", "is_lead", "broadcast_json", "global_array", "allgather",
           "barrier"]


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Start ``jax.distributed`` (before any other JAX call of the process).

    Args:
      coordinator: ``host:port`` of process 0's coordinator; None lets JAX detect the cluster (SLURM, TPU pods,
        ``JAX_COORDINATOR_ADDRESS`` ...).
      num_processes: the number of processes.
      process_id: this process's index (0 writes the sweep directory).

    References: Bradbury et al., JAX (``jax.distributed.initialize``).
    """
    try:  # CPU processes need a cross-process collectives implementation; harmless on GPU/TPU backends
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - a JAX without the option: its default is used
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def process_count() -> int:
    """Processes of this sweep (1 without ``jax.distributed``).

    References: Bradbury et al., JAX (``jax.process_count``).
    """
    return jax.process_count()


def is_lead() -> bool:
    """True on process 0, the one that reads and writes the sweep directory.

    References: Bradbury et al., JAX (``jax.process_index``).
    """
    return jax.process_index() == 0


def broadcast_json(obj: Any) -> Any:
    """Process 0's ``obj`` (JSON-serialisable) on every process; ``obj`` is ignored elsewhere.

    References: Bradbury et al., JAX (``multihost_utils.broadcast_one_to_all``).
    """
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils as mu  # noqa: PLC0415
    raw = np.frombuffer(json.dumps(obj, allow_nan=True).encode("utf-8"), np.uint8) if is_lead() else None
    n = int(mu.broadcast_one_to_all(np.array(0 if raw is None else raw.size, np.int32)))
    buf = np.zeros(n, np.int32)
    if raw is not None:
        buf[:] = raw
    out = np.asarray(mu.broadcast_one_to_all(buf)).astype(np.uint8)
    return json.loads(out.tobytes().decode("utf-8"))


def global_array(x: Any, sharding: Any) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` (which may span processes) from ``x``, equal on every process.

    References: Bradbury et al., JAX (``jax.make_array_from_callback``).
    """
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def allgather(tree: Any) -> Any:
    """Every process's shards of the global arrays in ``tree`` on every process, as NumPy arrays (one collective).

    References: Bradbury et al., JAX (``multihost_utils.process_allgather``).
    """
    from jax.experimental import multihost_utils as mu  # noqa: PLC0415
    return jax.tree.map(np.asarray, mu.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process).

    References: Bradbury et al., JAX (``multihost_utils.sync_global_devices``).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils as mu  # noqa: PLC0415
        mu.sync_global_devices(name)
