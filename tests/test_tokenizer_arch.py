"""Merged vocabularies (``tokenizer_source`` / ``tokenizer:``) across architectures, against mergekit 0.1.5.

For an architecture fixture of ``tests/data/arch/<arch>`` (GPT-2 and Qwen2 / Gemma-2 with tied heads,
Phi-3 with fused projections, Mixtral / Qwen2-MoE with experts, ...) models with different
vocabularies are built in a temporary directory:

* ``base``: the fixture's base (a WordLevel tokenizer of 37 tokens, 64 embedding rows);
* ``x``: ``ft1`` with three new words and one added special token (ids 37..40, inside its 64 rows);
* ``y``: ``ft2`` with ``cat`` / ``dog`` at each other's ids, 30 new words (``owl`` shared with ``x``) and
  two added special tokens (``<|im_start|>`` shared with ``x``): 69 tokens, its embedding (and LM
  head) grown to 72 rows;
* ``ft3`` as stored: no tokenizer files (taken to be the base's).

The same config runs through ``jmerge merge`` and, live on the CPU with ``dtype: float32``, through
mergekit's Python API (its top-k made stable: bf16 task vectors tie at the k-th magnitude). Compared:
the vocabularies (the base's tokens keep their ids in both; mergekit appends a union's new tokens in
hash order, so their ids may differ and rows are matched by token), the embedding / LM-head rows
token by token, padding rows, every other tensor (<= 1e-6; MoE experts in transformers 5's fused
names), the config's ``vocab_size``; then both outputs run a forward pass in transformers on the same
text and their logits are compared token by token.

Departure (a model without tokenizer files): mergekit means to take such a model's tokenizer to be the
base's, but under transformers 5 ``AutoTokenizer`` builds an empty tokenizer from the config's
``model_type`` for GPT-2, Qwen2/Qwen3/Qwen2-MoE and Gemma-2 (e.g. ``{'<|endoftext|>': 0}``), so mergekit
then drops that model's rows and adds a phantom token. jmerge takes the base's tokenizer for every
architecture; the reference there is mergekit given the base's tokenizer files explicitly.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from jmerge.io.safetensors import open_checkpoint
from tests.test_tokenizer_merge import _run_jmerge

ARCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch")
EMBED = re.compile(r"^(?:model\.embed_tokens|lm_head|transformer\.wte)\.weight$")
X_WORDS = ("owl", "barn", "zoo")
Y_WORDS = ("owl", "fox") + tuple(f"w{i:02d}" for i in range(28))
Y_ROWS = 72
TEXT = "the owl ran in the zoo <|im_start|> fox w03 cat dog <|im_end|> merge barn"

# (arch, method, tokenizer source, pad_to_multiple_of or None: `tokenizer_source:` instead of `tokenizer:`)
CASES = [
    ("gpt2", "ties", "union", None),
    ("gpt2", "linear", "y", None),
    ("qwen2", "linear", "union", None),
    ("gemma2", "ties", "union", 16),
    ("phi3", "linear", "union", None),
    ("mixtral", "ties", "union", None),
    ("qwen2_moe", "linear", "union", 16),
    ("llama", "ties", "union", 32),
    ("mistral", "linear", "union", None),
    ("qwen3", "ties", "union", None),
]


# --------------------------------------------------------------------------------------------
# Fixtures: the arch fixtures with different vocabularies


def _tokenizer(base_dir: str, out_dir: str, words=(), specials=(), swap=()) -> None:
    """The base's WordLevel tokenizer with ``words`` appended to its vocabulary and ``specials`` added."""
    with open(os.path.join(base_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    vocab = dict(tok["model"]["vocab"])
    for a, b in swap:
        vocab[a], vocab[b] = vocab[b], vocab[a]
    for w in words:
        assert w not in vocab
        vocab[w] = len(vocab)
    tok["model"]["vocab"] = vocab
    n_added = len(tok["added_tokens"])  # the base's 4 added tokens are in its vocabulary
    for s in specials:
        tok["added_tokens"].append({"id": len(vocab) + len(tok["added_tokens"]) - n_added, "content": s,
                                    "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, indent=1)
    shutil.copyfile(os.path.join(base_dir, "tokenizer_config.json"), os.path.join(out_dir, "tokenizer_config.json"))


def _grow(model_dir: str, rows: int, seed: int) -> None:
    """Grow the vocabulary tensors of a checkpoint to ``rows`` rows (new rows random), as resizing does."""
    from safetensors.numpy import save_file

    with open_checkpoint(model_dir) as r:
        sd = {k: np.array(r.get(k)) for k in r.keys()}
    g = np.random.default_rng(seed)
    grown = 0
    for k, v in sd.items():
        if EMBED.match(k):
            extra = g.standard_normal((rows - v.shape[0],) + v.shape[1:]) * float(v.astype(np.float32).std())
            sd[k] = np.concatenate([v, extra.astype(v.dtype)])
            grown += 1
    assert grown
    save_file(sd, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    cp = os.path.join(model_dir, "config.json")
    with open(cp, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = rows
    with open(cp, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def _variants(arch: str, root) -> dict:
    src = os.path.join(ARCH_DIR, arch)
    if not os.path.isdir(os.path.join(src, "base")):
        pytest.skip(f"tests/data/arch/{arch} missing; run scripts/make_arch_models.py")
    d = {"base": os.path.join(src, "base"), "ft3": os.path.join(src, "ft3"), "x": str(root / "x"),
         "y": str(root / "y")}
    for k, ft in (("x", "ft1"), ("y", "ft2")):
        shutil.copytree(os.path.join(src, ft), d[k])
    _tokenizer(d["base"], d["x"], X_WORDS, ["<|im_start|>"])
    _tokenizer(d["base"], d["y"], Y_WORDS, ["<|im_end|>", "<|im_start|>"], swap=[("cat", "dog")])
    _grow(d["y"], Y_ROWS, seed=7)
    return d


# --------------------------------------------------------------------------------------------
# Running both tools and comparing


def _config(d: dict, method: str, source: str, pad, names=("x", "y")) -> dict:
    if method == "ties":
        cfg = {"merge_method": "ties", "base_model": d["base"], "dtype": "float32",
               "models": [{"model": d[k], "parameters": {"weight": w, "density": rho}}
                          for k, w, rho in zip(names, (1.0, 0.6), (0.7, 0.5))]}
    else:
        cfg = {"merge_method": "linear", "base_model": d["base"], "dtype": "float32",
               "models": [{"model": d[k], "parameters": {"weight": w}}
                          for k, w in zip(("base",) + tuple(names), (0.5, 0.3, 0.2))]}
    source = source if source in ("union", "base") else d[source]
    if pad:
        cfg["tokenizer"] = {"source": source, "pad_to_multiple_of": pad}
    else:
        cfg["tokenizer_source"] = source
    return cfg


def _run_mergekit(cfg: dict, tmp_path, name: str, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    argsort = torch.argsort

    def stable_argsort(x, *a, **kw):
        return argsort(x, *a, **{**kw, "stable": True})

    out = tmp_path / f"mk-{name}"
    with monkeypatch.context() as m:  # bf16 task vectors tie at the k-th magnitude: lowest index first
        m.setattr(torch, "argsort", stable_argsort)
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(quiet=True, random_seed=0, write_model_card=False))
    return out


_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w[123]|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _tensors(path) -> dict:
    """name -> float32 values, per-expert MoE tensors fused as transformers 5 names them."""
    out, parts = {}, {}
    with open_checkpoint(str(path)) as r:
        for k in r.keys():
            v = np.asarray(r.get(k)).astype(np.float32)
            m = _EXPERT.match(k)
            if m:
                parts.setdefault(m.group(1), {}).setdefault(_PART[m.group(3)], {})[int(m.group(2))] = v
            else:
                out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for layer, p in parts.items():
        n = len(p["gate"])
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([p["gate"][e], p["up"][e]])
                                                             for e in range(n)])
        out[f"{layer}.mlp.experts.down_proj"] = np.stack([p["down"][e] for e in range(n)])
    return out


def _compare(jm, mk, pad, keep_ids_of: str) -> tuple[dict, dict]:
    """Vocabularies, rows token by token, every other tensor, vocab_size, and forward passes of two outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tj, tm = AutoTokenizer.from_pretrained(str(jm)), AutoTokenizer.from_pretrained(str(mk))
    vj, vm = tj.get_vocab(), tm.get_vocab()
    assert set(vj) == set(vm)
    assert all(vj[t] == vm[t] == i for t, i in AutoTokenizer.from_pretrained(keep_ids_of).get_vocab().items())
    cj, cm = (json.loads((o / "config.json").read_text()) for o in (jm, mk))
    assert cj["vocab_size"] == cm["vocab_size"] == -(-len(vj) // (pad or 1)) * (pad or 1)

    J, M = _tensors(jm), _tensors(mk)
    assert set(J) == set(M)
    toks = sorted(vj)
    ij, im = np.array([vj[t] for t in toks]), np.array([vm[t] for t in toks])
    n, vocab_tensors = len(toks), 0
    for k in sorted(M):
        a, b = J[k], M[k]
        assert a.shape == b.shape, k
        if EMBED.match(k):
            assert a.shape[0] == cj["vocab_size"], k
            np.testing.assert_allclose(a[ij], b[im], rtol=0, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(a[n:], b[n:], rtol=0, atol=1e-6, err_msg=k)  # padding rows
            vocab_tensors += 1
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=k)
    assert vocab_tensors == (1 if cj.get("tie_word_embeddings") else 2)

    # forward passes: the same text, the same tokens, the same logits per token
    enc = [t.encode(TEXT) for t in (tj, tm)]
    assert tj.convert_ids_to_tokens(enc[0]) == tm.convert_ids_to_tokens(enc[1])
    logits = []
    for out, ids in zip((jm, mk), enc):
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=torch.tensor([ids])).logits[0].numpy())
    lj, lm = logits
    assert lj.shape == (len(enc[0]), cj["vocab_size"]) and np.isfinite(lj).all()
    np.testing.assert_allclose(lj[:, ij], lm[:, im], rtol=0, atol=1e-4)
    return vj, J


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.peers
@pytest.mark.parametrize("arch, method, source, pad", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_merged_vocabulary_matches_mergekit(arch, method, source, pad, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    d = _variants(arch, tmp_path)
    vb, vx, vy = (AutoTokenizer.from_pretrained(d[k]).get_vocab() for k in ("base", "x", "y"))
    assert len(vb) == 37 and len(vx) == 41 and vx["<|im_start|>"] == 40  # the fixtures are what they say
    assert len(vy) == 69 and vy["<|im_start|>"] == 68 and (vy["cat"], vy["dog"]) == (vb["dog"], vb["cat"])
    cfg = _config(d, method, source, pad)
    jm, mk = _run_jmerge(cfg, tmp_path, "m"), _run_mergekit(cfg, tmp_path, "m", monkeypatch)
    vj, J = _compare(jm, mk, pad, keep_ids_of=d["base"] if source == "union" else d[source])
    assert set(vj) == (set(vb) | set(vx) | set(vy) if source == "union" else set(vy))

    if method == "linear":  # rows of the inputs, independently of mergekit
        emb = next(k for k in J if EMBED.match(k) and not k.startswith("lm_head"))
        B, X, Y = (_tensors(d[k])[emb] for k in ("base", "x", "y"))
        # a token of y only: y's row stands in for every model's
        np.testing.assert_allclose(J[emb][vj["fox"]], Y[vy["fox"]], rtol=0, atol=1e-6)
        # a token of all three, at another id in y
        np.testing.assert_allclose(J[emb][vj["cat"]], 0.5 * B[vb["cat"]] + 0.3 * X[vx["cat"]] + 0.2 * Y[vy["cat"]],
                                   rtol=0, atol=1e-6)
        # x and y have it, the base does not: the base's row is their mean
        owl = 0.5 * (X[vx["owl"]] + Y[vy["owl"]]) * 0.5 + 0.3 * X[vx["owl"]] + 0.2 * Y[vy["owl"]]
        np.testing.assert_allclose(J[emb][vj["owl"]], owl, rtol=0, atol=1e-6)


@pytest.mark.peers
@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_model_without_tokenizer_counts_as_the_base(arch, tmp_path, monkeypatch):
    """ft3 has no tokenizer files: its rows are indexed by the base's tokenizer. Phi-3: stock mergekit does the
    same. GPT-2: mergekit under transformers 5 builds an empty GPT-2 tokenizer for ft3 (see the module's
    docstring), so the reference is mergekit given a copy of ft3 with the base's tokenizer files."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    d = _variants(arch, tmp_path)
    cfg = _config(d, "linear", "union", None, names=("y", "ft3"))
    jm = _run_jmerge(cfg, tmp_path, "m")
    if arch == "gpt2":
        d["ft3"] = str(tmp_path / "ft3")
        shutil.copytree(os.path.join(ARCH_DIR, arch, "ft3"), d["ft3"])
        _tokenizer(d["base"], d["ft3"])
        cfg = _config(d, "linear", "union", None, names=("y", "ft3"))
    mk = _run_mergekit(cfg, tmp_path, "m", monkeypatch)
    vj, J = _compare(jm, mk, None, keep_ids_of=d["base"])
    # a token of all three: ft3's row is the one at the base's id
    emb = next(k for k in J if EMBED.match(k) and not k.startswith("lm_head"))
    B, Y, F3 = (_tensors(p)[emb] for p in (d["base"], d["y"], os.path.join(ARCH_DIR, arch, "ft3")))
    vy = AutoTokenizer.from_pretrained(d["y"]).get_vocab()
    assert set(vj) == set(AutoTokenizer.from_pretrained(d["base"]).get_vocab()) | set(vy)  # no phantom tokens
    np.testing.assert_allclose(J[emb][vj["merge"]], 0.5 * B[vj["merge"]] + 0.3 * Y[vy["merge"]]
                               + 0.2 * F3[vj["merge"]], rtol=0, atol=1e-6)
