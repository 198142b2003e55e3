"""``jmerge merge CONFIG OUT``: merge checkpoints as a mergekit-style YAML config describes.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import argparse
import os

from .common import (add_mergekit_options, apply_mergekit_options, enable_compile_cache, fail, parse_device,
                     parse_size, select_device)

__all__ = ["add_parser", "run", "yaml_main"]


def add_parser(sub) -> None:
    m = sub.add_parser("merge", help="merge checkpoints as described by a YAML config")
    m.add_argument("config", help="mergekit-style YAML config")
    m.add_argument("out", help="output directory (written atomically)")
    m.add_argument("--seed", "--random-seed", type=int, default=None,
                   help="seed of random methods (overrides the config's); --random-seed is mergekit's name")
    m.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"), metavar="SIZE",
                   help="max bytes per output shard, in mergekit's units: K/M/B = thousand/million/billion "
                        "(default 5B = 5e9 bytes; mergekit compares the same numel x itemsize sums), or "
                        "500MB, 2GiB, a plain byte count")
    m.add_argument("--dry-run", action="store_true", help="print the plan (methods per tensor group, bytes, "
                   "peak memory estimate) and exit")
    m.add_argument("--device", type=parse_device, default=None,
                   help="JAX platform to merge on: cpu, gpu (also cuda, cuda:N), tpu or auto (the default)")
    m.add_argument("--mesh", default=None, help="shard tensors over N devices: 'N' or 'axis=N'")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--quiet", "-q", action=argparse.BooleanOptionalAction, default=False, help="no progress display")
    m.add_argument("--orbax", action="store_true", help="also write an Orbax checkpoint to OUT-orbax")
    m.add_argument("--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy tokenizer files into the output (default: yes)")
    m.add_argument("--window", type=int, default=4,
                   help="tensors in flight (read-ahead window; default 4); large tensors go through in blocks of "
                        "rows or chunks, at most 3 at a time")
    m.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (default: $JMERGE_COMPILE_CACHE or ~/.cache/jmerge/xla); "
                        "later merges with the same tensor shapes and method skip compilation")
    m.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, store nothing")
    m.add_argument("--compute-float32", action="store_true",
                   help="compute in float32 whatever the config's dtype (default: dtype is the compute dtype, as in "
                        "mergekit, so bf16/fp16 configs give mergekit's numbers); the output dtype is unchanged")
    add_mergekit_options(m)
    m.set_defaults(run=run)


def run(a) -> int:
    err = apply_mergekit_options(a)
    if err:
        return fail(err, 2)
    err = select_device(a.device)
    if err:
        return fail(err, 2)
    if not a.no_compile_cache and not a.dry_run:
        enable_compile_cache(a.compile_cache)
    from ..core import MergeInputError  # noqa: PLC0415
    from ..mergekit import ConfigError, load_config  # noqa: PLC0415
    try:
        plan = load_config(a.config)
    except ConfigError as e:
        return fail(str(e), 2)
    from .. import pipeline  # noqa: PLC0415
    if a.dry_run:
        try:
            print(pipeline.plan_summary(plan, window=a.window, allow_crimes=a.allow_crimes))
        except MergeInputError as e:
            return fail(str(e), 1)
        return 0
    if os.path.exists(a.out) and not a.overwrite:
        return fail(f"{a.out} already exists; pass --overwrite to replace it", 1)
    try:
        info = pipeline.run_merge(plan, a.out, overwrite=a.overwrite, max_shard_bytes=a.out_shard_size, quiet=a.quiet,
                                  copy_tokenizer=a.copy_tokenizer, window=a.window, mesh=a.mesh, seed=a.seed,
                                  allow_crimes=a.allow_crimes, write_model_card=a.write_model_card,
                                  compute_float32=a.compute_float32)
    except (MergeInputError, OSError) as e:
        return fail(str(e), 1)
    if a.orbax:
        from .. import io  # noqa: PLC0415
        io.convert(a.out, a.out.rstrip("/") + "-orbax", to="orbax")
    if not a.quiet:
        print(f"merged {info['tensors']} tensors into {info['out_dir']} in {info['seconds']:.1f} s")
    return 0


def yaml_main(argv=None) -> int:
    """``jmerge-yaml CONFIG OUT [flags]``: ``mergekit-yaml``'s command line, run as ``jmerge merge``.

    Every ``mergekit-yaml`` flag is accepted (see ``jmerge merge --help``, "mergekit-yaml options").

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): its ``mergekit-yaml``.
    """
    import sys  # noqa: PLC0415

    from . import main  # noqa: PLC0415 - the package entry point (parsers of every command)
    return main(["merge", *(sys.argv[1:] if argv is None else list(argv))])
