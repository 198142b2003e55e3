#!/usr/bin/env python3
"""Benchmark ``jmerge merge`` against ``mergekit-yaml`` on a Llama-shaped bf16 checkpoint.

Generates (once, cached) a Llama-shaped base model and 3 fine-tuned variants (base + small random
deltas) as safetensors with a ``config.json`` (NumPy + ml_dtypes, no torch), then runs both tools as
subprocesses on the same task_arithmetic and TIES (density 0.2) configs, measuring wall time and the
peak RSS of each subprocess (``resource.getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper process per
run, so each number belongs to one run). Every measured run is preceded by one untimed warm-up read
of the inputs (page cache warm for both tools) and writes into a fresh output directory, and the two outputs
are compared tensor by tensor.

    python scripts/bench_vs_mergekit.py                 # full: hidden 2048, 8 layers (~0.54B params)
    python scripts/bench_vs_mergekit.py --size small    # hidden 1024, 4 layers
    python scripts/bench_vs_mergekit.py --size deep     # hidden 1024, 16 layers: same tensors, 2.6x the bytes
    python scripts/bench_vs_mergekit.py --methods task_arithmetic --skip-mergekit
    python scripts/bench_vs_mergekit.py --size small --delta 0.25 --methods ties   # larger updates
    python scripts/bench_vs_mergekit.py --methods della   # DELLA (density 0.5, epsilon 0.1): outputs differ
                                                          # by the random draws (each tool its own RNG)
    python scripts/bench_vs_mergekit.py --methods dare_ties   # DARE-TIES (density 0.5, rescale: false: jmerge
                                                              # in blocks of rows); outputs differ by the draws

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track); Yadav et al.,
"TIES-Merging" (NeurIPS 2023); Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {
    "full": dict(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=32, kv_heads=4),
    "small": dict(hidden=1024, intermediate=2816, layers=4, vocab=32000, heads=16, kv_heads=4),
    # small's tensor shapes with 4x the layers: peak memory should match small's (out-of-core)
    "deep": dict(hidden=1024, intermediate=2816, layers=16, vocab=32000, heads=16, kv_heads=4),
    "tiny": dict(hidden=64, intermediate=160, layers=2, vocab=128, heads=4, kv_heads=2),
}


def llama_layout(hidden, intermediate, layers, vocab, heads, kv_heads):
    """``[(name, shape)]`` of a Llama checkpoint (untied embeddings)."""
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)), (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def llama_config(hidden, intermediate, layers, vocab, heads, kv_heads):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def make_models(root: str, size: str, n_ft: int = 3, seed: int = 0, delta: float = 0.01) -> list[str]:
    """Write base + ``n_ft`` fine-tuned variants under ``root``; returns their dirs (cached)."""
    import ml_dtypes

    from jmerge.io.safetensors import CheckpointWriter

    dims = SIZES[size]
    layout = llama_layout(**dims)
    dirs = [os.path.join(root, n) for n in ["base"] + [f"ft{i}" for i in range(1, n_ft + 1)]]
    stamp = os.path.join(root, "DONE")
    if os.path.exists(stamp):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    writers = [CheckpointWriter(d, [(n, s, bf16) for n, s in layout], max_shard_bytes=2 * 10**9) for d in dirs]
    rng = np.random.default_rng(seed)
    for name, shape in layout:
        if name.endswith("norm.weight"):
            base = (1.0 + 0.1 * rng.standard_normal(shape, np.float32))
        else:
            base = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        writers[0].write(name, base.astype(bf16))
        for w in writers[1:]:
            d = rng.standard_normal(shape, np.float32) * np.float32(delta * 0.02)
            w.write(name, (base + d).astype(bf16))
    for w, d in zip(writers, dirs):
        w.write_text("config.json", json.dumps(llama_config(**dims), indent=2))
        w.commit()
    open(stamp, "w").close()
    return dirs


CONFIGS = {
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
dtype: float32
out_dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {ft3}
    parameters: {{weight: 1.0, density: 0.2}}
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 1.0, density: 0.5}}
parameters:
  normalize: true
  rescale: false
dtype: float32
out_dtype: bfloat16
""",
    "della": """merge_method: della
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
  - model: {ft3}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
parameters:
  normalize: true
  lambda: 1.0
dtype: float32
out_dtype: bfloat16
""",
}

