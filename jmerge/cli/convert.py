"""``jmerge convert SRC DST --to orbax|safetensors``: bit-exact conversion, aux files copied along.

References: the safetensors format (Hugging Face); Orbax (Google).
"""

from __future__ import annotations

from .common import fail

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint between safetensors and Orbax")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["orbax", "safetensors"], required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    c.set_defaults(run=run)


def run(a) -> int:
    from .. import io  # noqa: PLC0415
    from ..core import MergeInputError  # noqa: PLC0415
    try:
        io.convert(a.src, a.dst, to=a.to, overwrite=a.overwrite)
    except (MergeInputError, OSError) as e:
        return fail(str(e), 1)
    return 0
