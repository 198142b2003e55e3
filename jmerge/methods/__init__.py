"""Merge methods, one family per module; every named method is a short chain of core steps.

``METHODS`` maps each registered name (what the CLI and mergekit configs use) to its factory.

References: see each family module.
"""

from __future__ import annotations

from .basic import METHODS as _BASIC
from .basic import linear, negation, per_model, scale, task_arithmetic, weighted_sum
from .fusion import METHODS as _FUSION
from .fusion import arcee_fusion, fusion_importance
from .geometric import METHODS as _GEOMETRIC
from .geometric import karcher, model_stock, multislerp, nearswap, nuslerp, slerp
from .layers import METHODS as _LAYERS
from .layers import HEAD_FILTER, layer_swap, layer_swap_source, lines, lines_position, lines_scale, select_model
from .masks import METHODS as _MASKS
from .masks import (PackedMask, consensus_mask, consensus_ta, consensus_ties, emr_merge, emr_task_models, extras_item,
                    pack_masks, pcb, tall_masks, tall_merge, tall_task_models, unpack_masks)
from .ram import METHODS as _RAM
from .ram import ram, ram_contributors, ramplus_tl
from .sparsify import breadcrumbs_drop, dare, della_drop, rescale_l1, trim
from .spectral import METHODS as _SPECTRAL
from .spectral import iso_c, iso_cts, iso_cts_sizes, tsv_m, tsv_rank
from .ties import METHODS as _TIES
from .ties import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, disjoint_merge,
                   elect_sign, magmax, sce, ties)

METHODS = {**_BASIC, **_TIES, **_MASKS, **_GEOMETRIC, **_SPECTRAL, **_LAYERS, **_FUSION, **_RAM}
"""Registered named methods: ``{name: factory}``; ``factory(**kwargs)`` returns a Transform."""

__all__ = [
    "METHODS",
    # steps
    "weighted_sum", "scale", "per_model", "trim", "dare", "breadcrumbs_drop", "della_drop", "rescale_l1", "elect_sign",
    "disjoint_merge", "tall_masks", "consensus_mask", "lines_scale", "select_model",
    # named methods
    "linear", "task_arithmetic", "negation", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "magmax", "sce", "consensus_ta", "consensus_ties", "tall_merge", "pcb", "emr_merge",
    "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "tsv_m", "iso_c", "iso_cts", "lines",
    "layer_swap", "arcee_fusion", "ram", "ramplus_tl",
    # helpers
    "tall_task_models", "extras_item", "PackedMask", "pack_masks", "unpack_masks", "emr_task_models", "tsv_rank",
    "iso_cts_sizes", "lines_position", "layer_swap_source", "HEAD_FILTER", "fusion_importance",
    "ram_contributors",
]
