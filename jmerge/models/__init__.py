"""Decoder language models in JAX (Flax NNX), loaded from Hugging Face safetensors without torch.

Public API:
  * :func:`load_model` (path, dtype) -> :class:`DecoderLM`; ``model(input_ids, attention_mask=None,
    position_ids=None, output_hidden_states=False)`` -> logits (and the hidden states).
  * :class:`DecoderConfig` (from ``config.json``): Llama, Mistral, Qwen2, Qwen3, Gemma-2, Mixtral, Qwen2-MoE,
    Qwen3-MoE; rotary scaling ``linear``, ``dynamic``, ``llama3``, ``yarn``.
  * :func:`moe_ffn`, :func:`route`, :func:`combine_weights`: the MoE expert computation (the dispatch kernel
    by default, ``impl="dense"`` the one-hot reference).
  * Expert surgery: :func:`expert_load`, :func:`expert_mask` (``model(..., expert_mask=)``), :func:`prune_experts`.
  * :func:`param_specs`, :func:`shard_model`: ``PartitionSpec`` per parameter and placement on a mesh.
  * Evaluation: :func:`token_nll`, :func:`sequence_losses`, :func:`perplexity`, :func:`task_losses`; text in
    :mod:`jmerge.models.text` (:func:`load_tokenizer`, :func:`make_batches`: power-of-two length buckets).

References: Touvron et al. (2023), LLaMA; Jiang et al. (2024), Mixtral of Experts; Qwen Team (2024), Qwen2
Technical Report; Hugging Face transformers (names, layouts, numerics).
"""

from __future__ import annotations

from .config import SUPPORTED_MODEL_TYPES, DecoderConfig
from .layers import MLP, Attention, Linear, RMSNorm
from .llama import DecoderLayer, DecoderLM
from .experts import expert_load, expert_mask, prune_experts, resolve_keep
from .evaluate import PerplexityResult, TaskLoss, perplexity, sequence_losses, task_losses, token_nll
from .loading import load_model, model_from_reader
from .moe import Experts, SparseMoE, combine_weights, moe_ffn, route
from .sharding import param_specs, shard_model
from .text import TextDataError, TokenBatch, encode_pair, encode_texts, load_tokenizer, make_batches

__all__ = [
    "SUPPORTED_MODEL_TYPES", "DecoderConfig", "DecoderLM", "DecoderLayer", "Attention", "MLP", "Linear",
    "RMSNorm", "Experts", "SparseMoE", "moe_ffn", "route", "combine_weights", "load_model",
    "model_from_reader", "param_specs", "shard_model",
    "expert_load", "expert_mask", "prune_experts", "resolve_keep",
    "token_nll", "sequence_losses", "perplexity", "task_losses", "PerplexityResult", "TaskLoss",
    "TextDataError", "TokenBatch", "load_tokenizer", "encode_texts", "encode_pair", "make_batches",
]
