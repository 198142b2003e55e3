"""``jmerge demo [...]``: the built-in merging benchmark on real digits (needs ``jmerge[demo]``).

References: see :mod:`jmerge.demo`.
"""

from __future__ import annotations

import argparse

from .common import fail

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="run the built-in merging demo", add_help=False)
    d.add_argument("demo_args", nargs=argparse.REMAINDER)
    d.set_defaults(run=run)


def run(a) -> int:
    try:
        from .. import demo  # noqa: PLC0415
        run_demo = getattr(demo, "run_demo")
    except ImportError as e:
        return fail(f"the demo needs the extra dependencies ({e.name} is missing): pip install 'jmerge[demo]'", 1)
    except AttributeError:
        return fail("the demo is not available in this build (jmerge.demo.run_demo is missing)", 1)
    r = run_demo(a.demo_args)
    return int(r) if isinstance(r, int) else 0
