"""mergekit's example configs, rewritten for the tiny per-architecture fixtures, with mergekit 0.1.5 goldens.

    python3 scripts/make_example_goldens.py                    # every (example, arch)
    python3 scripts/make_example_goldens.py ties linear        # some examples, every arch
    python3 scripts/make_example_goldens.py ties:llama         # one case
    python3 scripts/make_example_goldens.py --stock-check ties # also report tie-order sensitivity

Needs torch + mergekit and the fixtures of ``scripts/make_arch_models.py`` (tests/data/arch/<arch>/).

For every example of mergekit's ``examples/`` directory (arcee_fusion, bio-merge, gradient-slerp,
linear, orcamini-platy-44layer, ties) ``EXAMPLES`` holds a config of the same structure: the same
method, parameters, per-model parameters, filters, gradients, slices, tokenizer and dtype settings,
with the example's models replaced by ``base``/``ft1``/``ft2``/``ft3`` of one architecture and its layer
ranges scaled to the fixtures' 4 layers. ``ties-f32`` and ``linear-f32`` are the same configs with
``dtype: float32`` (computed and written in float32).

Each case writes ``tests/data/examples/<example>/<arch>/config.yml`` (paths relative to the repo root,
where the tests run) and runs ``mergekit.merge.run_merge`` on CPU with ``random_seed=0``, keeping the
output's ``model.safetensors`` (and ``config.json`` where the depth changes: slices of different
layer counts). Tokenizer, README and the rest of the output are not kept. mergekit 0.1.5 does not
resize ``layer_types``, so for Qwen2/Qwen3/Gemma-2 frankenmerges it writes every tensor and then fails
saving the config: those goldens have tensors only. For Qwen2-MoE (no architecture definition in
mergekit 0.1.5, inferred) its config keeps the input's ``num_hidden_layers``.

Tie order: mergekit's magnitude top-k (``sparsify.magnitude``) ranks |delta| with
``torch.argsort(descending=True)``, which is not stable, so among entries tied at the k-th magnitude
(frequent for task vectors of bf16 checkpoints) the kept subset is arbitrary. Goldens are made with
``torch.argsort`` stable (ties kept lowest flat index first, one of the subsets mergekit may keep, and
jmerge's documented order). ``--stock-check`` also runs stock mergekit and prints how many entries
differ from the golden (all of them must be at tied magnitudes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile

import yaml

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(REPO, "tests", "data", "examples")
ARCH_DIR = "tests/data/arch"
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "mixtral", "qwen2_moe")
N_LAYERS = 4


def _paths(arch: str) -> tuple[str, str, str, str]:
    d = f"{ARCH_DIR}/{arch}"
    return f"{d}/base", f"{d}/ft1", f"{d}/ft2", f"{d}/ft3"


def _arcee_fusion(arch: str) -> dict:
    base, ft1, _, _ = _paths(arch)
    return {
        "models": [{"model": base}, {"model": ft1}],
        "merge_method": "arcee_fusion",
        "base_model": base,
        "dtype": "bfloat16",
    }


def _bio_merge(arch: str) -> dict:
    base, ft1, ft2, _ = _paths(arch)
    return {
        "models": [
            {"model": ft1, "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": ft2, "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    }


def _gradient_slerp(arch: str) -> dict:
    _, ft1, ft2, _ = _paths(arch)
    return {
        "slices": [{"sources": [{"model": ft1, "layer_range": [0, N_LAYERS]},
                                {"model": ft2, "layer_range": [0, N_LAYERS]}]}],
        "merge_method": "slerp",
        "base_model": ft1,
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": "float16",
    }


def _linear(arch: str, dtype: str = "float16") -> dict:
    _, ft1, ft2, ft3 = _paths(arch)
    return {
        "models": [
            {"model": ft1, "parameters": {"weight": 1.0}},
            {"model": ft2, "parameters": {"weight": 0.3}},
            {"model": ft3, "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": dtype,
    }


def _orcamini_platy(arch: str) -> dict:
    # 40 layers -> [0, 24] + [20, 40] (44 layers); 4 layers -> [0, 3] + [2, 4] (5 layers)
    _, ft1, ft2, _ = _paths(arch)
    return {
        "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 3]}]},
            {"sources": [{"model": ft2, "layer_range": [2, N_LAYERS]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    }


def _ties(arch: str, dtype: str = "float16") -> dict:
    base, ft1, ft2, ft3 = _paths(arch)
    return {
        "models": [
            {"model": ft1, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": ft2, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": ft3, "parameters": {"density": 0.33,
                                          "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        ],
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": dtype,
    }


EXAMPLES = {
    "arcee_fusion": _arcee_fusion,
    "bio-merge": _bio_merge,
    "gradient-slerp": _gradient_slerp,
    "linear": _linear,
    "orcamini-platy-44layer": _orcamini_platy,
    "ties": _ties,
    "linear-f32": lambda arch: _linear(arch, "float32"),
    "ties-f32": lambda arch: _ties(arch, "float32"),
}
DEPTH_CHANGES = {"orcamini-platy-44layer"}


@contextlib.contextmanager
def _stable_argsort(enabled: bool = True):
    """``torch.argsort`` with ``stable=True`` unless a caller asks otherwise (see the module docstring)."""
    import torch

    orig = torch.argsort
    if enabled:
        def argsort(*args, **kwargs):
            kwargs.setdefault("stable", True)
            return orig(*args, **kwargs)
        torch.argsort = argsort
    try:
        yield
    finally:
        torch.argsort = orig


def _run_mergekit(cfg: dict, out: str, stable: bool = True) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    conf = MergeConfiguration.model_validate(cfg)
    opts = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, random_seed=0,
                        write_model_card=False, quiet=True, out_shard_size=2**40)
    with _stable_argsort(stable):
        run_merge(conf, out, opts)


def _stock_diff(cfg: dict, golden: str) -> tuple[int, int]:
    """(entries where stock mergekit differs from ``golden``, total entries)."""
    import torch
    from safetensors.torch import load_file as load_pt

    with tempfile.TemporaryDirectory() as tmp:
        _run_mergekit(cfg, os.path.join(tmp, "o"), stable=False)
        a = load_pt(os.path.join(tmp, "o", "model.safetensors"))
        b = load_pt(golden)
    n_diff = sum(int((a[k].float() != b[k].float()).sum()) for k in b)
    return n_diff, sum(int(torch.numel(v)) for v in b.values())


def run_case(example: str, arch: str, stock_check: bool = False) -> None:
    cfg = EXAMPLES[example](arch)
    case_dir = os.path.join(OUT, example, arch)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    with open(os.path.join(case_dir, "config.yml"), "w") as f:
        f.write(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        try:
            _run_mergekit(yaml.safe_load(text), out)
        except Exception as e:  # noqa: BLE001
            # mergekit 0.1.5 writes every tensor, then fails saving a config whose `layer_types` it did
            # not resize (Qwen2/Qwen3/Gemma-2 frankenmerges): keep the tensors, there is no config.
            if "layer_types" not in str(e) or not os.path.isfile(os.path.join(out, "model.safetensors")):
                raise
            print(f"  {example}/{arch}: mergekit wrote the tensors but no config.json "
                  f"({str(e).splitlines()[-1].strip()})")
        files = sorted(os.listdir(out))
        if "model.safetensors" not in files:
            raise RuntimeError(f"{example}/{arch}: mergekit wrote {files}, expected one model.safetensors")
        shutil.copyfile(os.path.join(out, "model.safetensors"), os.path.join(case_dir, "model.safetensors"))
        if example in DEPTH_CHANGES and "config.json" in files:
            shutil.copyfile(os.path.join(out, "config.json"), os.path.join(case_dir, "config.json"))
    if stock_check:
        n, total = _stock_diff(yaml.safe_load(text), os.path.join(case_dir, "model.safetensors"))
        print(f"  stock mergekit (unstable argsort) differs from the golden on {n}/{total} entries")


def _cases(names: list[str]) -> list[tuple[str, str]]:
    out = []
    for n in names or list(EXAMPLES):
        ex, _, arch = n.partition(":")
        if ex not in EXAMPLES or (arch and arch not in ARCHS):
            raise SystemExit(f"unknown case '{n}': examples {', '.join(EXAMPLES)}; archs {', '.join(ARCHS)}")
        out += [(ex, a) for a in ([arch] if arch else ARCHS)]
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="EXAMPLE or EXAMPLE:ARCH (default: all)")
    ap.add_argument("--stock-check", action="store_true",
                    help="also run stock mergekit and count entries that depend on its tie order")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    failed = []
    for ex, arch in _cases(args.cases):
        try:
            run_case(ex, arch, args.stock_check)
            print(f"{ex}/{arch}: ok", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, fail at the end
            failed.append(f"{ex}/{arch}")
            print(f"{ex}/{arch}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            shutil.rmtree(os.path.join(OUT, ex, arch), ignore_errors=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"goldens in {OUT}: {total / 1e6:.2f} MB")
    if failed:
        print(f"failed: {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
