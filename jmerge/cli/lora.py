"""``jmerge lora``: extract a LoRA adapter from a fine-tune, or merge several adapters into one.

    jmerge lora extract BASE FINETUNED OUT --rank R [--embed-lora] [--dtype float32] [--overwrite]
    jmerge lora merge BASE OUT --adapters A1 A2 ... --method ties --rank R [--density 0.5] [--weight 1 1]

Both write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, ``lora_alpha = r``)
atomically. ``extract`` follows mergekit-extract-lora (``--max-rank`` is accepted for ``--rank``):
embeddings, the head and norms are saved whole (``modules_to_save``) unless ``--embed-lora``.

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): ``mergekit-extract-lora``;
Hu et al., "LoRA" (ICLR 2022).
"""

from __future__ import annotations

import argparse
import os

from .common import enable_compile_cache, fail

__all__ = ["add_parser", "run"]


def _rank(text: str):
    if text == "full":
        return "full"
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be a positive integer or 'full', got {text!r}") from None
    if r < 1:
        raise argparse.ArgumentTypeError(f"rank must be a positive integer or 'full', got {text!r}")
    return r


def _setting(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def add_parser(sub) -> None:
    """Register ``jmerge lora extract`` and ``jmerge lora merge``.

    References: mergekit-extract-lora's options (Goddard et al., EMNLP 2024 industry track).
    """
    p = sub.add_parser("lora", help="extract a LoRA adapter from a fine-tune, or merge LoRA adapters")
    lsub = p.add_subparsers(dest="lora_cmd", metavar="{extract,merge}")
    p.set_defaults(run=run, lora_cmd=None)

    e = lsub.add_parser("extract", help="FINETUNED - BASE as a rank-R PEFT LoRA adapter (truncated SVD)")
    e.add_argument("base", help="base model (path, Hub id, model+lora)")
    e.add_argument("finetuned", help="fine-tuned model (path, Hub id, model+lora)")
    e.add_argument("out", help="output adapter directory (written atomically)")
    e.add_argument("--rank", "--max-rank", dest="rank", type=_rank, required=True,
                   help="LoRA rank of every linear weight, or 'full' (min(out, in) per matrix)")
    e.add_argument("--clamp-rank", action="store_true",
                   help="use min(R, min(out, in)) for smaller matrices instead of refusing (mergekit's behaviour)")
    e.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factorise embeddings and the head too (default: save them whole in modules_to_save)")
    e.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out norms and other non-linear tensors instead of saving them whole")
    e.add_argument("--include-regex", "-i", dest="include", action="append", default=[], metavar="RE",
                   help="only modules matching RE (repeatable)")
    e.add_argument("--exclude-regex", "-e", dest="exclude", action="append", default=[], metavar="RE",
                   help="leave out modules matching RE (repeatable)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the stored factors (default: the fine-tune's, as mergekit)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    m = lsub.add_parser("merge", help="merge LoRA adapters with a jmerge method, re-factorised to rank R")
    m.add_argument("base", help="the base model the adapters were trained on")
    m.add_argument("out", help="output adapter directory (written atomically)")
    m.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter directories")
    m.add_argument("--method", default="task_arithmetic", help="a jmerge method (see `jmerge methods`)")
    m.add_argument("--rank", type=_rank, required=True, help="output LoRA rank, or 'full'")
    m.add_argument("--clamp-rank", action="store_true", help="use min(R, min(out, in)) for smaller matrices")
    m.add_argument("--density", type=float, default=None, help="the method's density (TIES, DARE ...)")
    m.add_argument("--weight", type=float, nargs="+", default=None, help="one weight per adapter")
    m.add_argument("--scale", "--lambda", dest="scale", type=float, default=None, help="the method's scale (lambda)")
    m.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="any other hyperparameter of the method (repeatable)")
    m.add_argument("--seed", type=int, default=0, help="seed of random methods (default 0)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the stored factors (default float32)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--compile-cache", default=None, metavar="DIR", help="persistent XLA compilation cache directory")
    m.add_argument("--no-compile-cache", action="store_true", help="compile afresh, store nothing")


def run(a) -> int:
    """Run ``jmerge lora extract|merge``; returns the exit code (errors: one line, code 1; usage: 2).

    References: none (infrastructure).
    """
    if a.lora_cmd is None:
        return fail("give a subcommand: jmerge lora extract ... | jmerge lora merge ...", 2)
    if os.path.exists(a.out) and not a.overwrite:
        return fail(f"{a.out} already exists; pass --overwrite to replace it", 1)
    from ..core import MergeInputError  # noqa: PLC0415
    from ..io import CheckpointError  # noqa: PLC0415
    from ..lora import extract_lora, merge_loras  # noqa: PLC0415
    try:
        if a.lora_cmd == "extract":
            res = extract_lora(a.base, a.finetuned, a.out, rank=a.rank, embed_lora=a.embed_lora,
                               skip_undecomposable=a.skip_undecomposable, clamp_rank=a.clamp_rank,
                               include=a.include, exclude=a.exclude, dtype=a.dtype, overwrite=a.overwrite)
            print(f"wrote a LoRA adapter of {sum(e.kind != 'full' for e in res.entries)} modules "
                  f"({sum(e.kind == 'full' for e in res.entries)} tensors saved whole) to {res.out_dir}; "
                  f"relative Frobenius error of the factorised updates {res.relative_error:.3g}")
            return 0
        if not a.no_compile_cache:
            enable_compile_cache(a.compile_cache)
        from ..core.hparams import PerModel  # noqa: PLC0415
        hp: dict = dict(a.settings)
        if a.density is not None:
            hp["density"] = a.density
        if a.scale is not None:
            hp["scale"] = a.scale
        if a.weight is not None:
            if len(a.weight) != len(a.adapters):
                return fail(f"--weight has {len(a.weight)} values for {len(a.adapters)} adapters; give one per adapter", 2)
            hp["weight"] = PerModel(list(a.weight))
        res = merge_loras(a.base, a.adapters, a.out, a.method, rank=a.rank, hparams=hp or None, seed=a.seed,
                          dtype=a.dtype, clamp_rank=a.clamp_rank, overwrite=a.overwrite)
        print(f"merged {len(a.adapters)} adapters with {a.method} into {res.out_dir} "
              f"({sum(e.kind != 'full' for e in res.entries)} LoRA modules)")
        return 0
    except (MergeInputError, CheckpointError, OSError, ValueError) as e:
        return fail(str(e), 1)
