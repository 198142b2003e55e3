"""Writing PEFT LoRA adapters: the tensor layout, ``adapter_config.json``, one atomic directory.

An adapter is planned as a list of :class:`AdapterEntry` (one per model tensor it changes) before anything
is computed, so the safetensors layout is known up front and :class:`~jmerge.io.CheckpointWriter` writes it
tensor by tensor into a temporary directory that is renamed into place only when complete. Tensor names
follow PEFT's saved format (prefix ``base_model.model.``, adapter name dropped):

* ``lora``: ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight`` ``(out, r)`` (a GPT-2
  ``Conv1D`` weight is stored ``(in, out)``: ``fan_in_fan_out`` entries read its shape that way round);
* ``embedding``: ``<module>.lora_embedding_A`` ``(r, vocab)`` and ``<module>.lora_embedding_B`` ``(dim, r)``;
* ``bias``: ``<module>.lora_B.bias`` (the bias update of a LoRA module; ``lora_bias: true``);
* ``full``: ``<module>.weight`` / ``.bias`` saved whole (``modules_to_save``).

``lora_alpha`` equals ``r`` for every module (scale 1: ``B @ A`` is the update itself); modules whose rank
differs from the largest get ``rank_pattern``/``alpha_pattern`` entries, as mergekit-extract-lora writes them.

References: Hugging Face PEFT (``LoraConfig``, ``save_pretrained``: ``adapter_config.json`` +
``adapter_model.safetensors``); Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``mergekit-extract-lora``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..core.errors import MergeInputError
from ..io import CheckpointWriter
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["AdapterEntry", "adapter_config", "write_adapter", "PREFIX"]

PREFIX = "base_model.model."
_KINDS = ("lora", "embedding", "bias", "full")


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One model tensor as the adapter stores it.

    Attributes:
      name: the model tensor (``model.layers.0.self_attn.q_proj.weight``).
      kind: ``"lora"``, ``"embedding"``, ``"bias"`` or ``"full"`` (see the module docstring).
      shape: the model tensor's shape.
      dtype: the dtype the adapter stores it in.
      rank: the LoRA rank (``lora``/``embedding``), else 0.
      fan_in_fan_out: the model stores the weight ``(in, out)`` (GPT-2 ``Conv1D``; PEFT's ``fan_in_fan_out``).

    References: Hugging Face PEFT's saved LoRA format.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: Any
    rank: int = 0
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown adapter entry kind {self.kind!r}")

    @property
    def module(self) -> str:
        """The module name (the tensor name without ``.weight`` / ``.bias``)."""
        return self.name.rsplit(".", 1)[0]

    def keys(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(adapter tensor name, shape)]`` this entry writes, in order."""
        m, s, r = PREFIX + self.module, tuple(self.shape), self.rank
        if self.kind == "lora":
            out, fan_in = (s[1], s[0]) if self.fan_in_fan_out else (s[0], s[1])
            return [(f"{m}.lora_A.weight", (r, fan_in)), (f"{m}.lora_B.weight", (out, r))]
        if self.kind == "embedding":
            return [(f"{m}.lora_embedding_A", (r, s[0])), (f"{m}.lora_embedding_B", (s[1], r))]
        if self.kind == "bias":
            return [(f"{m}.lora_B.bias", s)]
        return [(PREFIX + self.name, s)]


def _names(selected: Iterable[str], every: Iterable[str], *, dot: bool) -> list[str]:
    """Short module names (last component) when they select exactly ``selected`` among ``every``, else full names.

    PEFT matches ``target_modules`` at a dot boundary (``dot``) and ``modules_to_save`` by plain suffix.
    """
    sel = sorted(set(selected))
    short = sorted({m.rsplit(".", 1)[-1] for m in sel})

    def hit(m: str, k: str) -> bool:
        return m == k or m.endswith("." + k) if dot else m.endswith(k)

    chosen = {m for m in every if any(hit(m, k) for k in short)}
    return short if chosen <= set(sel) else sel


def adapter_config(entries: Sequence[AdapterEntry], *, base_model: str, modules: Iterable[str],
                   fan_in_fan_out: bool = False, tied_embeddings: bool = False, extra: Optional[dict] = None) -> dict:
    """The ``adapter_config.json`` of an adapter holding ``entries`` (``lora_alpha = r``: scale 1).

    Args:
      entries: the planned entries.
      base_model: ``base_model_name_or_path``.
      modules: every module name of the model (so short target names never select a module left out).
      fan_in_fan_out: the weights are stored ``(in, out)`` (GPT-2 ``Conv1D``); also set when any entry is
        ``fan_in_fan_out`` (PEFT decides per layer by its type: ``Conv1D`` layers are read ``(in, out)``).
      tied_embeddings: the model ties its output head to the input embeddings and the adapter saves both
        whole (``modules_to_save``): ``ensure_weight_tying: true``, so PEFT keeps them one tensor.
      extra: more keys to set.

    References: Hugging Face PEFT ``LoraConfig``; mergekit-extract-lora's ``make_config_dict``.
    """
    every = sorted(set(modules))
    ranks = {e.module: e.rank for e in entries if e.kind in ("lora", "embedding")}
    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    saved = {e.module for e in entries if e.kind == "full"}
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _names(ranks, every, dot=True),
        "modules_to_save": _names(saved, every, dot=False) if saved else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": any(e.kind == "bias" for e in entries),
        "fan_in_fan_out": bool(fan_in_fan_out) or any(e.fan_in_fan_out for e in entries),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if tied_embeddings:
        cfg["ensure_weight_tying"] = True
    cfg.update(extra or {})
    return cfg


def write_adapter(out_dir: str | os.PathLike, entries: Sequence[AdapterEntry],
                  compute: Callable[[AdapterEntry], Sequence[np.ndarray]], config: dict, *,
                  overwrite: bool = False, readme: Optional[str] = None) -> str:
    """Write a PEFT adapter atomically: ``compute(entry)`` gives each entry's arrays (in ``entry.keys()`` order).

    Entries are computed and written one at a time (memory: one entry). On any exception nothing is left
    behind and ``out_dir`` is unchanged.

    Returns:
      ``out_dir`` (absolute).

    Raises:
      MergeInputError: no entries.
      OutputExistsError: ``out_dir`` exists and not ``overwrite``.

    References: Hugging Face PEFT ``save_pretrained`` (file names); :class:`jmerge.io.CheckpointWriter`.
    """
    if not entries:
        raise MergeInputError(f"{os.fspath(out_dir)}: the adapter would hold no tensors (nothing differs or every "
                              "tensor was excluded); nothing written")
    layout = [(k, shape, e.dtype) for e in entries for k, shape in e.keys()]
    writer = CheckpointWriter(out_dir, layout, max_shard_bytes=2**62, overwrite=overwrite)
    try:
        for e in entries:
            arrays = compute(e)
            for (k, _), arr in zip(e.keys(), arrays, strict=True):
                writer.write(k, arr)
        # one shard, named as PEFT expects (the file descriptors stay valid across the rename)
        (single,) = writer.shard_files
        os.replace(os.path.join(writer.tmp_dir, single), os.path.join(writer.tmp_dir, ADAPTER_WEIGHTS))
        writer.shard_files = [ADAPTER_WEIGHTS]
        writer.write_text(ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        if readme:
            writer.write_text("README.md", readme)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
