"""Helpers shared by the ``jmerge`` commands: one-line errors, sizes, the compile cache.

References: none (infrastructure).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["fail", "parse_size", "enable_compile_cache"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def fail(msg: str, code: int) -> int:
    """Print ``jmerge: error: <first line of msg>`` on stderr and return ``code``."""
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else "error"
    print(f"jmerge: error: {first}", file=sys.stderr)
    return code


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"512MiB"`` -> 512 * 2**20, ``"1000"`` -> 1000.

    References: none (infrastructure).
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "").lower()
    mult = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    if unit not in mult:
        raise argparse.ArgumentTypeError(f"invalid size unit in {text!r}")
    return int(num * mult[unit])


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
