"""jmerge: JAX-native model merging.

Task vectors, masks and merges (task arithmetic, TIES, DARE, TALL masks, PCB, AdaMerging ...) as
pure, jittable, shardable pytree transforms, composable like ``optax.named_chain``.

    import jmerge
    merged = jmerge.merge(jmerge.ties(density=0.2, scale=1.0), base_params, [ft1, ft2, ft3])

Packages: :mod:`jmerge.core` (state, steps, composition, hyperparameters, matrix views, driver),
:mod:`jmerge.methods` (one family per module), :mod:`jmerge.learned`, :mod:`jmerge.io` (checkpoint
formats), :mod:`jmerge.mergekit` (YAML configs), :mod:`jmerge.pipeline` (out-of-core merges),
:mod:`jmerge.cli`, :mod:`jmerge.kernels` (Pallas).

Importing :mod:`jmerge` is cheap: every name below is imported from its package on first use
(PEP 562 ``__getattr__`` over the explicit table ``_EXPORTS``), so ``jmerge --help`` and
``jmerge methods`` never import JAX.

References: see each method's docstring.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:  # what readers and type checkers see; at run time __getattr__ imports each name on first use
    from .core import (Gradient, HParamSpec, LeafProgram, MatrixView, MergeInputError, MergeState, NonFloatLeavesWarning,
                       OptimizerStateWarning, PerModel, Rules, StatsPhase, Step, Transform, apply_delta, chain,
                       check_compatible, count_layers, density_to_k, global_topk_mask, global_topk_phases, infer_view,
                       infer_views, keep_host_memory, layer_index, layer_positions, leaf_key, leaf_kind,
                       leaves_with_paths, merge, merge_leaf, model_max, model_mean, model_sum, named_chain, path_str,
                       prepare_leaf_hparams, resolve_hparams, sharded_leaf, task_vectors, topk_mask, topk_mask_rows,
                       trace_count, transform)
    from .io import (CheckpointError, CheckpointReader, CheckpointWriter, convert, copy_aux_files, flat_to_nested,
                     load_orbax, model_card, nested_to_flat, open_checkpoint, save_orbax)
    from .learned import (LearnedMerge, LearnedMergeError, adamerging, adaptive_projective_gd, atlas, concrete_mask,
                          concrete_merge, fisher_information, fisher_merge, gram_matrices, linearize,
                          merge_with_coefficients, regmean_merge)
    from .methods import (HEAD_FILTER, PackedMask, arcee_fusion, breadcrumbs, breadcrumbs_drop, breadcrumbs_ties,
                          consensus_mask, consensus_ta, consensus_ties, dare, dare_linear, dare_ties, della, della_drop,
                          della_linear, disjoint_merge, elect_sign, emr_merge, emr_task_models, extras_item,
                          fusion_importance, iso_c, iso_cts, iso_cts_sizes, karcher, layer_swap, layer_swap_source,
                          linear, lines, lines_position, lines_scale, magmax, model_stock, multislerp, nearswap,
                          negation, nuslerp, pack_masks, pcb, per_model, ram, ram_contributors, ramplus_tl, rescale_l1,
                          scale, sce, select_model, slerp, tall_masks, tall_merge, tall_task_models, task_arithmetic,
                          ties, trim, tsv_m, tsv_rank, unpack_masks, weighted_sum)
    from .mergekit import MERGEKIT_METHODS, ConfigError, MergeConfig, MergePlan, load_config, parse_config
    from .pipeline import TensorJob, plan_summary, run_merge

_EXPORTS_BY_PACKAGE: dict[str, tuple[str, ...]] = {
    "core": (
        "Gradient", "HParamSpec", "LeafProgram", "MatrixView", "MergeInputError", "MergeState", "NonFloatLeavesWarning",
        "OptimizerStateWarning", "PerModel", "Rules", "StatsPhase", "Step", "Transform", "apply_delta", "chain",
        "check_compatible", "count_layers", "density_to_k", "global_topk_mask", "global_topk_phases", "infer_view",
        "infer_views", "keep_host_memory", "layer_index", "layer_positions", "leaf_key", "leaf_kind",
        "leaves_with_paths", "merge", "merge_leaf", "model_max", "model_mean", "model_sum", "named_chain", "path_str",
        "prepare_leaf_hparams", "resolve_hparams", "sharded_leaf", "task_vectors", "topk_mask", "topk_mask_rows",
        "trace_count", "transform",
    ),
    "io": (
        "CheckpointError", "CheckpointReader", "CheckpointWriter", "convert", "copy_aux_files", "flat_to_nested",
        "load_orbax", "model_card", "nested_to_flat", "open_checkpoint", "save_orbax",
    ),
    "learned": (
        "LearnedMerge", "LearnedMergeError", "adamerging", "adaptive_projective_gd", "atlas", "concrete_mask",
        "concrete_merge", "fisher_information", "fisher_merge", "gram_matrices", "linearize", "merge_with_coefficients",
        "regmean_merge",
    ),
    "methods": (
        "HEAD_FILTER", "PackedMask", "arcee_fusion", "breadcrumbs", "breadcrumbs_drop", "breadcrumbs_ties",
        "consensus_mask", "consensus_ta", "consensus_ties", "dare", "dare_linear", "dare_ties", "della", "della_drop",
        "della_linear", "disjoint_merge", "elect_sign", "emr_merge", "emr_task_models", "extras_item",
        "fusion_importance", "iso_c", "iso_cts", "iso_cts_sizes", "karcher", "layer_swap", "layer_swap_source",
        "linear", "lines", "lines_position", "lines_scale", "magmax", "model_stock", "multislerp", "nearswap",
        "negation", "nuslerp", "pack_masks", "pcb", "per_model", "ram", "ram_contributors", "ramplus_tl", "rescale_l1",
        "scale", "sce", "select_model", "slerp", "tall_masks", "tall_merge", "tall_task_models", "task_arithmetic",
        "ties", "trim", "tsv_m", "tsv_rank", "unpack_masks", "weighted_sum",
    ),
    "mergekit": (
        "MERGEKIT_METHODS", "ConfigError", "MergeConfig", "MergePlan", "load_config", "parse_config",
    ),
    "pipeline": (
        "TensorJob", "plan_summary", "run_merge",
    ),
}
"""The public names, by the package that defines them (the same names as the ``TYPE_CHECKING`` imports)."""

_EXPORTS: dict[str, str] = {name: pkg for pkg, names in _EXPORTS_BY_PACKAGE.items() for name in names}

_SUBPACKAGES = ("core", "methods", "learned", "io", "mergekit", "pipeline", "cli", "kernels", "models", "demo")
"""Subpackages reachable as attributes (``jmerge.core``) without an explicit ``import jmerge.core``."""


def __getattr__(name: str):
    """PEP 562: import a public name's package on first access (``jmerge.ties``, ``from jmerge import merge``)."""
    pkg = _EXPORTS.get(name)
    if pkg is not None:
        return getattr(import_module(f"{__name__}.{pkg}"), name)
    if name in _SUBPACKAGES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBPACKAGES})


