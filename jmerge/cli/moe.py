"""``jmerge moe CONFIG OUT``: a mixture-of-experts checkpoint from a mergekit-moe YAML config.

    jmerge moe moe.yml ./moe [--overwrite] [--gate-dtype bfloat16|float32] [--seed 0] [--out-shard-size 5GB]

mergekit-moe's own flags are accepted (``--i-understand-this-is-not-useful-without-training``; the
4/8-bit loading flags are refused: gates come from a bf16/f32 JAX forward), and so are mergekit-yaml's
merge flags (see ``jmerge merge --help``).

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): ``mergekit-moe``.
"""

from __future__ import annotations

import argparse
import os

from .common import (add_mergekit_options, apply_mergekit_options, enable_compile_cache, fail, parse_device,
                     parse_size, select_device)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("moe", help="build a mixture of experts from dense models (mergekit-moe YAML)")
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--gate-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="precision of the hidden-state gates: bfloat16 as mergekit-moe computes them (default), "
                        "or float32")
    p.add_argument("--seed", "--random-seed", type=int, default=0,
                   help="seed of random/uniform_random gates and of noise_scale (default 0)")
    p.add_argument("--out-shard-size", type=parse_size, default=5 * 10**9, metavar="SIZE",
                   help="output shard size in bytes, K/M/B suffixes as mergekit (default 5B)")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer files into the output (default: yes)")
    p.add_argument("--quiet", "-q", action=argparse.BooleanOptionalAction, default=False, help="no progress display")
    p.add_argument("--device", type=parse_device, default=None,
                   help="JAX platform of the gate forward pass: cpu, gpu (also cuda), tpu or auto (the default)")
    p.add_argument("--compile-cache", default=None, metavar="DIR", help="persistent XLA compilation cache directory")
    p.add_argument("--no-compile-cache", action="store_true", help="compile afresh, store nothing")
    g = p.add_argument_group("mergekit-moe options")
    g.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="accept experts that are all the same model")
    g.add_argument("--load-in-4bit", action="store_true", help="not supported (refused): gates use a bf16/f32 forward")
    g.add_argument("--load-in-8bit", action="store_true", help="not supported (refused): gates use a bf16/f32 forward")
    add_mergekit_options(p)
    p.set_defaults(run=run)


def run(a) -> int:
    err = apply_mergekit_options(a)
    if err:
        return fail(err, 2)
    if a.load_in_4bit or a.load_in_8bit:
        return fail("--load-in-4bit/--load-in-8bit are not supported: jmerge computes the gates with a bfloat16 "
                    "(default) or float32 JAX forward pass; drop the flag", 2)
    if os.path.exists(a.out) and not a.overwrite:
        return fail(f"{a.out} already exists; pass --overwrite to replace it", 1)
    err = select_device(a.device)
    if err:
        return fail(err, 2)
    if not a.no_compile_cache:
        enable_compile_cache(a.compile_cache)
    from ..core import MergeInputError  # noqa: PLC0415
    from ..mergekit import ConfigError  # noqa: PLC0415
    from ..moe import build_moe, load_moe_config  # noqa: PLC0415
    try:
        cfg = load_moe_config(a.config, allow_all_same=a.allow_all_same)
    except ConfigError as e:
        return fail(str(e), 2)
    try:
        info = build_moe(cfg, a.out, overwrite=a.overwrite, gate_dtype=a.gate_dtype, seed=a.seed,
                         max_shard_bytes=a.out_shard_size, quiet=a.quiet, copy_tokenizer=a.copy_tokenizer,
                         write_model_card=a.write_model_card)
    except (MergeInputError, OSError) as e:
        return fail(str(e), 1)
    if not a.quiet:
        print(f"wrote a {info['architecture']} checkpoint of {info['tensors']} tensors to {info['out_dir']} in "
              f"{info['seconds']:.1f} s (gates {info['gate_seconds']:.1f} s)")
    return 0
