"""One resolver for the models a merge config names: local paths, Hub ids (``@revision``) and ``model+lora``.

:func:`open_model` turns a model spec as written in a mergekit config into a checkpoint reader:

* a path that exists (a HF dir, a ``.safetensors`` file, an Orbax dir) is opened as is -- a local path
  always wins, even when it contains ``@`` or ``+``;
* ``org/name`` or ``org/name@rev`` is looked up in the Hugging Face cache, else downloaded
  (:mod:`jmerge.io.hub`);
* ``MODEL+ADAPTER`` (mergekit's syntax; each side a path or a Hub id) wraps the model's reader in a
  :class:`~jmerge.io.LoraReader` that applies the PEFT LoRA adapter as tensors are read.

With ``headers_only=True`` nothing large is downloaded: a Hub model that is not cached is described by
its remote safetensors headers (:class:`~jmerge.io.hub.RemoteHeaderReader`), enough to validate a whole
merge config before any weights are fetched.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (EMNLP 2024
industry track) for ``model+lora`` and ``id@revision`` references; the Hugging Face Hub cache.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .errors import CheckpointError, CheckpointNotFoundError
from .hub import HubRef, hub_offline, local_path, parse_ref, remote_headers, resolve_ref
from .lora import LoraReader
from .safetensors import open_checkpoint

__all__ = ["open_model", "split_spec", "resolve_model_dir"]


def split_spec(spec: str, base_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``"model+adapter"`` -> ``("model", "adapter")``; a spec without ``+`` (or an existing path) -> ``(spec, None)``.

    Raises:
      CheckpointError: more than one ``+`` or an empty side.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for ``model+lora``.
    """
    spec = os.fspath(spec)
    if "+" not in spec or local_path(spec, base_dir) is not None:
        return spec, None
    parts = spec.split("+")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise CheckpointError(f"'{spec}': a model reference is MODEL or MODEL+LORA_ADAPTER (one '+'), each a local "
                              "path or a Hugging Face id (org/name[@revision])")
    return parts[0], parts[1]


def resolve_model_dir(part: str, *, base_dir: Optional[str] = None, kind: str = "model",
                      download: bool = True) -> str:
    """The local path of one spec part (no ``+``): as given when it exists, else the Hub snapshot dir.

    Args:
      part: a local path, ``org/name`` or ``org/name@rev``.
      base_dir: directory relative paths may be relative to (the config's), tried after the cwd.
      kind: ``"model"`` or ``"adapter"`` (which files a download fetches).
      download: allow downloading a Hub id that is not cached (never when ``HF_HUB_OFFLINE`` is set).

    Returns:
      A local path; a missing local path is returned unchanged (the reader reports "not found").

    References: the Hugging Face Hub cache layout; ``huggingface_hub.snapshot_download``.
    """
    ref = parse_ref(part, base_dir)
    return resolve_ref(ref, kind=kind, download=download) if isinstance(ref, HubRef) else ref


def _open_part(part: str, base_dir: Optional[str], headers_only: bool) -> Any:
    ref = parse_ref(part, base_dir)
    if not isinstance(ref, HubRef):
        return open_checkpoint(ref)
    if headers_only:
        try:
            return open_checkpoint(resolve_ref(ref, kind="model", download=False))
        except CheckpointNotFoundError:
            if hub_offline():
                raise
        return remote_headers(ref)  # not cached: headers over HTTP, no weights
    return open_checkpoint(resolve_ref(ref, kind="model", download=True))


def open_model(spec: "str | os.PathLike", *, base_dir: Optional[str] = None, headers_only: bool = False) -> Any:
    """Open a model as a merge config names it: a local path, a Hub id (``@rev``), or ``MODEL+LORA``.

    Args:
      spec: the model reference (``/path/to/model``, ``org/name``, ``org/name@rev``,
        ``org/name+org/adapter``, ``./model+./adapter``).
      base_dir: directory relative paths may be relative to (the config's), tried after the cwd.
      headers_only: validation mode: never download weights; a Hub model that is not cached is read from
        its remote safetensors headers (a LoRA adapter, a few MB, is still fetched when needed).

    Returns:
      A reader with the :class:`~jmerge.io.CheckpointReader` interface (a :class:`~jmerge.io.LoraReader`
      for ``MODEL+LORA``; a header-only reader, whose ``get`` raises, for uncached Hub models in
      ``headers_only`` mode).

    Raises:
      CheckpointError: missing path, Hub id not cached while offline / unreachable, ``.bin``-only
        weights, an adapter that does not fit the model; each one line naming the input and the fix.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for model references;
    Hugging Face PEFT for LoRA adapters.
    """
    spec = os.fspath(spec)
    here = local_path(spec, base_dir)
    if here is not None:
        return open_checkpoint(here)
    model, lora = split_spec(spec, base_dir)
    reader = _open_part(model, base_dir, headers_only)
    if lora is None:
        return reader
    try:
        adapter_dir = resolve_model_dir(lora, base_dir=base_dir, kind="adapter")
        if not os.path.isdir(adapter_dir):
            raise CheckpointError(f"'{spec}': LoRA adapter '{lora}' not found (no such directory, and not a Hugging "
                                  "Face id); give a directory with adapter_config.json + adapter_model.safetensors")
        return LoraReader(reader, adapter_dir, label=lora)
    except BaseException:
        reader.close()
        raise
