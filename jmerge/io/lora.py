"""PEFT LoRA adapters applied to a checkpoint's weights on read (mergekit's ``model+lora`` inputs).

:class:`LoraReader` wraps any checkpoint reader with the same interface; each tensor the adapter
targets is corrected as it is read, so memory stays bounded by one tensor and the pipeline needs no
special case. For a target module ``M`` with ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``::

    W' = W + s * (B @ A)            s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

with ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` when they
match (PEFT's rule: the pattern matches the end of the module name at a dot boundary). As in PEFT's
``merge_and_unload()``: ``B @ A`` and the scale are computed in float32, the sum is rounded once to the
weight's dtype; ``fan_in_fan_out`` (GPT-2 ``Conv1D`` weights stored ``(in, out)``) transposes the delta
(when only one orientation fits the weight's shape, that one is used, as PEFT does for ``Conv1D``);
embedding adapters (``lora_embedding_A`` ``(r, vocab)``, ``lora_embedding_B`` ``(dim, r)``) add
``s * (B @ A).T``; ``lora_B.bias`` (``lora_bias=True``) adds ``s * bias`` to the module's bias; full
tensors saved with the adapter (``modules_to_save``, ``<module>.base_layer.weight`` of a resized
embedding) replace the model's tensor before the delta. DoRA, other PEFT methods and adapters whose
shapes or target modules do not fit the model are refused before anything is read or written.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023) for rsLoRA; Hugging Face PEFT
(``LoraConfig``, ``merge_and_unload``; adapter files ``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

from .errors import CheckpointFormatError, CheckpointNotFoundError
from .safetensors import CheckpointReader

__all__ = ["LoraReader", "read_adapter_config", "is_conv1d", "ties_head", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|base_layer\.weight|base_layer\.bias)")
_UNSUPPORTED_KEY = re.compile(r"lora_magnitude_vector|lora_A\.bias|lora_embedding_.*\.|trainable_tokens|"
                              r"lora_[A-Z]\.|_orig_module|modules_to_save")


CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")
"""transformers model types whose ``c_attn``/``c_proj``/``c_fc``/``q_attn`` layers are ``Conv1D`` (weights ``(in, out)``)."""
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")


def is_conv1d(config: Any, module: str) -> bool:
    """Whether ``module`` of a model with this ``config.json`` (a dict) is a transformers ``Conv1D`` layer,
    whose weight is stored ``(in, out)`` (PEFT's ``fan_in_fan_out``): GPT-2's ``c_attn``, ``c_proj``, ``c_fc``.

    References: Hugging Face transformers ``pytorch_utils.Conv1D``; PEFT ``LoraConfig.fan_in_fan_out``.
    """
    if not isinstance(config, dict):
        return False
    kinds = {str(config.get("model_type", "")).lower()} | {
        "gpt2" if str(a).startswith("GPT2") else str(a) for a in config.get("architectures") or []}
    return bool(kinds & set(CONV1D_MODEL_TYPES)) and module.rsplit(".", 1)[-1] in _CONV1D_NAMES


_TIED_BY_DEFAULT = ("gpt2", "openai-gpt", "imagegpt")
TIED_HEAD = "lm_head"
"""The module name transformers gives a causal LM's output head (absent from checkpoints that tie it)."""


def ties_head(config: Any) -> bool:
    """Whether a model with this ``config.json`` (a dict) ties its output head to the input embeddings
    (``tie_word_embeddings``, whose transformers default is true for GPT-2).

    References: Hugging Face transformers ``PretrainedConfig.tie_word_embeddings``.
    """
    if not isinstance(config, dict):
        return False
    default = str(config.get("model_type", "")).lower() in _TIED_BY_DEFAULT
    return bool(config.get("tie_word_embeddings", default))


def read_adapter_config(adapter_dir: str) -> dict:
    """The parsed ``adapter_config.json`` of a PEFT adapter directory, checked to be a plain LoRA.

    Raises:
      CheckpointNotFoundError: no ``adapter_config.json``.
      CheckpointFormatError: not a LoRA adapter (``peft_type``), DoRA, layer replication, bad JSON.

    References: Hugging Face PEFT ``LoraConfig``.
    """
    p = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(p):
        raise CheckpointNotFoundError(f"{adapter_dir}: not a PEFT adapter directory (no {ADAPTER_CONFIG}); after "
                                      "'+' give a LoRA adapter saved with peft's save_pretrained")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{p}: expected a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointFormatError(f"{p}: peft_type {kind} is not supported; '+' applies LoRA adapters only "
                                    "(merge other adapters with peft's merge_and_unload() and pass the result)")
    for flag, what in (("use_dora", "DoRA"), ("layer_replication", "layer replication"),
                       ("target_parameters", "LoRA on parameters (target_parameters)"),
                       ("trainable_token_indices", "trainable tokens")):
        if cfg.get(flag):
            raise CheckpointFormatError(
                f"{p}: {what} adapters are not supported by jmerge's '+'; merge it with peft "
                "(PeftModel.from_pretrained(...).merge_and_unload().save_pretrained(dir)) and pass that directory")
    if not isinstance(cfg.get("r", 8), (int, float)) or not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise CheckpointFormatError(f"{p}: 'r' and 'lora_alpha' must be numbers")
    return cfg


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key matching the end of the module name."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclasses.dataclass
class _Target:
    """What happens to one model tensor on read."""

    replace: Optional[str] = None  # adapter tensor replacing the model's
    a: Optional[str] = None
    b: Optional[str] = None
    bias: Optional[str] = None  # lora_B.bias: added (scaled) to this bias tensor
    embedding: bool = False
    transpose: bool = False
    scale: float = 1.0


class LoraReader:
    """A checkpoint reader that applies a PEFT LoRA adapter to the wrapped reader's tensors as they are read.

    Same interface as :class:`~jmerge.io.CheckpointReader` (``keys``, ``shape``, ``dtype``, ``nbytes``,
    ``get(name, out=)``, ``dir``, ``config``, ``close``); shapes, dtypes and names are the model's.

    Args:
      base: the model's reader (owned: closed with this reader).
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      label: how the adapter is named in messages (its spec).

    Raises:
      CheckpointError: the adapter is not a plain LoRA, has ``.bin`` weights only, or does not fit the
        model (a target missing from it, shapes that do not match): one line listing the problems.

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Hugging Face
    PEFT ``merge_and_unload``.
    """

    def __init__(self, base: Any, adapter_dir: str, label: Optional[str] = None):
        self.base = base
        self.adapter_dir = adapter_dir
        self.label = label or adapter_dir
        self.path = f"{base.path}+{self.label}"
        self.dir = base.dir
        self.config = base.config
        self.metadata = dict(getattr(base, "metadata", {}) or {})
        self.adapter_config = read_adapter_config(adapter_dir)
        st = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        if not os.path.isfile(st):
            if any(os.path.isfile(os.path.join(adapter_dir, f"adapter_model{s}")) for s in (".bin", ".pt", ".pth")):
                raise CheckpointFormatError(
                    f"{adapter_dir}: only adapter_model.bin (PyTorch pickle) found; jmerge reads safetensors only: "
                    "re-save the adapter with save_pretrained(..., safe_serialization=True)")
            raise CheckpointNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}")
        self.adapter = CheckpointReader(st)
        try:
            self._targets = self._plan()
        except BaseException:
            self.adapter.close()
            raise

    # -- planning ------------------------------------------------------------------------------
    def _locate(self, name: str) -> Optional[str]:
        """The model tensor an adapter module name refers to (exact, else a unique suffix match)."""
        if name in self.base:
            return name
        if name.startswith("model.") and name[6:] in self.base:
            return name[6:]
        cands = [k for k in self.base.keys() if k.endswith("." + name)]
        return cands[0] if len(cands) == 1 else None

    def _plan(self) -> dict[str, _Target]:
        cfg = self.adapter_config
        modules: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        problems: list[str] = []
        for key in self.adapter.keys():
            if not key.startswith(_PREFIX):
                problems.append(f"tensor {key!r} does not start with {_PREFIX!r} (not a PEFT adapter file?)")
                continue
            rest = key[len(_PREFIX):]
            m = _LORA_KEY.fullmatch(rest)
            if m:
                modules.setdefault(m["mod"], {})[m["part"]] = key
            elif _UNSUPPORTED_KEY.search(rest) or not rest.endswith((".weight", ".bias")):
                problems.append(f"unsupported adapter tensor {key!r}")
            else:
                full[rest] = key  # modules_to_save: a full replacement tensor
        targets: dict[str, _Target] = {}
        missing: list[str] = []
        bad_shapes: list[str] = []

        # a tied head (absent from the checkpoint: it is the input embedding) saved or adapted next to the
        # embedding, as PEFT and jmerge's extraction write it for tied models: the embedding's entry covers it
        tied_skip = ties_head(self.config) and any(re.search(r"(^|\.)(embed_tokens|wte|word_embeddings)$", m)
                                                   for m in list(modules) + [k.rsplit(".", 1)[0] for k in full])

        def target(name: str) -> Optional[str]:
            t = self._locate(name)
            if t is None and not (tied_skip and name.rsplit(".", 1)[0] == TIED_HEAD):
                missing.append(name)
            return t

        def check_full(model_name: str, src: str) -> bool:
            got, want = tuple(self.adapter.shape(src)), tuple(self.base.shape(model_name))
            if got != want:
                bad_shapes.append(f"{model_name}: model {want}, adapter {got}")
                return False
            return True

        for name, src in full.items():
            t = target(name)
            if t is not None and check_full(t, src):
                targets.setdefault(t, _Target()).replace = src
        r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        for mod, parts in modules.items():
            for part in ("base_layer.weight", "base_layer.bias"):
                if part in parts:
                    t = target(f"{mod}.{part.split('.')[1]}")
                    if t is not None and check_full(t, parts[part]):
                        targets.setdefault(t, _Target()).replace = parts[part]
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            if a_key not in parts and b_key not in parts:
                if "lora_B.bias" in parts:
                    problems.append(f"module {mod!r} has lora_B.bias but no lora_A/lora_B weights")
                continue
            if a_key not in parts or b_key not in parts:
                problems.append(f"module {mod!r} has only one of {a_key}/{b_key}")
                continue
            a_shape, b_shape = tuple(self.adapter.shape(parts[a_key])), tuple(self.adapter.shape(parts[b_key]))
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                problems.append(f"module {mod!r}: lora A {a_shape} and B {b_shape} are not a rank-r pair "
                                "(convolution adapters are not supported)")
                continue
            rank = a_shape[0]
            r = _pattern_value(cfg.get("rank_pattern") or {}, mod, r0)
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, alpha0)
            if int(r) != rank:
                problems.append(f"module {mod!r}: adapter_config says r={r} but its lora A has rank {rank}")
                continue
            scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))
            w = target(f"{mod}.weight")
            if w is None:
                continue
            delta = (a_shape[1], b_shape[0]) if emb else (b_shape[0], a_shape[1])  # emb: (B @ A).T
            want = tuple(self.base.shape(w))
            transpose = False
            if not emb:
                fits, fits_t = want == delta, want == delta[::-1]
                # PEFT decides per layer: a Conv1D layer is (in, out) whatever the config says
                fifo = True if is_conv1d(self.config, w.rsplit(".", 1)[0]) else fan_in_fan_out
                transpose = fifo if (fits and fits_t) else (fits_t and not fits)
                ok = fits or fits_t
            else:
                ok = want == delta
            if not ok:
                bad_shapes.append(f"{w}: model {want}, adapter delta {delta} (from {parts[b_key]} @ {parts[a_key]})")
                continue
            t = targets.setdefault(w, _Target())
            t.a, t.b, t.embedding, t.transpose, t.scale = parts[a_key], parts[b_key], emb, transpose, scale
            if "lora_B.bias" in parts:
                bname = target(f"{mod}.bias")
                if bname is not None:
                    bs = tuple(self.adapter.shape(parts["lora_B.bias"]))
                    if bs != tuple(self.base.shape(bname)):
                        bad_shapes.append(f"{bname}: model {tuple(self.base.shape(bname))}, adapter bias {bs}")
                    else:
                        targets.setdefault(bname, _Target(scale=scale)).bias = parts["lora_B.bias"]
                        targets[bname].scale = scale
        if not targets and not problems and not missing and not bad_shapes:
            problems.append("the adapter holds no LoRA tensors")
        for name in targets:
            dt = np.dtype(self.base.dtype(name))
            if not (dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")):
                problems.append(f"target {name!r} is not a floating-point tensor ({self.base.dtype(name)})")
        if missing or bad_shapes or problems:
            trained = self.adapter_config.get("base_model_name_or_path")
            parts_msg = []
            if bad_shapes:
                parts_msg.append(f"{len(bad_shapes)} target(s) with other shapes ({'; '.join(bad_shapes[:3])}"
                                 + (f"; ... {len(bad_shapes) - 3} more" if len(bad_shapes) > 3 else "") + ")")
            if missing:
                parts_msg.append(f"{len(missing)} target(s) missing from the model ({', '.join(missing[:3])}"
                                 + (f", ... {len(missing) - 3} more" if len(missing) > 3 else "") + ")")
            parts_msg += problems[:3]
            raise CheckpointFormatError(
                f"LoRA adapter '{self.label}' ({os.path.join(self.adapter_dir, ADAPTER_WEIGHTS)}) does not fit "
                f"model '{self.base.path}'"
                + (f" (the adapter was trained on '{trained}')" if trained else "")
                + ": " + "; ".join(parts_msg) + "; use the adapter with the base model it was trained for")
        return targets

    # -- queries -------------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """Names of the model tensors the adapter changes."""
        return list(self._targets)

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def layout(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(k, tuple(self.base.shape(k)), self.base.dtype(k)) for k in self.base.keys()]

    def delta(self, name: str) -> Optional[np.ndarray]:
        """The float32 low-rank update ``s * (B @ A)`` of a target tensor (oriented like it), or None."""
        t = self._targets.get(name)
        if t is None or (t.a is None and t.bias is None):
            return None
        if t.bias is not None and t.a is None:
            return self.adapter.get(t.bias).astype(np.float32) * np.float32(t.scale)
        a = self.adapter.get(t.a).astype(np.float32)
        b = self.adapter.get(t.b).astype(np.float32)
        d = b @ a
        if t.embedding or t.transpose:
            d = d.T
        return d * np.float32(t.scale)

    def get(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read one tensor with the adapter applied (into ``out`` when given, like the wrapped reader).

        Safe to call from several threads at once.
        """
        arr = self.base.get(name, out=out)
        t = self._targets.get(name)
        if t is None:
            return arr
        if not arr.flags.writeable:
            arr = arr.copy()
        if t.replace is not None:
            arr[...] = self.adapter.get(t.replace).astype(arr.dtype)
        d = self.delta(name)
        if d is not None:
            if arr.dtype in (np.float32, np.float64):
                arr += d.astype(arr.dtype, copy=False)  # one rounding of W + delta, in place
            else:  # half precision: the sum in float32, rounded once (PEFT adds a float32 delta in place)
                d += arr.astype(np.float32)
                arr[...] = d.astype(arr.dtype)
        return arr

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> "LoraReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraReader({self.path!r}, {len(self._targets)} targets)"
