"""Hugging Face Hub ids as merge inputs: ``org/name`` and ``org/name@revision``, through ``huggingface_hub``.

A model spec part is a **local path** when it exists (it always wins), else a **Hub id** when it looks
like one (``name`` or ``org/name``, optionally ``@branch``, ``@tag`` or ``@commit``). A Hub id is found in
the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the
standard layout ``models--org--name/{refs,snapshots}``) without any network access; when it is not
cached it is downloaded -- safetensors, JSON and tokenizer files only -- unless downloads are off
(``HF_HUB_OFFLINE=1``) or the Hub is unreachable, which is one clear error naming the id, the cache and
what to do. A repository with PyTorch pickle weights only (``*.bin``) is refused before downloading.

Before any weights are downloaded, :func:`remote_headers` reads a repository's ``config.json`` and its
safetensors headers (HTTP range requests, a few kB per file) so the whole merge config can be validated
first. The environment is read at call time (not when ``huggingface_hub`` was imported). The package is
an optional dependency (``pip install "jmerge[hub]"``) imported only when a Hub id is used.

References: the Hugging Face Hub cache layout and ``huggingface_hub`` (``snapshot_download``,
``get_safetensors_metadata``); Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for the
``org/name@revision`` syntax of model references.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import numpy as np

from .auxfiles import TOKENIZER_PATTERNS
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from .safetensors import _ST_TO_NP

__all__ = ["HubRef", "is_hub_id", "parse_ref", "hub_cache_dir", "hub_offline", "resolve_ref", "remote_headers",
           "RemoteHeaderReader", "INSTALL_HINT"]

INSTALL_HINT = 'pip install "jmerge[hub]"'
MODEL_PATTERNS = ("*.safetensors", "*.json", "*.jinja") + TOKENIZER_PATTERNS
"""Files downloaded for a model: weights (safetensors only), configs, tokenizer and chat templates."""
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")
"""Files downloaded for a PEFT LoRA adapter."""

_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}(?:/{_PART})?")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".yml", ".yaml", ".gguf")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is shaped like a Hub repository id (``name`` or ``org/name``, no revision).

    References: the Hugging Face Hub repository naming rules.
    """
    return (bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text
            and not text.lower().endswith(_FILE_SUFFIXES))


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A Hub repository at a revision (``None``: the default branch).

    References: the Hugging Face Hub (repositories, revisions).
    """

    repo_id: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def local_path(text: str, base_dir: Optional[str] = None) -> Optional[str]:
    """``text`` as an existing local path (tried as given, then relative to ``base_dir``), or None.

    References: none (infrastructure).
    """
    text = os.path.expanduser(text)
    if os.path.exists(text):
        return text
    if base_dir and not os.path.isabs(text):
        cand = os.path.join(base_dir, text)
        if os.path.exists(cand):
            return cand
    return None


def parse_ref(text: str, base_dir: Optional[str] = None) -> "str | HubRef":
    """One part of a model spec -> a local path (str) or a :class:`HubRef`.

    A path that exists wins; ``org/name@rev`` is a Hub id at a revision; anything else that is not
    shaped like a Hub id stays a (missing) local path, so the reader reports "not found".

    Raises:
      CheckpointError: more than one ``@``, or a revision given for a local path.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for ``path@revision``.
    """
    here = local_path(text, base_dir)
    if here is not None:
        return here
    if "@" in text:
        if text.count("@") > 1:
            raise CheckpointError(f"'{text}': a model reference takes at most one '@' (org/name@revision)")
        repo, rev = text.split("@")
        if local_path(repo, base_dir) is not None:
            raise CheckpointError(f"'{text}': '{repo}' is a local path; a revision ('@{rev}') applies to Hugging "
                                  "Face Hub ids only; drop it or check out that revision into another directory")
        if is_hub_id(repo) and rev:
            return HubRef(repo, rev)
        return text
    return HubRef(text) if is_hub_id(text) else text


def _is_true(v: Optional[str]) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """The Hugging Face Hub cache directory, from the environment now (as ``huggingface_hub`` reads it).

    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

    References: ``huggingface_hub`` environment variables.
    """
    env = os.environ
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(k):
            return os.path.expanduser(env[k])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.expanduser(os.path.join(home, "hub"))


def hub_offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` true), read now.

    References: ``huggingface_hub`` environment variables.
    """
    return _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))


