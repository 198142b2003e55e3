"""Load a Hugging Face decoder checkpoint (safetensors, through :func:`jmerge.io.open_checkpoint`) into a
:class:`~jmerge.models.DecoderLM`, with no torch.

MoE experts are read as stored: Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2`` (gate/up/down),
Qwen2-MoE's and Qwen3-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj``, and transformers 5's fused
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj``
``[E, H, I]``; Mixtral's router ``block_sparse_moe.gate`` is ``mlp.gate``.

References: the safetensors format (Hugging Face); transformers 5 checkpoint conversion of MoE experts
(``conversion_mapping.py``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..io import CheckpointFormatError, CheckpointReader, open_checkpoint
from .config import DecoderConfig
from .llama import DecoderLM

_EXPERT = re.compile(r"^(?P<pre>model\.layers\.\d+)\.mlp\.experts\.(?P<part>gate|up|down)$")
_PER_EXPERT = {  # (stored prefix, {part: stored projection name})
    "mixtral": (".block_sparse_moe.experts.", {"gate": "w1", "up": "w3", "down": "w2"}),
    "default": (".mlp.experts.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}


def _stored_name(reader: CheckpointReader, name: str) -> str | None:
    """The stored name of a canonical (non-expert) tensor name, or None."""
    if name in reader:
        return name
    alt = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    return alt if alt in reader else None


def load_model(path: str | os.PathLike, dtype: Any = None, *, moe_impl: str = "auto") -> DecoderLM:
    """Read a checkpoint directory (or ``.safetensors`` file with its ``config.json``) into a model.

    Args:
      path: a Hugging Face model directory (single or sharded safetensors).
      dtype: cast every parameter to this dtype (e.g. ``jnp.float32`` for a bf16 checkpoint); None keeps
        the stored dtype.
      moe_impl: how MoE layers compute experts (:class:`DecoderLM`'s ``moe_impl``; ``"auto"``: the dispatch
        kernel, ``"dense"``: the one-hot reference).

    Returns:
      The :class:`DecoderLM`.

    Raises:
      jmerge.io.CheckpointError: unreadable checkpoint, missing ``config.json``, unsupported architecture
        or a missing tensor (the message names it).

    References: Hugging Face ``from_pretrained`` (names and layouts); jmerge's safetensors reader.
    """
    reader = open_checkpoint(path)
    try:
        if reader.config is None:
            raise CheckpointFormatError(f"{path}: no config.json next to the weights; jmerge.models needs it")
        config = DecoderConfig.from_dict(reader.config, source=os.path.join(reader.dir, "config.json"))
        return model_from_reader(reader, config, dtype, moe_impl=moe_impl)
    finally:
        reader.close()


def model_from_reader(reader: CheckpointReader, config: DecoderConfig, dtype: Any = None, *,
                      moe_impl: str = "auto") -> DecoderLM:
    """Build a :class:`DecoderLM` from an open reader and a configuration.

    Args:
      reader: the checkpoint (any :class:`~jmerge.io.CheckpointReader`-like object with ``__contains__``,
        ``keys`` and ``get``).
      config: the configuration.
      dtype: parameter dtype, or None for the stored one.
      moe_impl: :class:`DecoderLM`'s ``moe_impl``.

    Returns:
      The model.

    Raises:
      jmerge.io.CheckpointFormatError: a tensor is missing or the experts are incomplete.

    References: transformers 5 MoE checkpoint conversion (fused ``gate_up_proj``).
    """
    cache: dict[str, np.ndarray] = {}
    per = _PER_EXPERT["mixtral" if config.model_type == "mixtral" else "default"]

    def cast(a: np.ndarray) -> Any:
        return jnp.asarray(a if dtype is None else a.astype(dtype))

    def experts(pre: str, part: str) -> Any:
        fused_gu, fused_d = pre + ".mlp.experts.gate_up_proj", pre + ".mlp.experts.down_proj"
        if part in ("gate", "up") and fused_gu in reader:
            gu = cache.setdefault(fused_gu, reader.get(fused_gu))
            inter = gu.shape[1] // 2
            return cast(gu[:, :inter] if part == "gate" else gu[:, inter:])
        if part == "down" and fused_d in reader:
            return cast(reader.get(fused_d))
        stored_pre, projs = per
        base = pre + stored_pre
        names = [f"{base}{e}.{projs[part]}.weight" for e in range(config.num_experts)]
        missing = [n for n in names if n not in reader]
        if missing:
            raise CheckpointFormatError(
                f"{reader.dir}: expert tensor {missing[0]!r} is missing (and no fused "
                f"{fused_gu if part != 'down' else fused_d!r}); config.json says {config.num_experts} experts")
        return cast(np.stack([reader.get(n) for n in names]))

    def get(name: str) -> Any:
        m = _EXPERT.match(name)
        if m:
            return experts(m.group("pre"), m.group("part"))
        stored = _stored_name(reader, name)
        return None if stored is None else cast(reader.get(stored))

    try:
        return DecoderLM(config, get, moe_impl=moe_impl)
    except KeyError as e:
        raise CheckpointFormatError(f"{reader.dir}: {e.args[0]}") from None
