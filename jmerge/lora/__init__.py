"""LoRA adapters: extraction from a fine-tune (``jmerge lora extract``), merging several adapters with any
jmerge method and re-factorising (``jmerge lora merge``), written as PEFT adapters.

Reading/applying an adapter lives in :mod:`jmerge.io.lora` (:class:`~jmerge.io.LoraReader`, ``model+lora``).

Public API: :func:`extract_lora`, :func:`merge_loras`, :func:`low_rank_factors`, :func:`resolve_rank`,
:class:`AdapterEntry`, :func:`adapter_config`, :func:`write_adapter`; Flax LoRA pytrees:
:func:`merge_flax_lora`, :func:`flax_lora_deltas`, :func:`find_flax_loras`.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Goddard et al.,
"Arcee's MergeKit" (EMNLP 2024 industry track), ``mergekit-extract-lora``; Hugging Face PEFT.
"""

from __future__ import annotations

from .adapter import AdapterEntry, adapter_config, write_adapter
from .extract import ExtractResult, extract_lora, plan_extraction
from .factor import low_rank_factors, resolve_rank
from .flax_lora import FlaxLoraPair, find_flax_loras, flax_lora_deltas, merge_flax_lora
from .merge import MergeLorasResult, lora_task_vectors, merge_loras

__all__ = ["extract_lora", "plan_extraction", "ExtractResult", "merge_loras", "MergeLorasResult",
           "lora_task_vectors", "low_rank_factors", "resolve_rank", "AdapterEntry", "adapter_config", "write_adapter",
           "merge_flax_lora", "flax_lora_deltas", "find_flax_loras", "FlaxLoraPair"]
