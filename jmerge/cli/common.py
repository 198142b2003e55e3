"""Helpers shared by the ``jmerge`` commands: one-line errors, sizes, the compile cache.

References: none (infrastructure).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["fail", "parse_size", "parse_device", "enable_compile_cache", "add_mergekit_options",
           "apply_mergekit_options"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def fail(msg: str, code: int) -> int:
    """Print ``jmerge: error: <first line of msg>`` on stderr and return ``code``."""
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else "error"
    print(f"jmerge: error: {first}", file=sys.stderr)
    return code


def parse_size(text: str) -> int:
    """An ``--out-shard-size``: a number with mergekit's suffixes, or with a byte unit; returns bytes.

    ``K``/``M``/``B`` are thousand, million and billion as in mergekit (``"5B"`` -> 5e9, its default);
    ``KB``/``MB``/``GB``/``TB`` are the same decimal multiples and ``KiB``/``MiB``/``GiB``/``TiB`` binary
    ones (``"512MiB"`` -> 512 * 2**20); a bare number is taken as is. The result is compared with each
    shard's bytes (elements x itemsize), as mergekit's writer does (its help says "parameters", but
    it sums ``numel * element_size``), so a size gives the shards mergekit gives.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): its ``--out-shard-size``.
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5B (5 billion bytes, mergekit's unit), "
                                         "500M, 2GiB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "").lower()
    mult = {"": 1, "b": 1e9, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    if unit not in mult:
        raise argparse.ArgumentTypeError(f"invalid size unit in {text!r}; use K, M, B (thousand, million, billion), "
                                         "KB/MB/GB or KiB/MiB/GiB")
    n = int(num * mult[unit])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return n


def parse_device(text: str):
    """``--device``: ``cpu``, ``gpu``/``cuda``/``cuda:N``, ``tpu``, or ``auto`` (None: JAX's default platform).

    References: none (infrastructure).
    """
    t = text.strip().lower()
    if t in ("cpu", "gpu", "tpu"):
        return t
    if t == "cuda" or t.startswith("cuda:"):
        return "gpu"
    if t == "auto":
        return None
    raise argparse.ArgumentTypeError(f"invalid device {text!r}; jmerge runs on JAX platforms: cpu, gpu (cuda), tpu "
                                     "or auto")


_NOOP = "mergekit flag, accepted and ignored: "


def add_mergekit_options(p: argparse.ArgumentParser) -> None:
    """Add ``mergekit-yaml``'s options that ``jmerge merge`` does not already have, each an alias or a no-op.

    ``--out-shard-size``, ``--copy-tokenizer/--no-copy-tokenizer``, ``--device`` and ``--quiet`` are
    ``jmerge merge`` options already; ``--random-seed`` is an alias of ``--seed``.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): its ``mergekit-yaml``
    options.
    """
    b = argparse.BooleanOptionalAction
    g = p.add_argument_group("mergekit-yaml options", "accepted so that mergekit-yaml command lines run unchanged; "
                             "each says what it does in jmerge")
    g.add_argument("--allow-crimes", action=b, default=False,
                   help="merge models whose config.json name different architectures (otherwise an error before "
                        "any tensor is read)")
    g.add_argument("--write-model-card", action=b, default=True,
                   help="write README.md (model card) and mergekit_config.yml (the config as run) (default: yes)")
    g.add_argument("--cuda", action=b, default=False, help="alias of --device gpu")
    g.add_argument("--gpu-rich", action="store_true", help="alias of --device gpu")
    g.add_argument("--transformers-cache", metavar="DIR", default=None,
                   help="Hugging Face Hub cache for model ids (sets HF_HUB_CACHE for this run)")
    g.add_argument("--unsafe-truncate-embeddings", action=b, default=False,
                   help="not supported (refused): merge differing vocabularies with tokenizer_source / tokenizer:")
    g.add_argument("--safe-serialization", action=b, default=True,
                   help=_NOOP + "the output is always safetensors (--no-safe-serialization warns)")
    for flag, why in (("--lazy-unpickle", "pickled .bin weights are refused; safetensors are read lazily anyway"),
                      ("--low-cpu-memory", "memory is bounded by a few tensors (or blocks of rows, or chunks) in flight "
                                         "(see --window)"),
                      ("--read-to-gpu", "inputs go to the merge device (--device) tensor by tensor"),
                      ("--multi-gpu", "use --mesh N to shard tensors over N devices"),
                      ("--clone-tensors", "output tensors never alias each other"),
                      ("--trust-remote-code", "no model code is run; only config.json is read"),
                      ("--async-write", "writes always run in their own thread")):
        g.add_argument(flag, action=b, default=False, help=_NOOP + why)
    g.add_argument("--lora-merge-cache", metavar="DIR", default=None,
                   help=_NOOP + "LoRA adapters (model+lora) are applied as tensors are read; nothing is cached")
    g.add_argument("--lora-merge-dtype", metavar="DTYPE", default=None,
                   help=_NOOP + "LoRA deltas are applied in float32, then cast to the model's dtype")
    g.add_argument("--num-threads", "-j", type=int, metavar="N", default=None,
                   help=_NOOP + "XLA picks its own compute threads")
    g.add_argument("--write-threads", type=int, metavar="N", default=None, help=_NOOP + "one writer thread")
    g.add_argument("--verbose", "-v", action="count", default=0,
                   help=_NOOP + "(repeatable) the progress display and one-line errors are all jmerge prints")


def apply_mergekit_options(a: argparse.Namespace):
    """Apply the mergekit aliases to parsed arguments; returns an error message, or None.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    if getattr(a, "unsafe_truncate_embeddings", False):
        return ("--unsafe-truncate-embeddings is not supported; give `tokenizer_source: union` (or a `tokenizer:` "
                "block) in the config to merge models with different vocabularies")
    if (getattr(a, "cuda", False) or getattr(a, "gpu_rich", False)) and getattr(a, "device", None) is None:
        a.device = "gpu"
    if getattr(a, "transformers_cache", None):
        os.environ["HF_HUB_CACHE"] = os.path.abspath(os.path.expanduser(a.transformers_cache))
    if not getattr(a, "safe_serialization", True):
        print("jmerge: warning: --no-safe-serialization ignored; jmerge writes safetensors only", file=sys.stderr)
    return None


def select_device(device: str | None) -> str | None:
    """Point JAX at ``--device`` (``cpu``, ``gpu``, ``tpu``; None keeps JAX's default); an error message if
    that platform has no backend here, else None.

    References: JAX ``jax_platforms``.
    """
    if not device:
        return None
    import jax  # noqa: PLC0415
    jax.config.update("jax_platforms", device if device != "gpu" else "cuda")
    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 - any backend failure: say which platform is missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (e.g. pip install 'jax[cuda12]')" if device == "gpu" else ""
        return (f"--device {device}: JAX has no {device} backend here ({first}); install JAX for that "
                f"platform{hint}, or drop the flag to run on the default platform")
    return None


def enable_compile_cache(path: str | None = None) -> str:
    """Point JAX's persistent compilation cache at ``path`` (default ``$JMERGE_COMPILE_CACHE`` or
    ``~/.cache/jmerge/xla``) and cache every compiled merge step, however quick its compile.

    A merge compiles one executable per tensor shape and method (about a second each for TIES on
    CPU); with the cache, a second merge of the same architecture, or every run of a sweep, reuses them.

    References: none (infrastructure).
    """
    import jax  # noqa: PLC0415
    path = path or os.environ.get("JMERGE_COMPILE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jmerge", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
