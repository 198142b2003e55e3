#!/usr/bin/env python3
"""Benchmark ``jmerge moe`` against ``mergekit-moe`` on one Mixtral build from Llama-shaped bf16 checkpoints.

Reuses the cached base model and fine-tunes of ``scripts/bench_vs_mergekit.py`` (``--size full``: hidden
2048, 8 layers, ~0.54B parameters each) and adds, next to the base, a directory ``moe_base`` with the
base's files (hard links, so both tools read the same bytes) plus a deterministic 32000-token WordLevel
tokenizer written with ``tokenizers`` (``<unk>``/``<s>``/``</s>`` = 0/1/2, a ``<s>`` template like Llama's,
``tokenizer_config.json``): ``gate_mode: hidden`` runs the base model over the prompts, which needs one.
Both tools then build the same mergekit-moe config (base + 3 experts ``ft1..ft3``, short positive prompts
per expert, one negative prompt) as subprocesses; each run is measured in a fresh wrapper process
(wall time, peak RSS via ``getrusage(RUSAGE_CHILDREN)``) after one untimed read of the inputs (warm page
cache). jmerge runs twice: with an empty XLA compilation cache (cold) and again with it filled (warm).
The outputs are compared: tensor names and shapes equal, every tensor but the routers bit-identical,
and the routers' (``mlp.gate.weight``) largest difference (mergekit computes them with a bfloat16
forward pass, so ~1e-2 relative is expected).

    python scripts/bench_moe.py                  # full: 0.54B base, 3 experts -> Mixtral 3x
    python scripts/bench_moe.py --size tiny      # seconds; the end-to-end check
    python scripts/bench_moe.py --skip-jmerge    # mergekit-moe only (and --skip-mergekit)
    python scripts/bench_moe.py --jmerge-args "--gate-dtype float32"

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), mergekit-moe; Jiang et al.,
"Mixtral of Experts" (arXiv:2401.04088).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_mergekit as bvm  # noqa: E402  (the cached models, the timed wrapper, the warm-up read)

SIZES = bvm.SIZES

EXPERT_PROMPTS = [  # (positive prompts, negative prompts) per expert; every word is in the vocabulary
    (["write a python function that sorts a list",
      "fix the bug in this code",
      "how do i read a file in python ?",
      "explain what this loop does"], []),
    (["solve the equation for x",
      "what is the sum of two and three ?",
      "prove that the square root of two is irrational",
      "compute the derivative of x squared"],
     ["write a poem about numbers"]),
    (["tell me a story about a dragon",
      "write a poem about the sea",
      "describe a quiet morning in the forest"], []),
]

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the config's bos_token_id 1 and eos_token_id 2


def prompt_words() -> list[str]:
    """Every word of the prompts, sorted (the head of the vocabulary)."""
    words = set()
    for pos, neg in EXPERT_PROMPTS:
        for p in pos + neg:
            words.update(p.split())
    return sorted(words)


def make_tokenizer(out_dir: str, vocab_size: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``: a WordLevel tokenizer of ``vocab_size`` tokens.

    The specials, then the prompts' words, then fillers ``w00042``; whitespace/punctuation pre-tokenizer;
    a post-processor that prepends ``<s>`` (as Llama's does). Deterministic, byte-identical every time.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = SPECIALS + prompt_words()
    if len(words) > vocab_size:
        raise SystemExit(f"vocabulary of {vocab_size} is too small for {len(words)} prompt words")
    words += [f"w{i:05d}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tmp = os.path.join(out_dir, "tokenizer.json.tmp")
    tok.save(tmp)
    os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
           "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def make_moe_inputs(root: str, size: str) -> list[str]:
    """``[moe_base, ft1, ft2, ft3]``: bench_vs_mergekit's cached models plus a base with a tokenizer.

    ``moe_base`` holds hard links to the base's files (a copy where links fail) and the tokenizer.
    """
    dirs = bvm.make_models(root, size)
    base = os.path.join(root, "moe_base")
    os.makedirs(base, exist_ok=True)
    for f in sorted(os.listdir(dirs[0])):
        src, dst = os.path.join(dirs[0], f), os.path.join(base, f)
        if os.path.exists(dst) and os.path.samefile(src, dst):
            continue
        if os.path.exists(dst):
            os.remove(dst)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    make_tokenizer(base, SIZES[size]["vocab"])
    return [base] + dirs[1:]


def moe_config(dirs: list[str]) -> str:
    """The mergekit-moe YAML: base ``dirs[0]``, experts ``dirs[1:]``, ``gate_mode: hidden``."""
    lines = [f"base_model: {dirs[0]}", "gate_mode: hidden", "dtype: bfloat16", "experts_per_token: 2",
             "experts:"]
    for d, (pos, neg) in zip(dirs[1:], EXPERT_PROMPTS):
        lines.append(f"  - source_model: {d}")
        lines.append("    positive_prompts:")
        lines += [f"      - {json.dumps(p)}" for p in pos]
        if neg:
            lines.append("    negative_prompts:")
            lines += [f"      - {json.dumps(p)}" for p in neg]
    return "\n".join(lines) + "\n"


def find_mergekit_moe() -> str:
    """The ``mergekit-moe`` next to this interpreter (the venv need not be activated), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mergekit-moe")
    return here if os.path.exists(here) else (shutil.which("mergekit-moe") or "mergekit-moe")


