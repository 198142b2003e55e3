"""Checkpoint formats: lazy safetensors reading, atomic sharded writing, Orbax, auxiliary files, conversion.

Public API:
  * :func:`open_checkpoint` -> :class:`CheckpointReader` (HF dir, sharded HF dir, .safetensors file,
    Orbax dir), tensor-at-a-time ``get``.
  * :class:`CheckpointWriter`: plans shards from a known layout, writes tensors in any order,
    commits atomically (temporary directory, then rename).
  * :func:`copy_aux_files`, :func:`model_card`.
  * :func:`open_model`: a model as a merge config names it -- local path, Hugging Face id
    (``org/name@rev``, through the hub cache) or ``model+lora`` (:class:`LoraReader`).
  * :func:`save_orbax`, :func:`load_orbax`, :func:`convert`, :func:`flat_to_nested`, :func:`nested_to_flat`.
  * Errors: :class:`CheckpointError` and its subclasses :class:`CheckpointNotFoundError`,
    :class:`CheckpointFormatError`, :class:`OutputExistsError`.

References: the safetensors format (Hugging Face); Orbax (Google).
"""

from __future__ import annotations

from .auxfiles import AUX_FILE_PATTERNS, copy_aux_files, model_card
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, OutputExistsError
from .orbax import convert, flat_to_nested, load_orbax, nested_to_flat, save_orbax
from .safetensors import CheckpointReader, CheckpointWriter, open_checkpoint, st_dtype_name
from .hub import HubRef, RemoteHeaderReader, hub_cache_dir, hub_offline
from .inputs import open_model, resolve_model_dir, split_spec
from .lora import LoraReader

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CheckpointFormatError", "OutputExistsError",
    "CheckpointReader", "CheckpointWriter", "open_checkpoint", "st_dtype_name",
    "copy_aux_files", "model_card", "AUX_FILE_PATTERNS",
    "save_orbax", "load_orbax", "convert", "flat_to_nested", "nested_to_flat",
    "open_model", "resolve_model_dir", "split_spec", "LoraReader", "HubRef", "RemoteHeaderReader",
    "hub_cache_dir", "hub_offline",
]
