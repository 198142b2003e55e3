"""Build the tiny HF fixtures under tests/data/tiny/ (deterministic; needs torch + transformers).

    python3 scripts/make_tiny_models.py

Writes (all bf16, ``save_pretrained`` layout, one ``model.safetensors`` each):
  base/         tiny Llama (hidden 64, intermediate 128, 3 layers, 4 heads, 2 KV heads, vocab 128,
                untied lm_head) plus a tiny WordLevel tokenizer that ``AutoTokenizer`` loads.
  ft1..ft3/     base + random deltas: per tensor ``0.05 * scale * (0.5 * common + own_i)`` plus ~3% of
                entries with 4x larger outliers, ``scale`` = the tensor's std (or mean |w| for norms);
                the independent parts make signs conflict between models.
  tied_base/, tied_ft1/, tied_ft2/   the same with ``tie_word_embeddings=True`` (no lm_head tensor).
  gpt2_base/, gpt2_ft1/, gpt2_ft2/   tiny GPT-2 (n_embd 64, 2 layers, 4 heads, vocab 128, tied wte;
                Conv1D weights, ``transformer.h.N`` names, biases), same kind of deltas.
Norm weights have 64 elements (fewer than 100) to keep the fixtures small; every other tensor has
at least 2048 (k_proj/v_proj are 32x64).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "tiny")

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "model merging combines fine tuned weights",
    "task vectors add and subtract skills",
    "ties trims elects signs and merges",
    "jax compiles the merge once per shape",
]


def make_tokenizer(out_dir: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)


def llama_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )


def perturb(sd: dict, seed: int, n_models: int) -> list[dict]:
    """``n_models`` fine-tuned state dicts: base + shared + independent + sparse outlier deltas."""
    import torch

    rng = np.random.default_rng(seed)
    outs: list[dict] = [{} for _ in range(n_models)]
    for name in sorted(sd):
        w = sd[name].float().numpy()
        scale = float(w.std()) if w.std() > 1e-6 else float(np.abs(w).mean())
        scale = scale if scale > 1e-6 else 0.02  # zero-initialised biases still move in fine-tuning
        common = rng.standard_normal(w.shape)
        for i in range(n_models):
            own = rng.standard_normal(w.shape)
            outlier = (rng.random(w.shape) < 0.03) * rng.standard_normal(w.shape) * 4.0
            d = 0.05 * scale * (0.5 * common + own + outlier)
            outs[i][name] = torch.from_numpy((w + d).astype(np.float32)).to(torch.bfloat16)
    return outs


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)


def build(prefix: str, tied: bool, n_ft: int, seed: int, arch: str = "llama") -> None:
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg, cls = gpt2_config(), GPT2LMHeadModel
    else:
        cfg, cls = llama_config(tied), LlamaForCausalLM
    model = cls(cfg).to(torch.bfloat16).eval()
    base_dir = os.path.join(ROOT, f"{prefix}base")
    model.save_pretrained(base_dir)
    make_tokenizer(base_dir)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)
    sd = {k: v for k, v in sd.items() if v.is_floating_point()}
    for i, ft in enumerate(perturb(sd, seed + 1, n_ft)):
        m = cls(cfg).to(torch.bfloat16).eval()
        missing, unexpected = m.load_state_dict(ft, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        if tied:
            m.tie_weights()
        m.save_pretrained(os.path.join(ROOT, f"{prefix}ft{i + 1}"))


def main() -> int:
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    build("", tied=False, n_ft=3, seed=0)
    build("tied_", tied=True, n_ft=2, seed=100)
    build("gpt2_", tied=True, n_ft=2, seed=200, arch="gpt2")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
