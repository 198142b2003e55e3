"""Merged vocabularies (``tokenizer_source`` / ``tokenizer:``) and chat templates, against mergekit 0.1.5.

Tiny Llama models with BPE tokenizers trained on different sentences (so their vocabularies differ)
are built in a temporary directory; the same configs run through jmerge and, live on the CPU with
``dtype: float32``, through mergekit's Python API. Compared: every tensor (<= 1e-6; embedding and
LM-head rows token by token), the output vocabularies (the same tokens; the same id for every token
where mergekit's order is deterministic -- it appends a union's new tokens in hash order), what the
tokenizers make of a text with special tokens, and the config's ``vocab_size``.

Also: bf16 mean rows against torch's bf16 arithmetic (mergekit's), chat template names rendering
conversations with ``apply_chat_template`` against hand-written expected strings, and located errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from jmerge.cli import main
from jmerge.core import MergeInputError
from jmerge.io.safetensors import open_checkpoint
from jmerge.mergekit import ConfigError, parse_config
from jmerge.mergekit.chat_templates import CHAT_TEMPLATES, chat_template_problem, named_chat_template

CORPUS_A = ["the cat sat on the mat", "a dog ran in the park", "model merging combines weights",
            "the dog and the cat are friends"]
CORPUS_B = ["the cat ran to the zoo", "an owl flew over the barn", "merging models is fun and fast",
            "owls and cats hunt at night"]
TEXT = "<|im_start|>the owl ran to the cat<|im_end|>"
CHATML_LITERAL = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{% endfor %}")
OTHER_LITERAL = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


# --------------------------------------------------------------------------------------------
# Fixtures: tiny models with different vocabularies


def _tokenizer(out_dir, corpus, specials=(), extra_added=(), chat_template=None) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<s>", "</s>", *specials],
                                                      show_progress=False))
    f = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    for tok in extra_added:
        f.add_tokens([AddedToken(tok, special=True, normalized=False)])
    if chat_template:
        f.chat_template = chat_template
    f.save_pretrained(out_dir)
    return len(f)


def _model(out_dir, vocab, seed, tied=False, rows=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=rows or vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Model dirs: a (corpus A), a2 (a's tokenizer + one special token), b (corpus B, chatml specials and a
    chat template), c (A + one B sentence, one special), ta/tb (tied variants of a/b), p (a's tokenizer,
    embedding padded to 64 rows), s (a2's tokenizer on 60 embedding rows: the extra token is stripped)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("tokzoo")
    d = {k: str(root / k) for k in ("a", "a2", "b", "c", "ta", "tb", "p", "s")}
    na = _tokenizer(d["a"], CORPUS_A, chat_template=OTHER_LITERAL)
    _model(d["a"], na, 0)
    na2 = _tokenizer(d["a2"], CORPUS_A, extra_added=("<|extra|>",))
    _model(d["a2"], na2, 1)
    nb = _tokenizer(d["b"], CORPUS_B, specials=("<|im_start|>", "<|im_end|>"), chat_template=CHATML_LITERAL)
    _model(d["b"], nb, 2)
    nc = _tokenizer(d["c"], CORPUS_A + CORPUS_B[:1], specials=("<|im_end|>",), chat_template=CHATML_LITERAL)
    _model(d["c"], nc, 3)
    _tokenizer(d["ta"], CORPUS_A)
    _model(d["ta"], na, 4, tied=True)
    _tokenizer(d["tb"], CORPUS_B, specials=("<|im_start|>", "<|im_end|>"))
    _model(d["tb"], nb, 5, tied=True)
    _tokenizer(d["p"], CORPUS_A)
    _model(d["p"], na, 6, rows=64)
    _tokenizer(d["s"], CORPUS_A, extra_added=("<|extra|>",))  # 61 tokens, 60 embedding rows
    _model(d["s"], na, 7)
    assert na2 == na + 1
    vocab = lambda k: set(json.loads((root / k / "tokenizer.json").read_text())["model"]["vocab"])  # noqa: E731
    assert vocab("a") != vocab("b") and vocab("b") - vocab("c") and vocab("c") - vocab("a")
    return d


# --------------------------------------------------------------------------------------------
# Running both tools


def _read(path):
    with open_checkpoint(str(path)) as r:
        return {k: r.get(k).astype(np.float32) for k in r.keys()}


def _run_jmerge(cfg: dict, tmp_path, name: str):
    p = tmp_path / f"{name}.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / f"jm-{name}"
    assert main(["merge", str(p), str(out), "--quiet"]) == 0
    return out


def _run_mergekit(cfg: dict, tmp_path, name: str):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = tmp_path / f"mk-{name}"
    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(allow_crimes=True, quiet=True))
    return out


def _both(cfg: dict, tmp_path, name: str):
    return _run_jmerge(cfg, tmp_path, name), _run_mergekit(cfg, tmp_path, name)


def _compare(jm, mk, *, same_ids: bool, base_dir=None):
    """Tensors (rows matched by token), vocabularies, tokenization and vocab_size of two outputs."""
    from transformers import AutoTokenizer

    tj, tm = AutoTokenizer.from_pretrained(str(jm)), AutoTokenizer.from_pretrained(str(mk))
    vj, vm = tj.get_vocab(), tm.get_vocab()
    assert set(vj) == set(vm)
    if same_ids:
        assert vj == vm
    if base_dir is not None:  # the base tokenizer's tokens keep their ids in both
        for t, i in AutoTokenizer.from_pretrained(base_dir).get_vocab().items():
            assert vj[t] == vm[t] == i, t
    assert tj.convert_ids_to_tokens(tj.encode(TEXT)) == tm.convert_ids_to_tokens(tm.encode(TEXT))
    cj = json.loads((jm / "config.json").read_text())
    cm = json.loads((mk / "config.json").read_text())
    assert cj["vocab_size"] == cm["vocab_size"]
    J, M = _read(jm), _read(mk)
    assert set(J) == set(M)
    toks = sorted(vj)
    ij, im = np.array([vj[t] for t in toks]), np.array([vm[t] for t in toks])
    n = len(toks)
    checked_vocab = 0
    for k in sorted(M):
        a, b = J[k], M[k]
        assert a.shape == b.shape, k
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert a.shape[0] == cj["vocab_size"], k
            np.testing.assert_allclose(a[ij], b[im], rtol=0, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(a[n:], b[n:], rtol=0, atol=1e-6, err_msg=k)  # padding rows
            checked_vocab += 1
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=k)
    assert checked_vocab >= 1
    return vj, J


def _linear(zoo, names, weights, **extra):
    cfg = {"merge_method": "linear", "base_model": zoo[names[0]], "dtype": "float32",
           "models": [{"model": zoo[n], "parameters": {"weight": w}} for n, w in zip(names, weights)]}
    cfg.update(extra)
    return cfg


# --------------------------------------------------------------------------------------------
# Parity with mergekit


@pytest.mark.peers
def test_union_deterministic_ids_match_mergekit(zoo, tmp_path):
    """a + a2 (one extra special token): mergekit's union order is fixed here, so every id must match."""
    cfg = _linear(zoo, ["a", "a2"], [0.6, 0.4], tokenizer_source="union")
    jm, mk = _both(cfg, tmp_path, "det")
    vj, J = _compare(jm, mk, same_ids=True, base_dir=zoo["a"])
    assert vj["<|extra|>"] == len(vj) - 1
    # the extra token exists only in a2: every model's row is a2's (then merged: 0.6 a2 + 0.4 a2)
    a2 = _read(zoo["a2"])
    np.testing.assert_allclose(J["model.embed_tokens.weight"][vj["<|extra|>"]],
                               a2["model.embed_tokens.weight"][vj["<|extra|>"]], rtol=0, atol=1e-6)


