"""Checkpoint formats: lazy safetensors reading, atomic sharded writing, Orbax, conversion.

Public API:
  * :func:`open_checkpoint` -> :class:`CheckpointReader` (HF dir, sharded HF dir, .safetensors file,
    Orbax dir), tensor-at-a-time ``get``.
  * :class:`CheckpointWriter`: plans shards from a known layout, writes tensors in any order,
    commits atomically.
  * :func:`copy_aux_files`, :func:`model_card`.
  * :func:`save_orbax`, :func:`load_orbax`, :func:`convert`, :func:`flat_to_nested`,
    :func:`nested_to_flat`.
"""

from .auxfiles import copy_aux_files, model_card
from .orbax import convert, flat_to_nested, load_orbax, nested_to_flat, save_orbax
from .safetensors import CheckpointError, CheckpointReader, CheckpointWriter, open_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "open_checkpoint",
    "copy_aux_files",
    "model_card",
    "save_orbax",
    "load_orbax",
    "convert",
    "flat_to_nested",
    "nested_to_flat",
]
