"""``merge_loras``: several LoRA adapters of one base merged with any jmerge method, re-factorised to one adapter.

Each adapter ``i`` gives, per tensor it changes, a task vector on the base: ``D_i = s_i * B_i @ A_i`` for a
LoRA module (float32, oriented like the weight, as :class:`~jmerge.io.LoraReader` applies it), or
``W_i - W_base`` for a tensor the adapter saves whole (``modules_to_save``); an adapter that does not touch
a tensor contributes ``D_i = 0``. The ``D_i`` are merged as task vectors on a zero base::

    D = jmerge.merge(method, 0, [D_1, ..., D_n])      (per tensor, float32)

and ``D`` is stored as a rank-``r`` LoRA (truncated SVD, :func:`~jmerge.lora.low_rank_factors`) for LoRA
modules, ``W_base + D`` whole for saved tensors, ``D`` as ``lora_B.bias`` for bias updates. With
``task_arithmetic`` (weights 1) and ``rank="full"`` the result applied to the base equals the base plus the
sum of the adapters' updates (up to float32 rounding of the SVD).

References: Hu et al., "LoRA" (ICLR 2022); Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023);
Yadav et al., "TIES-Merging" (NeurIPS 2023) and the other jmerge methods; Eckart & Young (Psychometrika 1936).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..core.errors import MergeInputError
from ..io import LoraReader, open_model
from .adapter import PREFIX, AdapterEntry, adapter_config, write_adapter
from .factor import Rank, low_rank_factors, resolve_rank

__all__ = ["merge_loras", "MergeLorasResult", "lora_task_vectors"]


class _Borrowed:
    """A reader lent to a :class:`LoraReader` without giving up ownership (``close`` does nothing)."""

    def __init__(self, reader: Any):
        self._r = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)

    def __contains__(self, name: str) -> bool:
        return name in self._r

    def __len__(self) -> int:
        return len(self._r)

    def close(self) -> None:
        pass


@dataclasses.dataclass
class MergeLorasResult:
    """What :func:`merge_loras` wrote.

    Attributes:
      out_dir: the adapter directory.
      entries: its entries.
      residual: per re-factorised tensor, ``||D - B @ A||_F`` (the dropped singular values).
      norm: per re-factorised tensor, ``||D||_F`` of the merged update.

    References: Eckart & Young (Psychometrika 1936).
    """

    out_dir: str
    entries: list[AdapterEntry]
    residual: dict[str, float]
    norm: dict[str, float]


def _kind(reader: LoraReader, name: str) -> str:
    """How an adapter changes a tensor: ``lora``, ``embedding``, ``bias`` or ``full``."""
    mod = name.rsplit(".", 1)[0]
    keys = set(reader.adapter.keys())
    if PREFIX + name in keys or f"{PREFIX}{mod}.base_layer.{name.rsplit('.', 1)[1]}" in keys:
        return "full"
    if f"{PREFIX}{mod}.lora_embedding_A" in keys:
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    return "lora"


def lora_task_vectors(base: Any, readers: Sequence[LoraReader], name: str) -> np.ndarray:
    """The stacked float32 task vectors ``(n, *shape)`` of ``name`` under each adapter (zeros where untouched).

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    shape = tuple(base.shape(name))
    out = np.zeros((len(readers), *shape), np.float32)
    w0 = None
    for i, r in enumerate(readers):
        if name not in r.targets:
            continue
        if _kind(r, name) == "full":
            if w0 is None:
                w0 = base.get(name).astype(np.float32)
            out[i] = r.get(name).astype(np.float32) - w0
        else:
            out[i] = r.delta(name)
    return out


