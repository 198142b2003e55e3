"""Out-of-core merges of checkpoints on disk: tensor jobs from sources, planners, one executor.

* :mod:`~jmerge.pipeline.jobs`: sources (a tensor, zeros, a stack, a computed value) and operations
  (merge, copy) of one output tensor;
* :mod:`~jmerge.pipeline.planners`: a merge plan -> jobs (per-tensor merges; slices/passthrough);
* :mod:`~jmerge.pipeline.executor`: runs jobs with bounded memory (read-ahead, byte budget, writer
  thread) through the core's :class:`~jmerge.LeafProgram`, writes atomically;
* :mod:`~jmerge.pipeline.validate`: the whole plan checked against the inputs' headers before any
  weight is read or downloaded;
* :mod:`~jmerge.pipeline.summary`: the dry-run plan; :mod:`~jmerge.pipeline.progress`: the progress line.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

from .executor import Buffers, MergeContext, mesh_sharding, run_jobs, run_merge
from .jobs import Computed, Concat, Copy, Mapped, Merge, Stack, Tensor, TensorJob, Zeros, read_source, source_nbytes
from .planners import LAYER_SUB, input_paths, np_dtype, plan_jobs, plan_slices, plan_tensor_merges
from .progress import Progress
from .summary import plan_summary
from .validate import open_input, validate_plan

__all__ = [
    "run_merge", "run_jobs", "MergeContext", "Buffers", "mesh_sharding",
    "TensorJob", "Tensor", "Zeros", "Stack", "Concat", "Mapped", "Computed", "Merge", "Copy", "read_source", "source_nbytes",
    "plan_jobs", "plan_tensor_merges", "plan_slices", "input_paths", "np_dtype", "LAYER_SUB",
    "plan_summary", "Progress", "validate_plan", "open_input",
]
