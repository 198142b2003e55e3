"""``extract_lora``: a PEFT LoRA adapter approximating ``FINETUNED - BASE`` by truncated SVD, tensor by tensor.

Per tensor of the fine-tune (mergekit-extract-lora's rules, decided from names and shapes, no torch):

* a 2-D ``.weight`` that is neither an embedding nor the output head is a linear layer: its update
  ``D = W_ft - W_base`` (float32) is factorised to rank ``r`` (:func:`~jmerge.lora.low_rank_factors`:
  balanced ``A``, ``B``; the residual is the Eckart-Young bound) and stored as ``lora_A``/``lora_B``; its
  ``.bias`` update, if any, as ``lora_B.bias``;
* embeddings (names with ``embed``, ``wte``, ``wpe``) and the output head (``lm_head``, or a 2-D weight
  whose first axis is the vocabulary) are saved whole (``modules_to_save``), as mergekit does by default;
  with ``embed_lora=True`` (mergekit's ``--embed-lora``) embeddings get ``lora_embedding_A/B`` (the update
  transposed) and the head a linear LoRA; a vocabulary that differs from the base's forces ``modules_to_save``;
* GPT-2's ``Conv1D`` weights (``c_attn``, ``c_proj``, ``c_fc``) are stored ``(in, out)``: the update is
  transposed before factorising and the config says ``fan_in_fan_out: true``, as PEFT reads such layers;
* when the model ties its head to the embeddings (``tie_word_embeddings``; the checkpoint has no ``lm_head``)
  and the adapter saves the input embedding whole, ``lm_head.weight`` is saved too (a copy of the fine-tune's
  embedding, in ``modules_to_save``), as mergekit-extract-lora does: PEFT replaces modules one by one and would
  otherwise keep the base's head. ``embed_lora`` is turned off (with a warning) for such models: PEFT 0.21
  applies a LoRA of tied embeddings twice in ``merge_and_unload`` (without a head LoRA its forward misses it). For
  ``embed_tokens`` the config also sets PEFT's ``ensure_weight_tying: true`` so that the two stay one tensor
  after ``merge_and_unload`` (tested with PEFT 0.21; PEFT ties only modules it names ``embed_tokens``).
  jmerge's ``model+lora`` ignores such a head (the checkpoint's embedding is the head). mergekit-extract-lora
  saves GPT-2's ``Conv1D`` layers whole; jmerge extracts them as LoRA;
* a linear module with a bias, when other LoRA modules have none (Qwen2's q/k/v), is saved whole: PEFT's
  ``lora_bias`` covers every LoRA module and ``merge_and_unload`` fails on those without a bias;
* everything else (norms, 3-D tensors, biases of saved modules) is saved whole (``modules_to_save``), or
  left out with ``skip_undecomposable=True``.

Only headers are read while planning (every error before anything is written); then one tensor pair is
read, factorised and written at a time into a temporary directory that is renamed at the end.

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): ``mergekit-extract-lora``;
Hu et al., "LoRA" (ICLR 2022); Eckart & Young (Psychometrika 1936).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from ..core.errors import MergeInputError
from ..io import open_model
from ..io.lora import TIED_HEAD, is_conv1d, ties_head
from .adapter import AdapterEntry, adapter_config, write_adapter
from .factor import Rank, low_rank_factors, resolve_rank

__all__ = ["extract_lora", "ExtractResult", "plan_extraction"]

_EMBED = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe)$")
_HEAD = re.compile(r"(^|\.)(lm_head|output|embed_out)$")


@dataclasses.dataclass
class ExtractResult:
    """What :func:`extract_lora` wrote.

    Attributes:
      out_dir: the adapter directory.
      entries: the planned entries (rank per LoRA module; ``full`` for ``modules_to_save``).
      residual: per factorised tensor, ``||D - B @ A||_F`` from the dropped singular values.
      norm: per factorised tensor, ``||D||_F``.

    References: Eckart & Young (Psychometrika 1936).
    """

    out_dir: str
    entries: list[AdapterEntry]
    residual: dict[str, float]
    norm: dict[str, float]

    @property
    def relative_error(self) -> float:
        """``sqrt(sum residual^2) / sqrt(sum norm^2)`` over every factorised tensor."""
        num = sum(v * v for v in self.residual.values())
        den = sum(v * v for v in self.norm.values())
        return float(np.sqrt(num / den)) if den else 0.0


def _close(*readers: Any) -> None:
    for r in readers:
        if r is not None:
            r.close()


def _open(model: Any) -> tuple[Any, bool]:
    """(reader, owned): a path/spec is opened (and owned), a reader is used as is."""
    if isinstance(model, (str, os.PathLike)):
        return open_model(model), True
    return model, False


def _is_float(dt: Any) -> bool:
    dt = np.dtype(dt)
    return dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def plan_extraction(base: Any, ft: Any, rank: Rank, *, embed_lora: bool = False, skip_undecomposable: bool = False,
                    clamp_rank: bool = False, include: Sequence[str] = (), exclude: Sequence[str] = (),
                    dtype: Any = None) -> list[AdapterEntry]:
    """The adapter entries :func:`extract_lora` writes, from the two readers' headers only.

    Raises:
      MergeInputError: tensors missing from one model, a shape that differs (not a vocabulary), a rank larger
        than a matrix (naming the tensor), nothing to extract.

    References: mergekit-extract-lora (``plan_extraction``).
    """
    bkeys, fkeys = set(base.keys()), set(ft.keys())
    if bkeys != fkeys:
        only_f, only_b = sorted(fkeys - bkeys), sorted(bkeys - fkeys)
        raise MergeInputError(
            f"'{ft.path}' and base '{base.path}' hold different tensors"
            + (f"; only in the fine-tune: {', '.join(only_f[:3])}" + (" ..." if len(only_f) > 3 else "") if only_f else "")
            + (f"; only in the base: {', '.join(only_b[:3])}" + (" ..." if len(only_b) > 3 else "") if only_b else "")
            + "; extract a LoRA between two checkpoints of the same architecture")
    cfg = ft.config if isinstance(getattr(ft, "config", None), dict) else {}
    vocab = cfg.get("vocab_size")
    names = list(ft.keys())
    shapes = {n: tuple(ft.shape(n)) for n in names}

    def linear(n: str) -> bool:
        return n.endswith(".weight") and len(shapes[n]) == 2

    def embedding(mod: str) -> bool:
        return bool(_EMBED.search(mod))

    def head(mod: str, n: str) -> bool:
        # a head is top-level (a layer's (vocab, hidden) MLP weight is not one) and not a Conv1D (in, out) weight
        return not embedding(mod) and (bool(_HEAD.search(mod)) or (vocab is not None and shapes[n][0] == vocab
                                                                    and linear(n) and not is_conv1d(cfg, mod)
                                                                    and not re.search(r"\.\d+\.", n)))

    def wanted(mod: str) -> bool:
        if include and not any(re.search(p, mod) for p in include):
            return False
        return not any(re.search(p, mod) for p in exclude)

    entries: list[AdapterEntry] = []
    lora_modules: set[str] = set()
    vocab_changed = any(shapes[n] != tuple(base.shape(n)) and (embedding(n.rsplit(".", 1)[0]) or
                                                               head(n.rsplit(".", 1)[0], n)) for n in names)
    for n in names:
        mod = n.rsplit(".", 1)[0]
        shape, bshape = shapes[n], tuple(base.shape(n))
        out_dt = np.dtype(dtype) if dtype is not None else np.dtype(ft.dtype(n))
        if not _is_float(ft.dtype(n)):
            continue  # integer buffers are not parameters PEFT could save
        is_emb, is_head = embedding(mod), head(mod, n)
        if shape != bshape and not (is_emb or is_head):
            raise MergeInputError(f"tensor {n!r}: shape {shape} in '{ft.path}' but {bshape} in base '{base.path}'; "
                                  "a LoRA needs the same architecture and sizes")
        if linear(n) and (is_emb or is_head):
            if embed_lora and not vocab_changed and wanted(mod):
                r = resolve_rank(rank, shape, n, clamp=clamp_rank)
                entries.append(AdapterEntry(n, "embedding" if is_emb else "lora", shape, out_dt, r))
                lora_modules.add(mod)
            elif not any(re.search(p, mod) for p in exclude):
                entries.append(AdapterEntry(n, "full", shape, np.dtype(ft.dtype(n)) if dtype is None else out_dt))
            continue
        if linear(n):
            if wanted(mod):
                conv = is_conv1d(cfg, mod)  # GPT-2 Conv1D: the weight is (in, out), the rank check is the same
                entries.append(AdapterEntry(n, "lora", shape, out_dt, resolve_rank(rank, shape, n, clamp=clamp_rank),
                                            fan_in_fan_out=conv))
                lora_modules.add(mod)
            continue
        if n.endswith(".bias") and f"{mod}.weight" in shapes and linear(f"{mod}.weight"):
            continue  # decided below, once the module's weight is
        if not skip_undecomposable and wanted(mod):
            entries.append(AdapterEntry(n, "full", shape, out_dt))
    # biases of linear modules: a LoRA bias update (lora_B.bias) with the LoRA, saved whole with a saved weight.
    # PEFT's lora_bias applies to every LoRA module, and merge_and_unload then fails on modules without a bias:
    # when only some LoRA modules have biases (Qwen2's q/k/v), those modules are saved whole instead.
    lora_w = [e.name for e in entries if e.kind in ("lora", "embedding")]
    biased = {w for w in lora_w if f"{w[:-len('.weight')]}.bias" in shapes}
    if biased and len(biased) < len(lora_w):
        entries = [AdapterEntry(e.name, "full", e.shape, np.dtype(ft.dtype(e.name)) if dtype is None else e.dtype)
                   if e.name in biased else e for e in entries]
    kinds = {e.name: e.kind for e in entries}
    for n in names:
        mod = n.rsplit(".", 1)[0]
        w = f"{mod}.weight"
        if n.endswith(".bias") and w in shapes and linear(w) and _is_float(ft.dtype(n)):
            out_dt = np.dtype(dtype) if dtype is not None else np.dtype(ft.dtype(n))
            if kinds.get(w) == "lora":
                entries.append(AdapterEntry(n, "bias", shapes[n], out_dt))
            elif kinds.get(w) == "full":
                entries.append(AdapterEntry(n, "full", shapes[n], out_dt))
    return entries


def extract_lora(base: Any, finetuned: Any, out_dir: str | os.PathLike, *, rank: Rank, embed_lora: bool = False,
                 skip_undecomposable: bool = False, clamp_rank: bool = False, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), dtype: Any = None, overwrite: bool = False,
                 base_name: Optional[str] = None) -> ExtractResult:
    """Extract a PEFT LoRA adapter with ``finetuned ~= base + adapter`` (``jmerge lora extract``).

    Args:
      base: the base model: a path / Hub id / ``model+lora`` spec, or an open reader.
      finetuned: the fine-tuned model, likewise.
      out_dir: the adapter directory (written atomically).
      rank: the LoRA rank of every linear weight (an int, or ``"full"``: ``min(out, in)`` per matrix, which
        reproduces the fine-tune up to float rounding).
      embed_lora: factorise embeddings and the head too (default: save them whole, ``modules_to_save``).
      skip_undecomposable: leave out tensors that are not linear weights (norms ...) instead of saving them whole.
      clamp_rank: use ``min(rank, min(out, in))`` for small matrices instead of refusing (mergekit's behaviour).
      include, exclude: regular expressions on module names (mergekit's ``--include-regex``/``--exclude-regex``).
      dtype: dtype of the stored tensors (default: each fine-tuned tensor's dtype, as mergekit does;
        ``"float32"`` keeps the factors exact).
      overwrite: replace an existing ``out_dir``.
      base_name: ``base_model_name_or_path`` in the config (default: the base's path / spec).

    Returns:
      An :class:`ExtractResult` with the residual of every factorised tensor.

    Raises:
      MergeInputError: a rank larger than a matrix (naming the tensor), different tensors or shapes.
      CheckpointError: unreadable inputs; OutputExistsError: ``out_dir`` exists.

    References: mergekit-extract-lora (Goddard et al., EMNLP 2024 industry track); Hu et al., "LoRA" (ICLR 2022);
    Eckart & Young (Psychometrika 1936).
    """
    b, own_b = _open(base)
    try:
        f, own_f = _open(finetuned)
    except BaseException:
        _close(b if own_b else None)
        raise
    try:
        if embed_lora and ties_head(f.config) and not any(n.rsplit(".", 1)[0].endswith(TIED_HEAD) for n in f.keys()):
            warnings.warn(f"'{f.path}' ties its output head to the embeddings: the embeddings are saved whole "
                          "(modules_to_save) instead of embed_lora, since PEFT's merge_and_unload applies a LoRA of "
                          "tied embeddings twice", UserWarning, stacklevel=2)
            embed_lora = False
        entries = plan_extraction(b, f, rank, embed_lora=embed_lora, skip_undecomposable=skip_undecomposable,
                                  clamp_rank=clamp_rank, include=include, exclude=exclude, dtype=dtype)
        residual: dict[str, float] = {}
        norm: dict[str, float] = {}

        def compute(e: AdapterEntry) -> list[np.ndarray]:
            src = head_src if head is not None and e.name == head.name else e.name
            w = f.get(src)
            if e.kind == "full":
                return [w]
            d = w.astype(np.float32) - b.get(src).astype(np.float32)
            if e.kind == "bias":
                return [d]
            if e.kind == "embedding" or e.fan_in_fan_out:
                d = d.T  # PEFT's embedding LoRA and Conv1D (in, out) weights: (B @ A).T is the update
            a, bb, dropped = low_rank_factors(d, e.rank)
            residual[e.name] = float(np.sqrt(dropped))
            norm[e.name] = float(np.linalg.norm(d))
            return [a, bb]

        head, head_src = _tied_head(f, entries)
        if head is not None:
            entries = entries + [head]
        # PEFT's ensure_weight_tying: for modules_to_save, and only for modules named embed_tokens
        tied = head is not None and head.kind == "full" and head_src.rsplit(".", 2)[-2] == "embed_tokens"
        modules = {n.rsplit(".", 1)[0] for n in f.keys()} | {TIED_HEAD}
        cfg = adapter_config(entries, base_model=base_name or str(getattr(b, "path", base)), modules=modules,
                             tied_embeddings=tied)
        out = write_adapter(out_dir, entries, compute, cfg, overwrite=overwrite,
                            readme=_card(str(getattr(b, "path", base)), str(getattr(f, "path", finetuned)), cfg))
        return ExtractResult(out, entries, residual, norm)
    finally:
        _close(b if own_b else None, f if own_f else None)


def _tied_head(f: Any, entries: list[AdapterEntry]) -> tuple[Optional[AdapterEntry], Optional[str]]:
    """The entry for a tied output head (``lm_head``: not in the checkpoint, it is the input embedding) when the
    adapter saves or adapts the input embedding, and that embedding's tensor name; else ``(None, None)``.

    PEFT replaces or adapts modules one by one: a head tied to an embedding saved in ``modules_to_save`` would keep
    the base's weights, so the head gets the same full tensor."""
    if not ties_head(f.config) or any(n.rsplit(".", 1)[0].endswith(TIED_HEAD) for n in f.keys()):
        return None, None
    vocab = (f.config or {}).get("vocab_size")
    emb = [e for e in entries if e.kind in ("full", "embedding") and re.search(r"(^|\.)(embed_tokens|wte|word_embeddings)$", e.module)
           and len(e.shape) == 2 and (vocab is None or e.shape[0] == vocab)]
    if len(emb) != 1:
        return None, None
    e = emb[0]
    if e.kind != "full":
        return None, None
    return AdapterEntry(f"{TIED_HEAD}.weight", "full", e.shape, e.dtype), e.name


def _card(base: str, ft: str, cfg: dict) -> str:
    return (f"---\nbase_model: {base}\nlibrary_name: peft\ntags: [jmerge, lora]\n---\n\n"
            f"# LoRA extracted with jmerge\n\nA rank-{cfg['r']} LoRA adapter approximating `{ft}` - `{base}` "
            "by truncated SVD of each linear weight's update (`jmerge lora extract`).\n")
