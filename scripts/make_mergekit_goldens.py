"""Run mergekit 0.1.5 on the tiny fixtures and store its outputs as goldens (needs torch + mergekit).

    python3 scripts/make_mergekit_goldens.py            # all cases
    python3 scripts/make_mergekit_goldens.py ties slerp # some cases

For each case this writes ``tests/data/mergekit/<case>/config.yml`` (model paths relative to the repo
root, where tests run) and runs ``mergekit.merge.run_merge`` on CPU with ``random_seed=0``, keeping only
the output's ``model.safetensors`` (tensors only; config, tokenizer and README are deleted to save space;
passthrough also keeps ``config.json`` because its layer count differs from the base).

Notes:
  * Unless a case sets ``dtype``, mergekit computes in the input dtype (bf16) and writes bf16, as it
    does by default; ``ties_dtype`` computes in float32 and writes bf16 (``dtype: float32``,
    ``out_dtype: bfloat16``). Compare with bf16-level tolerances.
  * mergekit's breadcrumbs keeps nothing in a tensor where ``int(gamma * numel) == 0``; the smallest
    tensors here are the 64-element norms, so ``gamma: 0.05`` (int(3.2) = 3) is used.
  * dare_ties and della are stochastic (torch RNG, seeded through ``random_seed``); parity tests may
    only compare statistics for them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import yaml

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(REPO, "tests", "data", "mergekit")
T = "tests/data/tiny"
BASE, FT1, FT2, FT3 = f"{T}/base", f"{T}/ft1", f"{T}/ft2", f"{T}/ft3"


def _models(*pairs):
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in pairs]


CASES: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.5}), (FT3, {"weight": 0.25})),
    },
    "linear_nonorm": {
        "merge_method": "linear",
        "models": _models((FT1, {"weight": 0.5}), (FT2, {"weight": 0.3}), (FT3, {"weight": 0.4})),
        "parameters": {"normalize": False},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 0.7}), (FT2, {"weight": 0.5}), (FT3, {"weight": 0.3})),
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0, "density": 0.5}), (FT2, {"weight": 0.7, "density": 0.3}),
                          (FT3, {"weight": 0.5, "density": 0.7})),
    },
    "ties_nonorm": {
        "merge_method": "ties",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.7}), (FT3, {"weight": 0.5})),
        "parameters": {"density": 0.4, "normalize": False},
    },
    "ties_dtype": {
        "merge_method": "ties",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.7}), (FT3, {"weight": 0.5})),
        "parameters": {"density": 0.4},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.6}), (FT3, {"weight": 0.4})),
        "parameters": {"density": 0.8, "gamma": 0.05},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.6}), (FT3, {"weight": 0.4})),
        "parameters": {"density": 0.8, "gamma": 0.05},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": BASE,
        "models": _models((BASE, None), (FT1, None)),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0]},
                             {"value": 0.5}]},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 0.7}), (FT2, {"weight": 0.3})),
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.5}), (FT3, {"weight": 0.25})),
    },
    "karcher": {
        "merge_method": "karcher",
        "models": _models((FT1, None), (FT2, None), (FT3, None)),
        "parameters": {"max_iter": 10, "tol": 1e-5},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": _models((FT1, None), (FT2, None), (FT3, None)),
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": BASE,
        "models": _models((FT1, None)),
        "parameters": {"t": 0.0005},
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": BASE, "layer_range": [0, 2]}]},
            {"sources": [{"model": FT1, "layer_range": [1, 3]}]},
        ],
    },
    "sce": {
        "merge_method": "sce",
        "base_model": BASE,
        "models": _models((FT1, None), (FT2, None), (FT3, None)),
        "parameters": {"select_topk": 0.5},
    },
    "task_arithmetic_filters": {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": _models(
            (FT1, {"weight": [{"filter": "self_attn", "value": [0.2, 0.6, 1.0]},
                              {"filter": "mlp", "value": 0.8},
                              {"value": 0.5}]}),
            (FT2, {"weight": [1.0, 0.3]}),
            (FT3, {"weight": 0.4}),
        ),
        "parameters": {"lambda": 0.9},
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.7}), (FT3, {"weight": 0.5})),
        "parameters": {"density": 0.5},
    },
    "della": {
        "merge_method": "della",
        "base_model": BASE,
        "models": _models((FT1, {"weight": 1.0}), (FT2, {"weight": 0.7}), (FT3, {"weight": 0.5})),
        "parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 1.0},
    },
    # arcee_fusion / ram / ramplus_tl compute in float32 (their masks compare computed values with
    # thresholds); the base is listed among the models as in mergekit's examples/arcee_fusion.yml.
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": BASE,
        "models": _models((BASE, None), (FT1, None)),
        "dtype": "float32",
    },
    # epsilon near the median |tau| (~7e-4) so that unique, shared and unchanged entries all occur
    "ram": {
        "merge_method": "ram",
        "base_model": BASE,
        "models": _models((FT1, None), (FT2, None), (FT3, None)),
        "parameters": {"epsilon": 0.0007},
        "dtype": "float32",
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": BASE,
        "models": _models((FT1, None), (FT2, None), (FT3, None)),
        "parameters": {"r": 0.5, "alpha": 1.0, "epsilon": 0.0015},
        "dtype": "float32",
    },
}


def run_case(name: str, cfg: dict) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    case_dir = os.path.join(OUT, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    text = yaml.safe_dump(cfg, sort_keys=False)
    with open(os.path.join(case_dir, "config.yml"), "w") as f:
        f.write(text)
    conf = MergeConfiguration.model_validate(yaml.safe_load(text))
    opts = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, random_seed=0,
                        write_model_card=False, quiet=True, out_shard_size=2**40)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        run_merge(conf, out, opts)
        files = sorted(os.listdir(out))
        if "model.safetensors" not in files:
            raise RuntimeError(f"{name}: mergekit wrote {files}, expected one model.safetensors")
        shutil.copyfile(os.path.join(out, "model.safetensors"), os.path.join(case_dir, "model.safetensors"))
        if name == "passthrough":
            shutil.copyfile(os.path.join(out, "config.json"), os.path.join(case_dir, "config.json"))


def main(argv: list[str]) -> int:
    os.chdir(REPO)
    names = argv or list(CASES)
    for n in names:
        run_case(n, CASES[n])
        print(f"{n}: ok", flush=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"goldens in {OUT}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
