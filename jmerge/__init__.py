"""jmerge: JAX-native model merging.

Task vectors, masks and merges (task arithmetic, TIES, DARE, TALL masks, PCB, AdaMerging ...) as
pure, jittable, shardable pytree transforms, composable like ``optax.chain``.

    import jmerge
    merged = jmerge.merge(jmerge.ties(density=0.2, scale=1.0), base_params, [ft1, ft2, ft3])
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core import (MergeInputError, path_str, leaves_with_paths, check_compatible, leaf_key, layer_index, count_layers, Gradient, Rules, PerModel, resolve_hparams, layer_positions, MergeState, Transform, StatsPhase, transform, chain, merge, merge_leaf, prepare_leaf_hparams, task_vectors, apply_delta, trace_count, model_sum, model_mean, model_max, topk_mask, topk_mask_rows, density_to_k, global_topk_phases, global_topk_mask)
from .methods import (per_model, weighted_sum, scale, linear, task_arithmetic, negation, trim, dare, breadcrumbs_drop, della_drop, rescale_l1, elect_sign, disjoint_merge, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, magmax, sce, tall_masks, consensus_mask, consensus_ta, consensus_ties, tall_merge, tall_task_models, extras_item, PackedMask, pack_masks, unpack_masks, pcb, emr_merge, emr_task_models, slerp, nuslerp, multislerp, karcher, model_stock, nearswap, tsv_m, iso_c, tsv_rank, lines, lines_scale, lines_position, layer_swap, layer_swap_source, select_model, HEAD_FILTER)
from .learned import (LearnedMerge, LearnedMergeError, adamerging, atlas, merge_with_coefficients, concrete_merge, concrete_mask, fisher_information, fisher_merge, gram_matrices, regmean_merge, adaptive_projective_gd, linearize)
from .io import (CheckpointError, CheckpointReader, CheckpointWriter, open_checkpoint, copy_aux_files, model_card, save_orbax, load_orbax, convert, flat_to_nested, nested_to_flat)
from .mergekit import (ConfigError, MergeConfig, MergePlan, load_config, parse_config, MERGEKIT_METHODS)
from .pipeline import (run_merge, plan_summary, TensorJob)
from .methods import METHODS as _METHODS


def available_methods() -> dict:
    """Named merge methods: ``{name: factory}``; ``factory(**hparams)`` returns a Transform."""
    return dict(_METHODS)

__all__ = ['__version__', 'available_methods', 'MergeInputError', 'path_str', 'leaves_with_paths', 'check_compatible', 'leaf_key', 'layer_index', 'count_layers', 'Gradient', 'Rules', 'PerModel', 'resolve_hparams', 'layer_positions', 'MergeState', 'Transform', 'StatsPhase', 'transform', 'chain', 'merge', 'merge_leaf', 'prepare_leaf_hparams', 'task_vectors', 'apply_delta', 'trace_count', 'model_sum', 'model_mean', 'model_max', 'topk_mask', 'topk_mask_rows', 'density_to_k', 'global_topk_phases', 'global_topk_mask', 'per_model', 'weighted_sum', 'scale', 'linear', 'task_arithmetic', 'negation', 'trim', 'dare', 'breadcrumbs_drop', 'della_drop', 'rescale_l1', 'elect_sign', 'disjoint_merge', 'ties', 'dare_linear', 'dare_ties', 'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear', 'magmax', 'sce', 'tall_masks', 'consensus_mask', 'consensus_ta', 'consensus_ties', 'tall_merge', 'tall_task_models', 'extras_item', 'PackedMask', 'pack_masks', 'unpack_masks', 'pcb', 'emr_merge', 'emr_task_models', 'slerp', 'nuslerp', 'multislerp', 'karcher', 'model_stock', 'nearswap', 'tsv_m', 'iso_c', 'tsv_rank', 'lines', 'lines_scale', 'lines_position', 'layer_swap', 'layer_swap_source', 'select_model', 'HEAD_FILTER', 'LearnedMerge', 'LearnedMergeError', 'adamerging', 'atlas', 'merge_with_coefficients', 'concrete_merge', 'concrete_mask', 'fisher_information', 'fisher_merge', 'gram_matrices', 'regmean_merge', 'adaptive_projective_gd', 'linearize', 'CheckpointError', 'CheckpointReader', 'CheckpointWriter', 'open_checkpoint', 'copy_aux_files', 'model_card', 'save_orbax', 'load_orbax', 'convert', 'flat_to_nested', 'nested_to_flat', 'ConfigError', 'MergeConfig', 'MergePlan', 'load_config', 'parse_config', 'MERGEKIT_METHODS', 'run_merge', 'plan_summary', 'TensorJob']