def merge_loras(base: Any, adapters: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                method: Any = "task_arithmetic", *, rank: Rank, hparams: Optional[Mapping[str, Any]] = None,
                seed: int = 0, dtype: Any = "float32", clamp_rank: bool = False, overwrite: bool = False,
                **method_kwargs: Any) -> MergeLorasResult:
    """Merge LoRA adapters of one base with a jmerge method and write one rank-``rank`` PEFT adapter.

    Args:
      base: the base model the adapters were trained on (path / Hub id, or an open reader).
      adapters: adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).
      out_dir: the output adapter directory (written atomically).
      method: a registered method name (``"ties"``) or a :class:`~jmerge.Transform`.
      rank: the output rank of every LoRA module (int, or ``"full"``: ``min(out, in)``).
      hparams: hyperparameter overrides passed to :func:`jmerge.merge` (``{"weight": PerModel([...])}``).
      seed: seed of random methods (DARE ...); each tensor's key also folds its name.
      dtype: dtype of the stored factors and bias updates (default float32; saved tensors keep the base's dtype).
      clamp_rank: use ``min(rank, min(out, in))`` for small matrices instead of refusing.
      overwrite: replace an existing ``out_dir``.
      **method_kwargs: arguments of the method's factory when ``method`` is a name (``density=0.5``).

    Returns:
      A :class:`MergeLorasResult` with each re-factorised tensor's residual.

    Raises:
      CheckpointError: an adapter that does not fit the base (naming the adapter and the tensor), not a LoRA.
      MergeInputError: no adapters, an unknown method, a rank larger than a matrix (naming the tensor),
        ``fan_in_fan_out`` adapters (GPT-2 ``Conv1D``; not supported here).

    References: Hu et al., "LoRA" (ICLR 2022); Ilharco et al. (ICLR 2023); Yadav et al., "TIES-Merging"
    (NeurIPS 2023); Eckart & Young (Psychometrika 1936).
    """
    from ..core.driver import merge  # noqa: PLC0415 - JAX only when merging
    from ..methods import METHODS  # noqa: PLC0415

    adapters = [os.fspath(a) for a in adapters]
    if not adapters:
        raise MergeInputError("merge_loras: give at least one adapter directory")
    if isinstance(method, str):
        if method not in METHODS:
            raise MergeInputError(f"unknown merge method {method!r}; known: {', '.join(sorted(METHODS))}")
        transform = METHODS[method](**method_kwargs)
    else:
        if method_kwargs:
            raise MergeInputError("method keyword arguments need a method name; for a Transform pass hparams=")
        transform = method
    owned = isinstance(base, (str, os.PathLike))
    b = open_model(base) if owned else base
    readers: list[LoraReader] = []
    try:
        for a in adapters:
            readers.append(LoraReader(_Borrowed(b), a, label=a))
        for r in readers:
            if r.adapter_config.get("fan_in_fan_out"):
                raise MergeInputError(f"{r.adapter_dir}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported by "
                                      "merge_loras; merge them into the model with 'model+lora' specs instead")
        targets: list[str] = []
        for r in readers:
            targets += [t for t in r.targets if t not in targets]
        order = {n: i for i, n in enumerate(b.keys())}
        targets.sort(key=lambda n: order.get(n, len(order)))
        out_dt = np.dtype(dtype)
        entries: list[AdapterEntry] = []
        for n in targets:
            kinds = {_kind(r, n) for r in readers if n in r.targets}
            shape = tuple(b.shape(n))
            if "full" in kinds:
                entries.append(AdapterEntry(n, "full", shape, np.dtype(b.dtype(n))))
            elif len(kinds) > 1:
                raise MergeInputError(f"tensor {n!r}: the adapters change it in different ways ({sorted(kinds)}); "
                                      "merge adapters of the same kind")
            elif kinds == {"bias"}:
                entries.append(AdapterEntry(n, "bias", shape, out_dt))
            else:
                (k,) = kinds
                entries.append(AdapterEntry(n, k, shape, out_dt, resolve_rank(rank, shape, n, clamp=clamp_rank)))
        num_layers = (getattr(b, "config", None) or {}).get("num_hidden_layers") if isinstance(
            getattr(b, "config", None), dict) else None
        residual: dict[str, float] = {}
        norm: dict[str, float] = {}

        def compute(e: AdapterEntry) -> list[np.ndarray]:
            tv = lora_task_vectors(b, readers, e.name)
            zero = {e.name: np.zeros(tv.shape[1:], np.float32)}
            merged = merge(transform, zero, [{e.name: t} for t in tv], hparams=hparams, seed=seed,
                           num_layers=num_layers, out_dtype=np.float32)
            d = np.asarray(merged[e.name], np.float32)
            if e.kind == "full":
                return [(b.get(e.name).astype(np.float32) + d).astype(e.dtype)]
            if e.kind == "bias":
                return [d]
            if e.kind == "embedding":
                d = d.T
            a, bb, dropped = low_rank_factors(d, e.rank)
            residual[e.name] = float(np.sqrt(dropped))
            norm[e.name] = float(np.linalg.norm(d))
            return [a, bb]

        first = readers[0].adapter_config
        cfg = adapter_config(entries, base_model=str(first.get("base_model_name_or_path") or getattr(b, "path", base)),
                             modules={n.rsplit(".", 1)[0] for n in b.keys()},
                             extra={"task_type": first.get("task_type") or "CAUSAL_LM"})
        readme = (f"---\nlibrary_name: peft\ntags: [jmerge, lora]\n---\n\n# LoRA merged with jmerge\n\n"
                  f"{len(adapters)} adapters merged with `{getattr(transform, 'name', method)}` and re-factorised "
                  f"to rank {cfg['r']} (`jmerge lora merge`): " + ", ".join(f"`{a}`" for a in adapters) + ".\n")
        out = write_adapter(out_dir, entries, compute, cfg, overwrite=overwrite, readme=readme)
        return MergeLorasResult(out, entries, residual, norm)
    finally:
        for r in readers:
            r.close()
        if owned:
            b.close()
