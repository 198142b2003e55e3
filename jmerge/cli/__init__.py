"""The ``jmerge`` command line: one module per command, each with ``add_parser(sub)`` and ``run(args)``.

    jmerge merge config.yml ./merged [--dry-run] [--seed 0] [--out-shard-size 5GB] [--overwrite]
    jmerge convert SRC DST --to orbax|safetensors [--overwrite]
    jmerge methods
    jmerge demo ...
    jmerge moe moe.yml ./moe [--gate-dtype float32] [--overwrite]   (mergekit-moe configs)
    jmerge experts stats CKPT --text FILE | jmerge experts prune CKPT OUT --keep K --text FILE
    jmerge eval CKPT --text FILE | --jsonl FILE [--batch-size 8] [--max-length 512] [--out results.jsonl]
    jmerge lora extract BASE FINETUNED OUT --rank R | jmerge lora merge BASE OUT --adapters A1 A2 --method ties --rank R
    jmerge sweep sweep.yml [--out DIR] [--batch N]   (a merge config plus a sweep: block)
    jmerge --version

Exit codes: 0 success; 2 invalid config or arguments (one line naming the YAML location, no
traceback); 1 other errors (unreadable checkpoints, shape mismatches ...), also one line.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the config format.
"""

from __future__ import annotations

import argparse
import sys

from . import convert, demo, experts, lora, merge, methods, moe, sweep
from . import eval  # noqa: A004 (the command module; no builtin eval used here)
from .common import enable_compile_cache, parse_size

__all__ = ["main", "parse_size", "enable_compile_cache", "COMMANDS"]

COMMANDS = (merge, moe, convert, methods, demo, experts, eval, lora, sweep)
"""The command modules, in the order ``--help`` lists them."""


def _parser() -> argparse.ArgumentParser:
    from ..version import __version__  # noqa: PLC0415
    p = argparse.ArgumentParser(prog="jmerge", description="JAX-native model merging (mergekit-compatible configs).")
    p.add_argument("--version", action="version", version=f"jmerge {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{merge,moe,convert,methods,demo,experts,eval,lora,sweep}")
    for c in COMMANDS:
        c.add_parser(sub)
    return p


def main(argv=None) -> int:
    """Entry point of the ``jmerge`` command; returns the exit code.

    References: none (infrastructure).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after `demo` belongs to the demo
        return demo.run(argparse.Namespace(demo_args=argv[1:]))
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    if a.cmd is None:
        p.print_help()
        return 2
    return a.run(a)


if __name__ == "__main__":
    sys.exit(main())