@pytest.mark.peers
def test_union_of_different_vocabularies_matches_mergekit(zoo, tmp_path):
    """TIES over three models with different vocabularies: rows from base, donors and means, token by token."""
    cfg = {"merge_method": "ties", "base_model": zoo["a"], "dtype": "float32", "tokenizer_source": "union",
           "parameters": {"density": 0.7, "weight": 1.0},
           "models": [{"model": zoo["b"]}, {"model": zoo["c"]}]}
    jm, mk = _both(cfg, tmp_path, "ties")
    vj, _ = _compare(jm, mk, same_ids=False, base_dir=zoo["a"])
    from transformers import AutoTokenizer
    va, vb = (AutoTokenizer.from_pretrained(zoo[k]).get_vocab() for k in "ab")
    assert set(vb) - set(va) and set(vj) == set(va) | set(vb) | set(AutoTokenizer.from_pretrained(zoo["c"]).get_vocab())
    tok = json.loads((jm / "tokenizer.json").read_text())
    added = {t["content"]: t for t in tok["added_tokens"]}
    assert added["<|im_start|>"]["special"] and not added["zoo"]["special"]  # settings kept


@pytest.mark.peers
def test_tokenizer_source_base_and_model_match_mergekit(zoo, tmp_path):
    jm, mk = _both(_linear(zoo, ["a", "b", "c"], [0.5, 0.3, 0.2], tokenizer_source="base"), tmp_path, "base")
    vj, _ = _compare(jm, mk, same_ids=True, base_dir=zoo["a"])
    assert "<|im_start|>" not in vj
    jm, mk = _both(_linear(zoo, ["a", "b", "c"], [0.5, 0.3, 0.2], tokenizer_source=zoo["b"]), tmp_path, "model")
    _compare(jm, mk, same_ids=True, base_dir=zoo["b"])