_WRAP = r"""
import json, resource, subprocess, sys, tempfile, time
err = tempfile.TemporaryFile()
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
err.seek(0)
tail = err.read().decode(errors="replace")[-1500:] if rc else ""
print(json.dumps({"rc": rc, "wall": wall, "maxrss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
                  "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "err": tail}))
"""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under a fresh wrapper process: wall time, and from ``getrusage`` of that one child its
    peak RSS, user and system CPU seconds and page faults (``minflt``: minor, e.g. a fresh page zeroed)."""
    load = os.getloadavg()[0]  # the machine is shared: each run's 1-minute load average as it starts
    out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load"] = load
    return r


def dir_bytes(d: str) -> int:
    """Bytes of the weight files in ``d`` (0 when it does not exist)."""
    if not os.path.isdir(d):
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def with_moved(r: dict, in_bytes: int, out_dir: str) -> dict:
    """Add ``moved_gb`` (bytes read + written, GB) and ``faults_per_gb`` (minor faults per GB moved) to ``r``."""
    r["moved_gb"] = (in_bytes + dir_bytes(out_dir)) / 1e9
    r["faults_per_gb"] = r.get("minflt", 0) / r["moved_gb"] if r["moved_gb"] else float("nan")
    return r


def rusage_table(rows) -> None:
    """One line per tool run: wall, user and system CPU seconds, minor faults, faults per GB moved, peak RSS."""
    print(f"\n{'method':<16}{'run':<14}{'wall s':>8}{'user s':>8}{'sys s':>8}{'minor faults':>14}"
          f"{'faults/GB':>11}{'RSS GB':>8}{'load':>7}")
    for m, r in rows:
        for key in ("jmerge", "jmerge_warm", "mergekit", "floor"):
            x = r.get(key)
            if x:
                print(f"{m:<16}{key:<14}{x['wall']:>8.2f}{x['user']:>8.2f}{x['sys']:>8.2f}{x.get('minflt', 0):>14,}"
                      f"{x.get('faults_per_gb', float('nan')):>11,.0f}{x['maxrss_kb'] / 1e6:>8.2f}"
                      f"{x.get('load', float('nan')):>7.1f}")


def warm(dirs):
    """Read every input file once so both tools start with a warm page cache."""
    for d in dirs:
        for f in os.listdir(d):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def compare(a_dir: str, b_dir: str) -> float:
    """Largest |a - b| relative to max(|a|, |b|) over all tensors (outputs of the two tools)."""
    from jmerge.io.safetensors import open_checkpoint
    worst = 0.0
    with open_checkpoint(a_dir) as a, open_checkpoint(b_dir) as b:
        assert set(a.keys()) == set(b.keys()), "different tensor sets"
        for k in a.keys():
            x = a.get(k).astype(np.float32)
            y = b.get(k).astype(np.float32)
            den = np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-6)
            worst = max(worst, float(np.max(np.abs(x - y) / den)))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=sorted(CONFIGS))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jmerge-bench"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--delta", type=float, default=0.01,
                    help="fine-tunes' updates relative to the base's scale (0.01: |tau| of a few bf16 steps, heavy "
                         "ties; 0.25: a few thousand distinct values per tensor)")
    ap.add_argument("--keep-outputs", action="store_true")
    a = ap.parse_args(argv)

    t = time.perf_counter()
    sub = a.size if a.delta == 0.01 else f"{a.size}-delta{a.delta:g}"
    dirs = make_models(os.path.join(a.cache, sub), a.size, delta=a.delta)
    print(f"models ({a.size}) ready in {time.perf_counter() - t:.1f} s under {os.path.dirname(dirs[0])}")
    in_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    print(f"input bytes: {in_bytes / 1e9:.2f} GB; load average: {os.getloadavg()}")
    rows = []
    work = tempfile.mkdtemp(prefix="jmerge-bench-out-", dir=a.cache)
    try:
        for m in a.methods:
            cfg = os.path.join(work, f"{m}.yml")
            with open(cfg, "w") as f:
                f.write(CONFIGS[m].format(base=dirs[0], ft1=dirs[1], ft2=dirs[2], ft3=dirs[3]))
            res = {}
            jm_out = os.path.join(work, f"jm-{m}")
            warm(dirs)
            jcmd = [sys.executable, "-m", "jmerge.cli", "merge", cfg, jm_out, "--quiet", "--overwrite",
                    "--compile-cache", os.path.join(work, "xla-cache")]
            res["jmerge"] = with_moved(timed(jcmd), in_bytes, jm_out)  # cold: an empty compilation cache
            warm(dirs)
            # a fresh output directory, as mergekit's run gets: --overwrite would otherwise delete the cold run's
            # output (~1 GB, about 0.6 s here) inside the timed run
            shutil.rmtree(jm_out, ignore_errors=True)
            res["jmerge_warm"] = with_moved(timed(jcmd), in_bytes, jm_out)  # warm: compiled steps from the cache
            if not a.skip_mergekit:
                mk_out = os.path.join(work, f"mk-{m}")
                warm(dirs)
                # the venv's own script first: the venv need not be activated
                here = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
                mk = here if os.path.exists(here) else (shutil.which("mergekit-yaml") or "mergekit-yaml")
                res["mergekit"] = with_moved(timed([mk, cfg, mk_out, "--allow-crimes", "--lazy-unpickle"]),
                                             in_bytes, mk_out)
                if res["mergekit"]["rc"] == 0 and res["jmerge"]["rc"] == 0:
                    res["max_rel_diff"] = compare(jm_out, mk_out)
            rows.append((m, res))
            print(m, json.dumps(res))
    finally:
        if not a.keep_outputs:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nsize={a.size}  (wall s / peak RSS GB; page cache warm: inputs read once before each run; "
          f"load average now {os.getloadavg()[0]:.2f})")
    print("jmerge cold: empty XLA compilation cache (first merge of this architecture); warm: its second run")
    print(f"{'method':<16}{'jm cold s':>10}{'jm warm s':>10}{'jm RSS':>9}{'mergekit s':>12}{'mk RSS':>9}"
          f"{'speedup cold':>13}{'warm':>7}{'RSS ratio':>11}{'max rel diff':>14}")
    for m, r in rows:
        j = r["jmerge"]
        w = r["jmerge_warm"]
        k = r.get("mergekit")
        rss = max(j["maxrss_kb"], w["maxrss_kb"])
        line = f"{m:<16}{j['wall']:>10.1f}{w['wall']:>10.1f}{rss / 1e6:>9.2f}"
        if k:
            line += (f"{k['wall']:>12.1f}{k['maxrss_kb'] / 1e6:>9.2f}{k['wall'] / j['wall']:>12.1f}x"
                     f"{k['wall'] / w['wall']:>6.1f}x{rss / k['maxrss_kb']:>11.2f}"
                     f"{r.get('max_rel_diff', float('nan')):>14.2e}")
        if j["rc"] != 0 or (k and k["rc"] != 0):
            line += f"  (rc jmerge={j['rc']} mergekit={k['rc'] if k else '-'})"
        print(line)
    rusage_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
