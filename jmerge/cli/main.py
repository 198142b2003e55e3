"""The ``jmerge`` command line: merge checkpoints from a mergekit-style YAML config, convert, list methods.

    jmerge merge config.yml ./merged [--dry-run] [--seed 0] [--out-shard-size 5GB] [--overwrite]
    jmerge convert SRC DST --to orbax|safetensors
    jmerge methods
    jmerge demo ...
    jmerge --version

Exit codes: 0 success; 2 invalid config or arguments (one line naming the YAML location, no
traceback); 1 other errors (unreadable checkpoints, shape mismatches ...), also one line.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the config format.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["main"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"512MiB"`` -> 512 * 2**20, ``"1000"`` -> 1000."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "").lower()
    mult = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    if unit not in mult:
        raise argparse.ArgumentTypeError(f"invalid size unit in {text!r}")
    return int(num * mult[unit])


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(prog="jmerge", description="JAX-native model merging (mergekit-compatible configs).")
    p.add_argument("--version", action="version", version=f"jmerge {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{merge,convert,methods,demo}")

    m = sub.add_parser("merge", help="merge checkpoints as described by a YAML config")
    m.add_argument("config", help="mergekit-style YAML config")
    m.add_argument("out", help="output directory (written atomically)")
    m.add_argument("--seed", type=int, default=None, help="seed of random methods (overrides the config's)")
    m.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"), help="max shard size (5GB)")
    m.add_argument("--dry-run", action="store_true", help="print the plan (methods per tensor group, bytes, "
                   "peak memory estimate) and exit")
    m.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None, help="JAX platform to merge on")
    m.add_argument("--mesh", default=None, help="shard tensors over N devices: 'N' or 'axis=N'")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    m.add_argument("--orbax", action="store_true", help="also write an Orbax checkpoint to OUT-orbax")
    m.add_argument("--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy tokenizer files into the output (default: yes)")
    m.add_argument("--window", type=int, default=4, help="tensors in flight (read-ahead window; default 4)")
    m.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (default: $JMERGE_COMPILE_CACHE or ~/.cache/jmerge/xla); "
                        "later merges with the same tensor shapes and method skip compilation")
    m.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, store nothing")

    c = sub.add_parser("convert", help="convert a checkpoint between safetensors and Orbax")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["orbax", "safetensors"], required=True)

    sub.add_parser("methods", help="list merge methods with their hyperparameters and defaults")
    d = sub.add_parser("demo", help="run the built-in merging demo", add_help=False)
    d.add_argument("demo_args", nargs=argparse.REMAINDER)
    return p


def _fail(msg: str, code: int) -> int:
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else "error"
    print(f"jmerge: error: {first}", file=sys.stderr)
    return code


def enable_compile_cache(path: str | None = None) -> str:
    """Point JAX's persistent compilation cache at ``path`` (default ``$JMERGE_COMPILE_CACHE`` or
    ``~/.cache/jmerge/xla``) and cache every compiled merge step, however quick its compile.

    A merge compiles one executable per tensor shape and method (about a second each for TIES on
    CPU); with the cache, a second merge of the same architecture, or every run of a sweep, reuses them.
    """
    import jax
    path = path or os.environ.get("JMERGE_COMPILE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jmerge", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _cmd_merge(a) -> int:
    if a.device:
        import jax
        jax.config.update("jax_platforms", a.device if a.device != "gpu" else "cuda")
    if not a.no_compile_cache and not a.dry_run:
        enable_compile_cache(a.compile_cache)
    from ..mergekit.config import ConfigError, load_config
    from ..core import MergeInputError
    try:
        plan = load_config(a.config)
    except ConfigError as e:
        return _fail(str(e), 2)
    from ..pipeline import executor as _pipeline
    if a.dry_run:
        try:
            print(_pipeline.plan_summary(plan, window=a.window))
        except MergeInputError as e:
            return _fail(str(e), 1)
        return 0
    if os.path.exists(a.out) and not a.overwrite:
        return _fail(f"{a.out} already exists; pass --overwrite to replace it", 1)
    try:
        info = _pipeline.run_merge(plan, a.out, overwrite=a.overwrite, max_shard_bytes=a.out_shard_size,
                                   quiet=a.quiet, copy_tokenizer=a.copy_tokenizer, window=a.window, mesh=a.mesh,
                                   seed=a.seed)
    except MergeInputError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"{e}", 1)
    if a.orbax:
        from .. import io as _checkpoint
        _checkpoint.convert(a.out, a.out.rstrip("/") + "-orbax", to="orbax")
    if not a.quiet:
        print(f"merged {info['tensors']} tensors into {info['out_dir']} in {info['seconds']:.1f} s")
    return 0


def _cmd_convert(a) -> int:
    from ..core import MergeInputError
    try:
        from .. import io as _checkpoint
        _checkpoint.convert(a.src, a.dst, to=a.to)
    except (MergeInputError, OSError) as e:
        return _fail(str(e), 1)
    return 0


def _cmd_methods(_a) -> int:
    import inspect

    import jmerge
    from ..mergekit.config import MERGEKIT_METHODS
    aliases = {}
    for mk, spec in MERGEKIT_METHODS.items():
        if mk != spec.jm:
            aliases.setdefault(spec.jm, []).append(mk)
    for name, factory in sorted(jmerge.available_methods().items()):
        try:
            sig = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                            for p in inspect.signature(factory).parameters.values())
        except (TypeError, ValueError):
            sig = "..."
        doc = (inspect.getdoc(factory) or "").splitlines()
        line = f"{name}({sig})"
        if name in aliases:
            line += f"  [mergekit: {', '.join(aliases[name])}]"
        print(line)
        if doc:
            print(f"    {doc[0]}")
    print("passthrough  (slices / layer ranges; mergekit passthrough)")
    return 0


def _cmd_demo(a) -> int:
    try:
        from .. import demo as _demo
        run_demo = getattr(_demo, "run_demo")
    except (ImportError, AttributeError):
        return _fail("the demo is not available in this build (jmerge._demo.run_demo is missing)", 1)
    r = run_demo(a.demo_args)
    return int(r) if isinstance(r, int) else 0


def main(argv=None) -> int:
    """Entry point of the ``jmerge`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after `demo` belongs to the demo
        return _cmd_demo(argparse.Namespace(demo_args=argv[1:]))
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    if a.cmd is None:
        p.print_help()
        return 2
    return {"merge": _cmd_merge, "convert": _cmd_convert, "methods": _cmd_methods, "demo": _cmd_demo}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