def available_methods() -> dict:
    """Named merge methods: ``{name: factory}``; ``factory(**kwargs)`` returns a :class:`Transform`.

    References: none (infrastructure); each factory's docstring cites its method's paper.
    """
    from .methods import METHODS  # noqa: PLC0415 - imports JAX

    return dict(METHODS)


__all__ = [
    "__version__", "available_methods",
    # core
    "MergeInputError", "NonFloatLeavesWarning", "OptimizerStateWarning", "path_str", "leaves_with_paths",
    "check_compatible", "leaf_key", "leaf_kind", "layer_index", "count_layers", "HParamSpec", "Gradient", "Rules",
    "PerModel", "resolve_hparams", "layer_positions", "MatrixView", "infer_view", "infer_views", "MergeState",
    "StatsPhase", "Step", "Transform", "transform", "chain", "named_chain", "LeafProgram", "merge", "merge_leaf",
    "prepare_leaf_hparams", "keep_host_memory", "sharded_leaf",
    "task_vectors", "apply_delta", "trace_count", "model_sum", "model_mean", "model_max", "topk_mask",
    "topk_mask_rows", "density_to_k", "global_topk_phases", "global_topk_mask",
    # steps and named methods
    "weighted_sum", "scale", "per_model", "trim", "dare", "breadcrumbs_drop", "della_drop", "rescale_l1",
    "elect_sign", "disjoint_merge", "tall_masks", "consensus_mask", "lines_scale", "select_model",
    "linear", "task_arithmetic", "negation", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "magmax", "sce", "consensus_ta", "consensus_ties", "tall_merge", "pcb", "emr_merge",
    "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "tsv_m", "iso_c", "iso_cts", "lines",
    "layer_swap", "tall_task_models", "extras_item", "PackedMask", "pack_masks", "unpack_masks", "emr_task_models",
    "tsv_rank", "iso_cts_sizes", "lines_position", "layer_swap_source", "HEAD_FILTER",
    "arcee_fusion", "ram", "ramplus_tl", "fusion_importance", "ram_contributors",
    # learned
    "LearnedMerge", "LearnedMergeError", "adamerging", "atlas", "merge_with_coefficients", "concrete_merge",
    "concrete_mask", "fisher_information", "fisher_merge", "gram_matrices", "regmean_merge",
    "adaptive_projective_gd", "linearize",
    # checkpoints, configs, out-of-core merges
    "CheckpointError", "CheckpointReader", "CheckpointWriter", "open_checkpoint", "copy_aux_files", "model_card",
    "save_orbax", "load_orbax", "convert", "flat_to_nested", "nested_to_flat",
    "ConfigError", "MergeConfig", "MergePlan", "load_config", "parse_config", "MERGEKIT_METHODS",
    "run_merge", "plan_summary", "TensorJob",
]
