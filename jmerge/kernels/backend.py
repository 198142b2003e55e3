"""Which implementation runs the TIES family's final pass: the Pallas kernel or XLA's fusion.

``"auto"`` (the default) picks the Pallas kernel (:func:`jmerge.kernels.masked_merge`) when JAX's
default backend is in :data:`AUTO_PALLAS_BACKENDS` (none yet: measured on an H200, XLA's fusion was as fast
or faster), the process sees one device and the leaf has at least :data:`AUTO_MIN_ENTRIES` entries, and XLA
elsewhere (with several devices a leaf may be sharded, and a Pallas call has no sharding rule here: XLA
would gather its operands); ``"pallas"`` forces the kernel (compiled on a GPU/TPU; on CPU it runs in the
Pallas interpreter: a correctness check, slow), ``"xla"`` forces XLA. The choice is read when a method is
built (``jmerge.ties(...)``, or a method named in ``jmerge.merge``/a config), from :func:`merge_backend` (a
context manager) or else the environment variable ``JMERGE_MERGE_BACKEND``; it is part of the method's
identity, so methods built under different choices compile separately. This module imports no JAX at import time.

Where the kernel applies, a TIES-family chain (``[trim | dare [+ trim] | breadcrumbs | della] -> elect_sign
-> disjoint_merge [-> scale]``) runs per leaf as one pass (``jmerge.methods.ties_fused``): the exact top-k
thresholds (or a drop's mask) by XLA, then one kernel reading the models and the base once and writing
``base + delta``; other chains with ``disjoint_merge`` run their steps, the kernel fusing the final aggregation.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

__all__ = ["BACKENDS", "ENV_VAR", "AUTO_MIN_ENTRIES", "AUTO_PALLAS_BACKENDS", "merge_backend",
           "requested_merge_backend", "use_pallas"]

BACKENDS = ("auto", "xla", "pallas")
"""The accepted names."""
ENV_VAR = "JMERGE_MERGE_BACKEND"
"""The environment variable read when no :func:`merge_backend` context is active."""
AUTO_PALLAS_BACKENDS: tuple[str, ...] = ()
"""JAX backends on which ``"auto"`` picks the kernel: none yet. On an NVIDIA H200 (JAX 0.11.2, 2026-11-30,
``scripts/bench_kernels.py --fused``, 2^26 entries) XLA's fusion of the same arithmetic was faster than
the kernel at every block size (bfloat16, T=2: 0.34 ms vs 0.38 at best; T=4: 0.43 vs 0.51), and
``jmerge.merge(ties)`` took the same time either way (2.39 vs 2.50 ms, 4.31 vs 4.34), its exact top-k
passes dominating; on TPU the kernel has not run compiled. A backend joins when it measures faster."""
AUTO_MIN_ENTRIES = 1 << 16
"""``"auto"`` leaves smaller leaves to XLA (a kernel launch per small bias or norm is not worth it)."""

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jmerge_merge_backend", default=None)


def _checked(name: str, where: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a merge backend; use one of {list(BACKENDS)}.")
    return value


def requested_merge_backend() -> str:
    """The backend requested now: the innermost :func:`merge_backend` context, else ``$JMERGE_MERGE_BACKEND``,
    else ``"auto"``.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    value = _OVERRIDE.get()
    if value is not None:
        return value
    env = os.environ.get(ENV_VAR, "").strip()
    return _checked(env, ENV_VAR) if env else "auto"


@contextlib.contextmanager
def merge_backend(name: str) -> Iterator[str]:
    """Build methods inside this block with the given backend (``"auto"``, ``"xla"`` or ``"pallas"``).

    Example: ``with jmerge.kernels.merge_backend("pallas"): out = jmerge.merge(jmerge.ties(), base, models)``.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    token = _OVERRIDE.set(_checked(name, "merge_backend"))
    try:
        yield _OVERRIDE.get()
    finally:
        _OVERRIDE.reset(token)


def use_pallas(requested: str, size: int, precision: str | None = None) -> bool:
    """Whether a leaf of ``size`` entries computed in ``precision`` runs the Pallas kernel under ``requested``
    (see the module docstring for ``"auto"``).

    The kernel emulates float32 and bfloat16 compute; float16 (and empty leaves) always stay on XLA.

    References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    """
    if requested == "xla" or size == 0 or precision not in (None, "bfloat16"):
        return False
    if requested == "pallas":
        return True
    import jax

    return jax.default_backend() in AUTO_PALLAS_BACKENDS and jax.device_count() == 1 and size >= AUTO_MIN_ENTRIES