@pytest.mark.peers
def test_tokenizer_block_tokens_and_padding_match_mergekit(zoo, tmp_path):
    """Per-token sources (a model, forced; zero; model_token by text and by id) and pad_to_multiple_of."""
    cfg = _linear(zoo, ["a", "b", "c"], [0.5, 0.3, 0.2])
    cfg["tokenizer"] = {
        "source": "union",
        "pad_to_multiple_of": 32,
        "tokens": {
            "<|im_start|>": {"source": zoo["b"], "force": True},
            "<|im_end|>": {"source": {"kind": "model_token", "model": zoo["c"], "token": "</s>"}},
            "<|new|>": {"source": {"kind": "zero"}},
            "Ġcat": {"source": {"kind": "model_token", "model": zoo["a"], "token_id": 5}, "force": True},
        },
    }
    jm, mk = _both(cfg, tmp_path, "block")
    vj, J = _compare(jm, mk, same_ids=False, base_dir=zoo["a"])
    size = json.loads((jm / "config.json").read_text())["vocab_size"]
    assert size % 32 == 0 and size > len(vj)
    E = J["model.embed_tokens.weight"]
    np.testing.assert_array_equal(E[vj["<|new|>"]], 0)
    np.testing.assert_allclose(E[vj["Ġcat"]], _read(zoo["a"])["model.embed_tokens.weight"][5], rtol=0, atol=1e-6)


@pytest.mark.peers
def test_tied_embeddings_union_matches_mergekit(zoo, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": zoo["ta"], "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": zoo["tb"], "parameters": {"weight": 0.7}}]}
    jm, mk = _both(cfg, tmp_path, "tied")
    _compare(jm, mk, same_ids=False, base_dir=zoo["ta"])
    assert "lm_head.weight" not in _read(jm)


@pytest.mark.peers
def test_untied_base_with_tied_model_and_padded_embedding_match_mergekit(zoo, tmp_path):
    """The head of a tied model is its embedding; p's 64-row embedding is cut to its tokenizer's rows."""
    cfg = _linear(zoo, ["p", "tb"], [0.5, 0.5], tokenizer_source="union")
    jm, mk = _both(cfg, tmp_path, "mixed")
    _compare(jm, mk, same_ids=False, base_dir=zoo["p"])


@pytest.mark.peers
def test_stripped_base_tokenizer_matches_mergekit(zoo, tmp_path):
    """The base's tokenizer has a token beyond its embedding rows: it is stripped before the union."""
    cfg = _linear(zoo, ["s", "b"], [0.5, 0.5], tokenizer_source="union")
    jm, mk = _both(cfg, tmp_path, "strip")
    vj, _ = _compare(jm, mk, same_ids=False, base_dir=zoo["a"])
    assert "<|extra|>" not in vj


@pytest.mark.peers
def test_passthrough_slices_union_matches_mergekit(zoo, tmp_path):
    # base_model fixes the tokenizer base: without it mergekit picks one from a set (hash order)
    cfg = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union", "base_model": zoo["a"],
           "slices": [{"sources": [{"model": zoo["a"], "layer_range": [0, 1]}]},
                      {"sources": [{"model": zoo["b"], "layer_range": [1, 2]}]}]}
    jm, mk = _both(cfg, tmp_path, "slices")
    _compare(jm, mk, same_ids=False, base_dir=zoo["a"])


