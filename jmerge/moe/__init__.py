"""Mixtures of experts from dense models: mergekit-moe's configs, built in JAX (``jmerge moe CONFIG OUT``).

Public API:
  * :func:`build_moe` (config or YAML path, output dir) -> summary dict; :func:`plan_moe`, :class:`MoEPlan`.
  * :func:`gate_vectors`: router rows from prompts (hidden states of the base, or embeddings) or noise;
    :func:`load_prompt_tokenizer`, :class:`PromptTokenizer`.
  * :func:`~jmerge.mergekit.moe_schema.load_moe_config` reads the YAML (re-exported here).

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) (mergekit-moe); Jiang et al.
(2024), "Mixtral of Experts".
"""

from __future__ import annotations

from ..mergekit.moe_schema import GATE_MODES, OUTPUT_ARCHITECTURES, MoEConfig, MoEExpert, load_moe_config, \
    parse_moe_config
from .build import MoEPlan, build_moe, plan_moe
from .gates import PROMPT_MODES, LayerSource, PromptTokenizer, gate_vectors, load_prompt_tokenizer

__all__ = ["build_moe", "plan_moe", "MoEPlan", "gate_vectors", "LayerSource", "load_prompt_tokenizer",
           "PromptTokenizer", "PROMPT_MODES", "GATE_MODES", "OUTPUT_ARCHITECTURES", "MoEConfig", "MoEExpert",
           "load_moe_config", "parse_moe_config"]
