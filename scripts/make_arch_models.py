"""Build tiny checkpoints of every supported architecture under tests/data/arch/ (needs torch + transformers).

    python3 scripts/make_arch_models.py            # all architectures
    python3 scripts/make_arch_models.py llama gpt2 # some

For each architecture ``<arch>`` this writes ``tests/data/arch/<arch>/{base,ft1,ft2,ft3}`` in the
``save_pretrained`` layout of transformers 5 (one bf16 ``model.safetensors``, ``config.json``,
``generation_config.json``); ``base`` also gets the tiny WordLevel tokenizer of
``make_tiny_models.py``. Every model has hidden size 16, 4 layers, 4 attention heads (2 KV heads,
head_dim 4), MLP width 32 (MoE: 4 experts of width 16, top 2; Qwen3-MoE renormalises the top-2 weights,
``norm_topk_prob`` true as in the released Qwen3 MoE models) and a vocabulary of 64 (the
tokenizer uses 37 ids).

Values do not depend on torch's RNG: every tensor of the model's state dict (transformers 5 layout, so
Mixtral/Qwen2-MoE/Qwen3-MoE experts are the fused ``mlp.experts.*`` tensors) is drawn by NumPy from a generator
seeded with the architecture's seed and the tensor's name:

* base: norm weights ``1 + 0.1 N`` (Gemma-2 stores ``w`` of ``1 + w``: ``0.1 N``), biases ``0.02 N``,
  matrices ``N / sqrt(fan_in)``; then rounded to bf16.
* ft1..ft3: ``base + 0.05 * s * (0.5 * common + own_i + outlier_i)``, ``s`` the tensor's std (mean
  ``|w|`` for 1-D tensors with std below 1e-6), ``outlier_i`` nonzero (4 N) on ~3% of entries; the
  independent parts make task-vector signs conflict between the fine-tunes (TIES has work to do).

Tied-embedding architectures (Qwen2, Gemma-2, GPT-2) have no ``lm_head.weight`` on disk.
"""

from __future__ import annotations

import os
import shutil
import sys
import zlib

import numpy as np

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ROOT = os.path.join(REPO, "tests", "data", "arch")
N_FT = 3

_COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _configs() -> dict:
    """``arch -> (config, model class)``; arch names are the directory names under tests/data/arch."""
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig(**_COMMON, tie_word_embeddings=False), tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig(**_COMMON, head_dim=4, sliding_window=None, tie_word_embeddings=False),
                    tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config(**_COMMON, tie_word_embeddings=True), tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config(**_COMMON, head_dim=4, tie_word_embeddings=False), tf.Qwen3ForCausalLM),
        "gemma2": (tf.Gemma2Config(**_COMMON, head_dim=4, query_pre_attn_scalar=4, sliding_window=16,
                                   tie_word_embeddings=True), tf.Gemma2ForCausalLM),
        "phi3": (tf.Phi3Config(**_COMMON, tie_word_embeddings=False), tf.Phi3ForCausalLM),
        "gpt2": (tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_inner=32, n_layer=4, n_head=4,
                               bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True),
                 tf.GPT2LMHeadModel),
        "mixtral": (tf.MixtralConfig(**{**_COMMON, "intermediate_size": 16}, head_dim=4, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
                    tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                        num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                      tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig(**_COMMON, head_dim=4, moe_intermediate_size=16, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False),
                      tf.Qwen3MoeForCausalLM),
    }


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe")
# (append new architectures at the end: the seeds, hence the values, of the others stay unchanged)
SEEDS = {a: 1000 * (i + 1) for i, a in enumerate(ARCHS)}


def _rng(seed: int, name: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), salt])


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def base_values(arch: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The base model's values (bf16-representable float32) for the state-dict ``shapes``."""
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        g = _rng(SEEDS[arch], name)
        z = g.standard_normal(shape)
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 1 and ("norm" in name or ".ln_" in name) and leaf == "weight":
            w = 0.1 * z if arch == "gemma2" else 1.0 + 0.1 * z
        elif len(shape) == 1:
            w = 0.02 * z
        else:
            w = z / np.sqrt(shape[-1])
        out[name] = _bf16(w.astype(np.float32))
    return out


def finetunes(arch: str, base: dict[str, np.ndarray], n: int = N_FT) -> list[dict[str, np.ndarray]]:
    """``n`` fine-tunes: base + shared + independent + sparse outlier deltas, rounded to bf16."""
    outs: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for name in sorted(base):
        w = base[name]
        scale = float(w.std())
        scale = scale if scale > 1e-6 else float(np.abs(w).mean())
        scale = scale if scale > 1e-6 else 0.02
        g = _rng(SEEDS[arch], name, 1)
        common = g.standard_normal(w.shape)
        for i in range(n):
            own = g.standard_normal(w.shape)
            outlier = (g.random(w.shape) < 0.03) * g.standard_normal(w.shape) * 4.0
            d = 0.05 * scale * (0.5 * common + own + outlier)
            outs[i][name] = _bf16((w + d).astype(np.float32))
    return outs


def _save(cfg, cls, values: dict[str, np.ndarray], out_dir: str) -> None:
    import torch

    model = cls(cfg).to(torch.bfloat16).eval()
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in values.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir)


def build(arch: str) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_tiny_models import make_tokenizer

    cfg, cls = _configs()[arch]
    cfg.dtype = torch.bfloat16
    model = cls(cfg).to(torch.bfloat16)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if v.is_floating_point() and not (tied and k == "lm_head.weight")}
    del model
    d = os.path.join(ROOT, arch)
    shutil.rmtree(d, ignore_errors=True)
    base = base_values(arch, shapes)
    _save(cfg, cls, base, os.path.join(d, "base"))
    make_tokenizer(os.path.join(d, "base"))
    for i, ft in enumerate(finetunes(arch, base)):
        _save(cfg, cls, ft, os.path.join(d, f"ft{i + 1}"))


def main(argv: list[str]) -> int:
    names = argv or list(ARCHS)
    for a in names:
        if a not in ARCHS:
            print(f"unknown architecture '{a}'; one of {', '.join(ARCHS)}", file=sys.stderr)
            return 2
    os.makedirs(ROOT, exist_ok=True)
    for a in names:
        build(a)
        print(f"{a}: ok", flush=True)
    total = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
