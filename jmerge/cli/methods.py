"""``jmerge methods``: every registered method with its options, public hyperparameters and steps.

References: see each method's docstring.
"""

from __future__ import annotations

import inspect

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    sub.add_parser("methods", help="list merge methods with their hyperparameters and defaults").set_defaults(run=run)


def run(_a) -> int:
    import jmerge  # noqa: PLC0415
    from ..mergekit import MERGEKIT_METHODS  # noqa: PLC0415
    aliases: dict = {}
    for mk, spec in MERGEKIT_METHODS.items():
        if mk != spec.jm:
            aliases.setdefault(spec.jm, []).append(mk)
    for name, factory in sorted(jmerge.available_methods().items()):
        try:
            sig = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                            for p in inspect.signature(factory).parameters.values())
        except (TypeError, ValueError):
            sig = "..."
        line = f"{name}({sig})"
        if name in aliases:
            line += f"  [mergekit: {', '.join(aliases[name])}]"
        print(line)
        doc = (inspect.getdoc(factory) or "").splitlines()
        if doc:
            print(f"    {doc[0]}")
        print(f"    steps: {' -> '.join(n for n, _ in factory().steps)}")
    print("passthrough  (slices / layer ranges; mergekit passthrough)")
    return 0