@pytest.mark.peers
def test_chat_templates_auto_and_named_match_mergekit(zoo, tmp_path):
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cfg = _linear(zoo, ["a", "b", "c"], [0.5, 0.3, 0.2], tokenizer_source="union", chat_template="auto")
    jm, mk = _both(cfg, tmp_path, "auto")
    rj = AutoTokenizer.from_pretrained(str(jm)).apply_chat_template(msgs, tokenize=False)
    rm = AutoTokenizer.from_pretrained(str(mk)).apply_chat_template(msgs, tokenize=False)
    assert rj == rm == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"  # b's and c's
    # a named template without tokenizer_source: the donor's tokenizer, re-templated
    cfg = _linear(zoo, ["a", "b"], [0.5, 0.5], chat_template="chatml")
    jm, mk = _both(cfg, tmp_path, "named")
    rj = AutoTokenizer.from_pretrained(str(jm)).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    rm = AutoTokenizer.from_pretrained(str(mk)).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rj == rm
    assert "chat_template" not in json.loads((jm / "tokenizer_config.json").read_text())


# --------------------------------------------------------------------------------------------
# Tokenizer JSON edits against the tokenizers library


def test_json_edits_give_the_ids_tokenizers_assigns(zoo):
    """Union and added tokens written as JSON: loading the file with `tokenizers` gives the same ids, and so
    does adding the same tokens with the library itself."""
    tokenizers = pytest.importorskip("tokenizers")
    from jmerge.io.tokenizer import add_tokens, read_tokenizer, union_tokenizer

    base = read_tokenizer(zoo["a"])
    others = [read_tokenizer(zoo[k]) for k in ("b", "c", "a2")]
    out = union_tokenizer(base, [(base, 60)] + [(t, len(t.vocab())) for t in others])
    out = add_tokens(out, ["<|new|>", "Ġcat", "brand-new"])  # Ġcat exists: not added again
    assert out.changed and len(out.vocab()) > len(base.vocab())
    loaded = tokenizers.Tokenizer.from_str(json.dumps(out.tokenizer))
    assert loaded.get_vocab(with_added_tokens=True) == out.vocab()
    ref = tokenizers.Tokenizer.from_file(os.path.join(zoo["a"], "tokenizer.json"))
    for e in out.added():
        if e["content"] not in base.vocab():
            ref.add_tokens([tokenizers.AddedToken(e["content"], special=e["special"], normalized=e["normalized"],
                                                  single_word=e["single_word"], lstrip=e["lstrip"], rstrip=e["rstrip"])])
    assert ref.get_vocab(with_added_tokens=True) == out.vocab()
    # a known token re-added as special keeps its id (the library marks it added)
    t2 = add_tokens(base, ["Ġcat"])
    assert t2 is base
    special_cat = read_tokenizer(zoo["b"])
    special_cat.tokenizer = dict(special_cat.tokenizer, added_tokens=special_cat.tokenizer["added_tokens"] + [
        {"id": special_cat.vocab()["Ġcat"], "content": "Ġcat", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}])
    u = union_tokenizer(base, [(base, 60), (special_cat, 60)])
    assert u.vocab()["Ġcat"] == base.vocab()["Ġcat"]
    assert tokenizers.Tokenizer.from_str(json.dumps(u.tokenizer)).get_vocab(with_added_tokens=True) == u.vocab()


def test_stripped_bpe_tokenizer_loads(zoo):
    """Stripping ordinary BPE tokens (merge results) leaves a tokenizer the library loads, with ids < vocab_size."""
    tokenizers = pytest.importorskip("tokenizers")
    from jmerge.io.errors import CheckpointError
    from jmerge.io.tokenizer import read_tokenizer, strip_tokens

    tok = read_tokenizer(zoo["a"])
    assert strip_tokens(tok, 60) is tok
    s = strip_tokens(tok, 50)
    loaded = tokenizers.Tokenizer.from_str(json.dumps(s.tokenizer))
    assert loaded.get_vocab(with_added_tokens=True) == {t: i for t, i in tok.vocab().items() if i < 50}
    assert all(i < 50 for i in loaded.encode(" ".join(CORPUS_A)).ids)
    wl = _with_model_type(tok, "WordLevel")
    with pytest.raises(CheckpointError, match="only BPE"):
        strip_tokens(wl, 50)


def _with_model_type(tok, kind):
    return dataclasses.replace(tok, tokenizer=dict(tok.tokenizer, model=dict(tok.tokenizer["model"], type=kind)))


# --------------------------------------------------------------------------------------------
# Rows in bf16: the mean as mergekit computes it


