"""Fused Pallas kernels for jmerge's inner loops (GPU/TPU; run with ``interpret=True`` on CPU).

Exports resolve lazily (PEP 562): ``jmerge.kernels.backend`` (which implementation the TIES family's final
pass uses) imports without Pallas, so building a method does not import it.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (MLSys 2023).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MoEGroups": "moe", "group_by_expert": "moe", "grouped_matmul": "moe", "moe_dense_reference": "moe",
    "moe_dispatch": "moe", "top_k_routing": "moe",
    "disjoint_merge": "ties", "disjoint_merge_reference": "ties",
    "masked_merge": "fused", "masked_merge_bytes": "fused",
    "merge_backend": "backend", "requested_merge_backend": "backend",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .backend import merge_backend, requested_merge_backend
    from .fused import masked_merge, masked_merge_bytes
    from .moe import MoEGroups, group_by_expert, grouped_matmul, moe_dense_reference, moe_dispatch, top_k_routing
    from .ties import disjoint_merge, disjoint_merge_reference


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'jmerge.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
