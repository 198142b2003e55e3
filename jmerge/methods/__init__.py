"""methods"""

from __future__ import annotations

from .basic import (per_model, weighted_sum, scale, linear, task_arithmetic, negation)
from .sparsify import (trim, dare, breadcrumbs_drop, della_drop, rescale_l1)
from .ties import (elect_sign, disjoint_merge, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, magmax, sce)
from .masks import (tall_masks, consensus_mask, consensus_ta, consensus_ties, tall_merge, tall_task_models, extras_item, PackedMask, pack_masks, unpack_masks, pcb, emr_merge, emr_task_models)
from .geometric import (slerp, nuslerp, multislerp, karcher, model_stock, nearswap)
from .spectral import (tsv_m, iso_c, tsv_rank)
from .layers import (lines, lines_scale, lines_position, layer_swap, layer_swap_source, select_model, HEAD_FILTER)
from .basic import METHODS as _BASIC
from .ties import METHODS as _TIES
from .masks import METHODS as _MASKS
from .geometric import METHODS as _GEOMETRIC
from .spectral import METHODS as _SPECTRAL
from .layers import METHODS as _LAYERS

METHODS = {**_BASIC, **_TIES, **_MASKS, **_GEOMETRIC, **_SPECTRAL, **_LAYERS}


__all__ = ['per_model', 'weighted_sum', 'scale', 'linear', 'task_arithmetic', 'negation', 'trim', 'dare', 'breadcrumbs_drop', 'della_drop', 'rescale_l1', 'elect_sign', 'disjoint_merge', 'ties', 'dare_linear', 'dare_ties', 'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear', 'magmax', 'sce', 'tall_masks', 'consensus_mask', 'consensus_ta', 'consensus_ties', 'tall_merge', 'tall_task_models', 'extras_item', 'PackedMask', 'pack_masks', 'unpack_masks', 'pcb', 'emr_merge', 'emr_task_models', 'slerp', 'nuslerp', 'multislerp', 'karcher', 'model_stock', 'nearswap', 'tsv_m', 'iso_c', 'tsv_rank', 'lines', 'lines_scale', 'lines_position', 'layer_swap', 'layer_swap_source', 'select_model', 'HEAD_FILTER']