def test_bf16_mean_rows_follow_torch_bf16_arithmetic(zoo, tmp_path):
    """A token two models share but the base lacks: the base's row is their mean, in bf16 as torch computes it."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    from jmerge.io import open_checkpoint as open_ck
    from jmerge.pipeline import input_paths, plan_jobs, read_source
    from jmerge.pipeline.executor import Buffers

    root = tmp_path / "bf16"
    for k in ("a", "b", "c"):
        shutil.copytree(zoo[k], root / k)
        sd = _read(root / k)
        from safetensors.numpy import save_file
        save_file({n: v.astype(ml_dtypes.bfloat16) for n, v in sd.items()}, str(root / k / "model.safetensors"))
    cfg = {"merge_method": "linear", "base_model": str(root / "a"), "tokenizer_source": "union",
           "models": [{"model": str(root / k), "parameters": {"weight": 1.0}} for k in ("a", "b", "c")]}
    plan = parse_config(yaml.safe_dump(cfg))
    paths = input_paths(plan)
    readers = [open_ck(p) for p in paths]
    jobs = {j.out_name: j for j in plan_jobs(plan, readers, paths)}
    job = jobs["model.embed_tokens.weight"]
    from jmerge.pipeline.jobs import Rows
    arrays = [read_source(s, readers, Buffers())[0] for s in job.sources if isinstance(s, Rows)]
    assert len(arrays) == 3  # linear: the models merge directly (the base of the job is zeros)
    assert all(a.dtype == np.dtype(ml_dtypes.bfloat16) for a in arrays)
    from transformers import AutoTokenizer
    vb = AutoTokenizer.from_pretrained(str(root / "b")).get_vocab()
    vc = AutoTokenizer.from_pretrained(str(root / "c")).get_vocab()
    va = AutoTokenizer.from_pretrained(str(root / "a")).get_vocab()
    shared = sorted(t for t in vb if t in vc and t not in va and t != "<|im_end|>")
    assert shared, "fixture: b and c must share tokens a lacks"
    emb = {k: torch.from_numpy(_read(root / k)["model.embed_tokens.weight"]).to(torch.bfloat16) for k in "bc"}
    from jmerge.pipeline.vocab import build_vocabulary
    ov = build_vocabulary(plan, readers, paths)
    for t in shared:
        ref = torch.zeros(16, dtype=torch.bfloat16)
        for k, v in (("b", vb), ("c", vc)):  # config order: a, b, c
            ref = ref + emb[k][v[t]]
        ref /= 2
        i = ov.tokens.index(t)  # the base lacks the token: its row is the mean; b and c keep their own
        np.testing.assert_array_equal(arrays[0][i].astype(np.float32), ref.float().numpy())
        np.testing.assert_array_equal(arrays[1][i].astype(np.float32), emb["b"][vb[t]].float().numpy())
        np.testing.assert_array_equal(arrays[2][i].astype(np.float32), emb["c"][vc[t]].float().numpy())
    for r in readers:
        r.close()


# --------------------------------------------------------------------------------------------
# Chat templates


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
EXPECTED = {  # written from the published formats; bos "<s>", eos "</s>"
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
               "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n"
               "### Response:\n"),
    "mistral": "<s>[INST] Be brief.\n\nHi there [/INST] Hello!</s>[INST] Bye [/INST]",
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n"
               "<|assistant|>\n"),
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "phi3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
             "<|assistant|>\n"),
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_named_chat_templates_render(zoo, tmp_path, name):
    """Each name resolves to a template that renders a conversation; the written file loads with transformers."""
    from transformers import AutoTokenizer

    from jmerge.io.tokenizer import read_tokenizer, write_tokenizer

    class _Writer:
        def __init__(self, d):
            self.d = d

        def write_text(self, n, text):
            (self.d / n).write_text(text, encoding="utf-8")

        def add_file(self, src, n):
            shutil.copyfile(src, self.d / n)

    out = tmp_path / name
    out.mkdir()
    write_tokenizer(_Writer(out), read_tokenizer(zoo["a"]), chat_template=named_chat_template(name))
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    if name in EXPECTED:
        assert text == EXPECTED[name]
    assert "Hi there" in text and "Hello!" in text and "Bye" in text
    if name in ("chatml", "llama3", "zephyr", "phi3", "gemma", "alpaca", "exaone", "vicuna"):
        assert text != tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=False)


def test_chat_template_values():
    assert named_chat_template("auto") is None
    assert named_chat_template(CHATML_LITERAL) == CHATML_LITERAL  # a literal passes through
    assert named_chat_template("chatml") == CHAT_TEMPLATES["chatml"]
    assert chat_template_problem("chatml") is None
    assert "unknown chat template" in chat_template_problem("chatmll")
    assert chat_template_problem("{{ messages }}") is None  # short literals pass (mergekit wants 20 characters)
    assert "unknown chat template" in chat_template_problem("my template\nwithout braces")
    with pytest.raises(ValueError):
        named_chat_template("nope")


def test_chat_template_written_into_merge(zoo, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    cfg = _linear(zoo, ["a", "a2"], [0.5, 0.5], tokenizer_source="base", chat_template="llama3")
    out = _run_jmerge(cfg, tmp_path, "tmpl")
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["llama3"]
    text = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED["llama3"]


# --------------------------------------------------------------------------------------------
# Errors with locations


BASE = """merge_method: linear
base_model: a
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: 0.5}
"""


@pytest.mark.parametrize("extra, where, words", [
    ("tokenizer:\n  source: union\n  tokenz: {}\n", ":10:3:", "unknown field 'tokenz'"),
    ("tokenizer:\n  tokens:\n    <x>:\n      source: {kind: mean}\n", ":11:22:", "unknown token source kind"),
    ("tokenizer:\n  tokens:\n    <x>:\n      source: {kind: model_token, model: b}\n", ":11:15:", "exactly one of"),
    ("tokenizer:\n  tokens:\n    <x>:\n      source: zz\n", ":11:15:", "not a model of this config"),
    ("tokenizer:\n  tokens:\n    <x>:\n      force: true\n", ":11:14:", "needs a `source`"),
    ("tokenizer:\n  tokens:\n    <x>:\n      force: sometimes\n      source: a\n", ":11:14:", "valid boolean"),
    ("tokenizer:\n  pad_to_multiple_of: -8\n", ":9:23:", "positive integer"),
    ("tokenizer:\n  pad_to_multiple_of: 7.5\n", ":9:23:", "fractional"),
    ("tokenizer_source: union\ntokenizer: {source: base}\n", ":9:1:", "not both"),
    ("chat_template: chatmlx\n", ":8:16:", "unknown chat template"),
])
def test_bad_tokenizer_blocks_are_located(extra, where, words):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + extra, source="cfg.yml")
    msg = str(e.value)
    assert msg.startswith("cfg.yml" + where) and words in msg, msg


def test_good_tokenizer_block_parses():
    p = parse_config(BASE + "tokenizer:\n  pad_to_multiple_of: '64'\n  tokens:\n    <x>: {source: {kind: zero}}\n"
                     "    <y>:\n      source: {kind: model_token, model: b, token_id: 3}\n      force: 'yes'\n"
                     "    <z>:\n", source="cfg.yml")
    t = p.config.tokenizer
    assert t.source == "union" and t.pad_to_multiple_of == 64
    assert t.tokens["<x>"].source.kind == "zero" and t.tokens["<y>"].force and t.tokens["<y>"].source.token_id == 3
    assert t.tokens["<z>"].source is None and not t.tokens["<z>"].force


def test_token_missing_without_source_is_a_located_error(zoo, tmp_path):
    """A configured token some model lacks needs a source; the error names its YAML line; nothing is written."""
    cfg = _linear(zoo, ["a", "b"], [0.5, 0.5])
    cfg["tokenizer"] = {"source": "union", "tokens": {"<|im_start|>": {}}}
    p = tmp_path / "bad.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "never"
    assert main(["merge", str(p), str(out), "--quiet"]) != 0
    assert not out.exists()
    from jmerge.mergekit import load_config
    from jmerge.pipeline import run_merge
    with pytest.raises(MergeInputError) as e:  # ConfigError, or wrapped by the pre-read validation
        run_merge(load_config(str(p)), str(out), quiet=True)
    msg = str(e.value)
    assert f"{p}:" in msg and "tokenizer.tokens.<|im_start|>" in msg and "missing from model" in msg, msg
    assert not out.exists()


def test_model_token_outside_rows_is_an_error(zoo, tmp_path):
    cfg = _linear(zoo, ["a", "b"], [0.5, 0.5])
    cfg["tokenizer"] = {"tokens": {"<q>": {"source": {"kind": "model_token", "model": zoo["b"], "token_id": 999}}}}
    from jmerge.mergekit import load_config
    from jmerge.pipeline import run_merge

    p = tmp_path / "bad2.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(MergeInputError) as e:  # ConfigError, or wrapped by the pre-read validation
        run_merge(load_config(str(p)), str(tmp_path / "o"), quiet=True)
    assert "token_id 999 is outside" in str(e.value) and f"{p}:" in str(e.value)
    assert not (tmp_path / "o").exists()
