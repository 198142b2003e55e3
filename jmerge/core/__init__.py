"""jmerge's core: merge state, named steps and their composition, hyperparameter specs, matrix views,
exact top-k selection, the XLA:CPU workarounds and the per-leaf driver.

Nothing here depends on a merge method; the methods (``jmerge.methods``) are short compositions of
steps built with :func:`transform` and :func:`chain`.

References: optax's ``chain``/``named_chain`` (DeepMind) for the composition style.
"""

from __future__ import annotations

from .driver import (GROUP_MIN_EQNS, LeafProgram, apply_delta, check_method, check_ranges, count_eqns, merge, merge_leaf,
                     prepare_leaf_hparams, task_vectors, trace_count)
from .errors import MergeInputError, NonFloatLeavesWarning, OptimizerStateWarning
from .heap import keep_host_memory
from .hparams import Gradient, HParamSpec, PerModel, Rules, interp_gradient, layer_positions, resolve_hparams
from .select import (density_to_k, global_topk_mask, global_topk_phases, sharded_leaf, topk_keep_rows, topk_mask,
                     topk_mask_rows)
from .state import MergeState, diff_rows
from .transform import StatsPhase, Step, Transform, chain, is_transform, named_chain, transform
from .tree import (check_compatible, check_task_vectors, count_layers, layer_index, leaf_key, leaf_kind, leaves_with_paths,
                   optimizer_state_paths, path_str)
from .views import MatrixView, infer_view, infer_views, leaf_name
from .xla import model_max, model_mean, model_sum

__all__ = [
    # errors and warnings
    "MergeInputError", "NonFloatLeavesWarning", "OptimizerStateWarning",
    # trees
    "path_str", "leaves_with_paths", "check_compatible", "check_task_vectors", "leaf_key", "leaf_kind", "layer_index", "count_layers",
    "optimizer_state_paths",
    # hyperparameters
    "HParamSpec", "Gradient", "Rules", "PerModel", "resolve_hparams", "layer_positions", "interp_gradient",
    # matrix views
    "MatrixView", "infer_view", "infer_views", "leaf_name",
    # state, steps, composition
    "MergeState", "diff_rows", "StatsPhase", "Step", "Transform", "transform", "chain", "named_chain", "is_transform",
    # driver
    "LeafProgram", "merge", "merge_leaf", "prepare_leaf_hparams", "check_ranges", "check_method", "task_vectors",
    "apply_delta", "trace_count", "count_eqns", "GROUP_MIN_EQNS", "keep_host_memory", "sharded_leaf",
    # selection and reductions
    "topk_mask", "topk_mask_rows", "topk_keep_rows", "density_to_k", "global_topk_phases", "global_topk_mask",
    "model_sum", "model_mean", "model_max",
]