def _endpoint() -> Optional[str]:
    return os.environ.get("HF_ENDPOINT") or None


def _hf(ref: HubRef) -> Any:
    try:
        import huggingface_hub  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CheckpointNotFoundError(
            f"'{ref}' is not a local path; reading it as a Hugging Face Hub id needs huggingface_hub: "
            f"{INSTALL_HINT} (or pass a local directory)") from None
    return huggingface_hub


def _err_classes(hf: Any, *names: str) -> tuple:
    errs = getattr(hf, "errors", None)
    out = []
    for n in names:
        c = getattr(errs, n, None) or getattr(getattr(hf, "utils", None), n, None)
        if isinstance(c, type):
            out.append(c)
    return tuple(out)


def _download_hint(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return f"`hf download {ref.repo_id}{rev}` (huggingface_hub's CLI)"


def _weights_state(d: str, kind: str) -> str:
    """``"ok"``, ``"pickle"`` (only .bin/.pt weights) or ``"none"`` for a snapshot directory."""
    names = os.listdir(d)
    if kind == "adapter":
        if "adapter_model.safetensors" in names and "adapter_config.json" in names:
            return "ok"
        return "pickle" if any(n.startswith("adapter_model") and n.endswith(_PICKLE_SUFFIXES) for n in names) else "none"
    if any(n.endswith(".safetensors") for n in names):
        return "ok"
    return "pickle" if any(n.endswith(_PICKLE_SUFFIXES) for n in names) else "none"


def _pickle_refusal(ref: HubRef, where: str, kind: str) -> CheckpointFormatError:
    what = "adapter_model.bin" if kind == "adapter" else "PyTorch pickle weights (.bin/.pt)"
    return CheckpointFormatError(
        f"Hugging Face {kind} '{ref}' ({where}) has only {what}; jmerge reads safetensors only and does not "
        "unpickle: use a revision or copy of the repository with .safetensors weights (e.g. re-save it with "
        "`save_pretrained(..., safe_serialization=True)`)")


def _cached(hf: Any, ref: HubRef, kind: str) -> Optional[str]:
    """The cached snapshot directory of ``ref`` (no network), or None.

    Only the config file is required of the snapshot here: a snapshot fetched with other file patterns
    (mergekit's, transformers' per-file downloads) is still found; the weights are checked afterwards.
    """
    patterns = ["adapter_config.json" if kind == "adapter" else "config.json"]
    misses = _err_classes(hf, "LocalEntryNotFoundError", "IncompleteSnapshotError", "EntryNotFoundError",
                          "HFValidationError")
    try:
        d = hf.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=hub_cache_dir(), local_files_only=True,
                                 allow_patterns=patterns)
    except misses + (FileNotFoundError,):
        return None
    return d if os.path.isdir(d) else None


def _unreachable(ref: HubRef, e: BaseException, kind: str) -> CheckpointNotFoundError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CheckpointNotFoundError(
        f"Hugging Face {kind} '{ref}' is not a local path and not in the cache {hub_cache_dir()}, and the Hub "
        f"could not be reached ({type(e).__name__}{': ' + msg if msg else ''}); connect to the network, or fill "
        f"the cache elsewhere with {_download_hint(ref)} and point HF_HUB_CACHE at it, or pass a local directory")


