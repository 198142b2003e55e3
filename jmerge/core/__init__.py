"""core"""

from __future__ import annotations

from .tree import (MergeInputError, path_str, leaves_with_paths, check_compatible, leaf_key, layer_index, count_layers)
from .hparams import (Gradient, Rules, PerModel, resolve_hparams, layer_positions)
from .driver import (MergeState, Transform, StatsPhase, transform, chain, merge, merge_leaf, prepare_leaf_hparams, task_vectors, apply_delta, trace_count, model_sum, model_mean, model_max)
from .select import (topk_mask, topk_mask_rows, density_to_k, global_topk_phases, global_topk_mask)

__all__ = ['MergeInputError', 'path_str', 'leaves_with_paths', 'check_compatible', 'leaf_key', 'layer_index', 'count_layers', 'Gradient', 'Rules', 'PerModel', 'resolve_hparams', 'layer_positions', 'MergeState', 'Transform', 'StatsPhase', 'transform', 'chain', 'merge', 'merge_leaf', 'prepare_leaf_hparams', 'task_vectors', 'apply_delta', 'trace_count', 'model_sum', 'model_mean', 'model_max', 'topk_mask', 'topk_mask_rows', 'density_to_k', 'global_topk_phases', 'global_topk_mask']
