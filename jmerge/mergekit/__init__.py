"""mergekit-compatible YAML merge configurations.

A config names a method (``merge_method``: a mergekit name such as ``ties`` or any jmerge method from
:func:`jmerge.available_methods`), the base and the fine-tuned models with their parameters, or
``slices`` for passthrough (frankenmerge) configs, and output options. :func:`load_config` validates
it completely BEFORE any tensor is read: every error names the YAML line and column and what is
allowed. :meth:`MergePlan.build` turns it into a jmerge ``Transform`` and hyperparameter specs
(numbers, per-layer :class:`~jmerge.Gradient` lists, path :class:`~jmerge.Rules`, :class:`~jmerge.PerModel`).

Modules: :mod:`~jmerge.mergekit.schema` (YAML with locations, the schema dataclasses and their
validator), :mod:`~jmerge.mergekit.methods` (the mergekit method table), :mod:`~jmerge.mergekit.params`
(parameter values), :mod:`~jmerge.mergekit.plan` (the stages from text to :class:`MergePlan`).

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

from .methods import MERGEKIT_METHODS, PASSTHROUGH, MergekitMethod
from .plan import MergePlan, load_config, parse_config
from .schema import ConfigError, MergeConfig, ModelEntry, SliceDef, SliceSource

__all__ = ["ConfigError", "MergeConfig", "ModelEntry", "SliceSource", "SliceDef", "MergePlan", "load_config",
           "parse_config", "MERGEKIT_METHODS", "MergekitMethod", "PASSTHROUGH"]