def _remote_error(hf: Any, ref: HubRef, e: BaseException, kind: str) -> CheckpointError:
    gated = _err_classes(hf, "GatedRepoError")
    if gated and isinstance(e, gated):
        return CheckpointNotFoundError(f"Hugging Face {kind} '{ref.repo_id}' is gated: accept its terms on "
                                       "huggingface.co and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(e, _err_classes(hf, "RepositoryNotFoundError")):
        return CheckpointNotFoundError(f"'{ref.repo_id}' is neither a local path nor a Hugging Face Hub repository "
                                       "(or it is private: log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, _err_classes(hf, "RevisionNotFoundError")):
        return CheckpointNotFoundError(f"Hugging Face {kind} '{ref.repo_id}' has no revision '{ref.revision}'; "
                                       "give an existing branch, tag or commit after '@'")
    if isinstance(e, _err_classes(hf, "HfHubHTTPError")) and getattr(getattr(e, "response", None),
                                                                      "status_code", 0) in (401, 403):
        return CheckpointNotFoundError(f"Hugging Face {kind} '{ref}': access denied; log in (`hf auth login` or "
                                       "HF_TOKEN) with an account that can read it")
    return _unreachable(ref, e, kind)


def _not_cached_offline(ref: HubRef, kind: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"Hugging Face {kind} '{ref}' is not a local path and not in the cache {hub_cache_dir()}, and downloads "
        f"are off (HF_HUB_OFFLINE=1); download it with network access ({_download_hint(ref)}, same HF_HUB_CACHE), "
        "or unset HF_HUB_OFFLINE, or pass a local directory")


def _list_files(hf: Any, ref: HubRef, kind: str) -> list[str]:
    api = hf.HfApi(endpoint=_endpoint())
    try:  # model_info: one request, no retry loop (list_repo_files retries with back-off for ~25 s)
        siblings = api.model_info(ref.repo_id, revision=ref.revision).siblings
        if siblings is None:
            return list(api.list_repo_files(ref.repo_id, revision=ref.revision))
        return [s.rfilename for s in siblings]
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise _remote_error(hf, ref, e, kind) from None


def resolve_ref(ref: HubRef, *, kind: str = "model", download: bool = True) -> str:
    """The local snapshot directory of a Hub id: from the cache, else downloaded (when allowed).

    Args:
      ref: repository and revision.
      kind: ``"model"`` (safetensors weights, configs, tokenizer files) or ``"adapter"``
        (``adapter_config.json`` + ``adapter_model.safetensors``).
      download: download a missing snapshot (when not offline); False: the cache only.

    Raises:
      CheckpointNotFoundError: not cached and offline / unreachable / not allowed to download; no such
        repository or revision; gated or private.
      CheckpointFormatError: the repository has PyTorch pickle weights only.

    References: the Hugging Face Hub cache layout; ``huggingface_hub.snapshot_download``.
    """
    hf = _hf(ref)
    d = _cached(hf, ref, kind)
    if d is not None:
        state = _weights_state(d, kind)
        if state == "ok":
            return d
        if state == "pickle":
            raise _pickle_refusal(ref, f"cached in {d}", kind)
    if not hub_offline() and not download:
        raise CheckpointNotFoundError(f"Hugging Face {kind} '{ref}' is not (completely) in the cache {hub_cache_dir()} "
                                      "and this step does not download")
    if hub_offline():
        if d is not None:
            raise CheckpointNotFoundError(
                f"Hugging Face {kind} '{ref}' is only partly cached in {d} (no "
                f"{'adapter_model.safetensors' if kind == 'adapter' else '.safetensors weights'}), and downloads "
                f"are off (HF_HUB_OFFLINE=1); complete it with {_download_hint(ref)} where the network is "
                "available, or pass a local directory")
        raise _not_cached_offline(ref, kind)
    files = _list_files(hf, ref, kind)
    if kind == "adapter":
        if "adapter_model.safetensors" not in files:
            if any(f.startswith("adapter_model") and f.endswith(_PICKLE_SUFFIXES) for f in files):
                raise _pickle_refusal(ref, "on the Hub", kind)
            raise CheckpointNotFoundError(f"Hugging Face repository '{ref}' is not a PEFT LoRA adapter (no "
                                          "adapter_model.safetensors / adapter_config.json)")
    elif not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(_PICKLE_SUFFIXES) for f in files):
            raise _pickle_refusal(ref, "on the Hub", kind)
        raise CheckpointNotFoundError(f"Hugging Face repository '{ref}' has no model weights (.safetensors)")
    ignore = None
    if kind == "model" and any(f in files for f in ("model.safetensors", "model.safetensors.index.json")):
        ignore = ["consolidated*", "original/*"]  # the same weights in another layout: not downloaded twice
    try:
        return hf.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=hub_cache_dir(),
                                    allow_patterns=list(ADAPTER_PATTERNS if kind == "adapter" else MODEL_PATTERNS),
                                    ignore_patterns=ignore, endpoint=_endpoint())
    except Exception as e:  # noqa: BLE001
        raise _remote_error(hf, ref, e, kind) from None