def compare(jm_dir: str, mk_dir: str) -> dict:
    """Compare two MoE outputs: names/shapes, bit equality of non-router tensors, router differences.

    Returns ``names_equal``, ``shapes_equal``, ``mismatched`` (non-router tensors that differ),
    ``router_max_rel`` (worst layer's max |a - b| / max |b|), ``router_row_rel`` (worst gate row's
    ||a - b|| / ||b||, tests/test_moe.py's measure) and ``router_cos_min`` (smallest cosine between
    corresponding gate rows).
    """
    from jmerge.io.safetensors import open_checkpoint
    out = {"mismatched": [], "router_max_rel": 0.0, "router_row_rel": 0.0, "router_cos_min": 1.0}
    with open_checkpoint(jm_dir) as a, open_checkpoint(mk_dir) as b:
        ka, kb = set(a.keys()), set(b.keys())
        out["names_equal"] = ka == kb
        out["only_jmerge"] = sorted(ka - kb)[:5]
        out["only_mergekit"] = sorted(kb - ka)[:5]
        common = sorted(ka & kb)
        out["shapes_equal"] = all(tuple(a.shape(k)) == tuple(b.shape(k)) for k in common)
        out["dtypes_equal"] = all(a.dtype(k) == b.dtype(k) for k in common)
        for k in common:
            x, y = a.get(k), b.get(k)
            if k.endswith("mlp.gate.weight"):
                x32, y32 = x.astype(np.float32), y.astype(np.float32)
                d = x32 - y32
                out["router_max_rel"] = max(out["router_max_rel"], float(np.abs(d).max() / np.abs(y32).max()))
                row = np.linalg.norm(d, axis=-1) / np.linalg.norm(y32, axis=-1)
                out["router_row_rel"] = max(out["router_row_rel"], float(row.max()))
                cos = (x32 * y32).sum(-1) / (np.linalg.norm(x32, axis=-1) * np.linalg.norm(y32, axis=-1))
                out["router_cos_min"] = min(out["router_cos_min"], float(cos.min()))
            elif x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
                out["mismatched"].append(k)
        out["n_tensors"] = len(common)
    files_a = {f for f in os.listdir(jm_dir) if not f.endswith(".safetensors")}
    files_b = {f for f in os.listdir(mk_dir) if not f.endswith(".safetensors")}
    out["aux_only_jmerge"] = sorted(files_a - files_b)
    out["aux_only_mergekit"] = sorted(files_b - files_a)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jmerge-bench"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-jmerge", action="store_true")
    ap.add_argument("--no-warm-run", action="store_true", help="run jmerge once (cold compilation cache) only")
    ap.add_argument("--jmerge-args", default="", metavar="ARGS",
                    help="extra flags for jmerge moe, one string (e.g. '--gate-dtype float32')")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (printed path)")
    a = ap.parse_args(argv)

    t = time.perf_counter()
    dirs = make_moe_inputs(os.path.join(a.cache, a.size), a.size)
    print(f"models ({a.size}) ready in {time.perf_counter() - t:.1f} s under {os.path.dirname(dirs[0])}")
    in_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    print(f"input bytes: {in_bytes / 1e9:.2f} GB; load average: {os.getloadavg()}")
    work = tempfile.mkdtemp(prefix="jmerge-bench-moe-", dir=a.cache)
    cfg = os.path.join(work, "moe.yml")
    with open(cfg, "w") as f:
        f.write(moe_config(dirs))
    res: dict = {}
    try:
        jm_out, mk_out = os.path.join(work, "jm-moe"), os.path.join(work, "mk-moe")
        if not a.skip_jmerge:
            # an empty compilation cache of its own: the first run compiles everything, the second reuses it
            os.environ["JMERGE_COMPILE_CACHE"] = os.path.join(work, "xla-cache")
            jcmd = [sys.executable, "-m", "jmerge", "moe", cfg, jm_out, "--overwrite", "--quiet",
                    *shlex.split(a.jmerge_args)]
            bvm.warm(dirs)
            res["jmerge"] = bvm.timed(jcmd)
            print("jmerge", json.dumps(res["jmerge"]))
            if not a.no_warm_run and res["jmerge"]["rc"] == 0:
                bvm.warm(dirs)
                res["jmerge_warm"] = bvm.timed(jcmd)
                print("jmerge warm", json.dumps(res["jmerge_warm"]))
        if not a.skip_mergekit:
            bvm.warm(dirs)
            res["mergekit"] = bvm.timed([find_mergekit_moe(), cfg, mk_out, "--device", "cpu"])
            print("mergekit", json.dumps(res["mergekit"]))
        ok = {k: r["rc"] == 0 for k, r in res.items()}
        if ok.get("jmerge") and ok.get("mergekit"):
            res["compare"] = compare(jm_out, mk_out)
            print("compare", json.dumps(res["compare"]))
    finally:
        if a.keep:
            print(f"outputs kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    d = SIZES[a.size]
    print(f"\nsize={a.size} (hidden {d['hidden']}, {d['layers']} layers, vocab {d['vocab']}; 3 experts, "
          f"gate_mode hidden); wall s / peak RSS GB; page cache warm; load average now {os.getloadavg()[0]:.2f}")
    k = res.get("mergekit")
    print(f"{'tool':<22}{'wall s':>9}{'peak RSS GB':>13}{'wall / mk':>11}{'RSS / mk':>10}")
    labels = {"jmerge": "jmerge (cold cache)", "jmerge_warm": "jmerge (warm cache)", "mergekit": "mergekit-moe"}
    for key, label in labels.items():
        r = res.get(key)
        if r is None:
            continue
        line = f"{label:<22}{r['wall']:>9.1f}{r['maxrss_kb'] / 1e6:>13.2f}"
        if k and k["rc"] == 0 and key != "mergekit":
            line += f"{r['wall'] / k['wall']:>11.2f}{r['maxrss_kb'] / k['maxrss_kb']:>10.2f}"
        if r["rc"] != 0:
            line += f"  (rc {r['rc']}: {r['err'].strip().splitlines()[-1] if r['err'].strip() else ''})"
        print(line)
    c = res.get("compare")
    if c:
        same = c["names_equal"] and c["shapes_equal"] and c["dtypes_equal"]
        print(f"outputs: {c['n_tensors']} tensors, names/shapes/dtypes {'equal' if same else 'DIFFER'}"
              f"{'' if same else ' ' + json.dumps({x: c[x] for x in ('only_jmerge', 'only_mergekit')})}; "
              f"non-router tensors {'bit-identical' if not c['mismatched'] else 'DIFFER: ' + ', '.join(c['mismatched'][:5])}; "
              f"routers: max|diff|/max = {c['router_max_rel']:.2e}, row ||diff||/||row|| = {c['router_row_rel']:.2e}, "
              f"min cosine = {c['router_cos_min']:.6f}")
        if c["aux_only_jmerge"] or c["aux_only_mergekit"]:
            print(f"aux files only in jmerge: {c['aux_only_jmerge']}; only in mergekit: {c['aux_only_mergekit']}")
    failed = any(r["rc"] != 0 for key, r in res.items() if key in labels)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