class RemoteHeaderReader:
    """Shapes and dtypes of a Hub repository's tensors, from its safetensors headers only (no weights).

    Same query interface as :class:`~jmerge.io.CheckpointReader` (``keys``, ``shape``, ``dtype``,
    ``nbytes``, ``config``, ``path``, ``dir``); :meth:`get` raises, the weights are not downloaded.

    References: the safetensors format; ``huggingface_hub.get_safetensors_metadata``.
    """

    def __init__(self, ref: HubRef, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], config: Optional[dict]):
        self.ref = ref
        self.path = f"hf://{ref}"
        self.dir = ""
        self.config = config
        self.metadata: dict[str, str] = {}
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def __len__(self) -> int:
        return len(self._t)

    def _info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        try:
            return self._t[name]
        except KeyError:
            raise CheckpointNotFoundError(f"{self.path}: no tensor named {name!r} ({len(self._t)} tensors)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._info(name)[0]

    def nbytes(self, name: str) -> int:
        dt, shape = self._info(name)
        return int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def layout(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(k, s, d) for k, (d, s) in self._t.items()]

    def get(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        raise CheckpointError(f"{self.path}: only the headers were read (validation); the weights are downloaded "
                              "when the merge runs")

    def get_rows(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self.get(name, out)

    def get_flat(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self.get(name, out)

    def rows_readable(self, name: str) -> bool:
        """As the downloaded checkpoint's reader will say (a dry run's plan matches the merge's)."""
        return len(self._info(name)[1]) >= 1

    def close(self) -> None:
        pass

    def __enter__(self) -> "RemoteHeaderReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteHeaderReader({str(self.ref)!r}, {len(self._t)} tensors)"


def remote_headers(ref: HubRef) -> RemoteHeaderReader:
    """Tensor names, shapes and dtypes and ``config.json`` of a Hub repository, without its weights.

    Reads the safetensors headers with HTTP range requests and downloads ``config.json`` (into the
    cache). Used to validate a merge config before anything large is downloaded.

    Raises:
      CheckpointNotFoundError: offline, unreachable, no such repository/revision, gated.
      CheckpointFormatError: no safetensors weights (PyTorch pickle only), or an unknown dtype.

    References: the safetensors format; ``huggingface_hub.get_safetensors_metadata``.
    """
    hf = _hf(ref)
    if hub_offline():
        raise _not_cached_offline(ref, "model")
    api = hf.HfApi(endpoint=_endpoint())
    try:
        meta = api.get_safetensors_metadata(ref.repo_id, revision=ref.revision)
    except _err_classes(hf, "NotASafetensorsRepoError"):
        files = _list_files(hf, ref, "model")
        if any(f.endswith(_PICKLE_SUFFIXES) for f in files):
            raise _pickle_refusal(ref, "on the Hub", "model") from None
        raise CheckpointNotFoundError(f"Hugging Face repository '{ref}' has no model weights (.safetensors)") from None
    except Exception as e:  # noqa: BLE001
        raise _remote_error(hf, ref, e, "model") from None
    tensors: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for fname, fm in meta.files_metadata.items():
        for name, info in fm.tensors.items():
            if meta.weight_map.get(name, fname) != fname:
                continue
            if info.dtype not in _ST_TO_NP:
                raise CheckpointFormatError(f"hf://{ref}/{fname}: tensor {name!r} has unknown dtype {info.dtype!r}")
            tensors[name] = (_ST_TO_NP[info.dtype], tuple(int(s) for s in info.shape))
    config = None
    try:
        p = hf.hf_hub_download(ref.repo_id, "config.json", revision=ref.revision, cache_dir=hub_cache_dir(),
                               endpoint=_endpoint())
        with open(p, encoding="utf-8") as f:
            config = json.load(f)
    except _err_classes(hf, "EntryNotFoundError", "RemoteEntryNotFoundError"):
        config = None
    except Exception as e:  # noqa: BLE001
        raise _remote_error(hf, ref, e, "model") from None
    return RemoteHeaderReader(ref, tensors, config)
