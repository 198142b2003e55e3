"""LM evaluation (jmerge.models.evaluate, jmerge.models.text, `jmerge eval`): per-token NLL against a NumPy
log-softmax of the model's logits and against transformers' `model(ids, labels=ids).loss` (Llama, Mixtral);
padding and batching do not change results; answer-only task loss against NumPy and against transformers with
the prompt's labels at -100; special tokens follow tokenizer.json's post-processor (as transformers'
tokenizer); one compile per length bucket, none per model; CLI output and one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge.models as jm
from jmerge.cli import main
from jmerge.models import evaluate as ev
from jmerge.models import text as tx

pytest.importorskip("tokenizers")

ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch")
LLAMA = os.path.join(ARCH, "llama", "base")
MIXTRAL = os.path.join(ARCH, "mixtral", "base")
DOCS = ["the cat sat on the mat", "the dog ran in the park and the cat sat", "a model merges task vectors",
        "ties trims and elects signs", "merging", "jax compiles once per shape and the model merges weights"]
RECORDS = [
    {"prompt": "the cat sat on", "answer": "the mat", "task": "cats"},
    {"prompt": "the dog ran in the", "answer": "park", "task": "dogs"},
    {"prompt": "ties", "answer": "trims and elects signs", "task": "merging"},
    {"prompt": "the cat", "answer": "sat on the mat and the dog ran", "task": "cats"},
    {"prompt": "a model merges", "answer": "task vectors", "task": "merging"},
]


def _rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def _np_nll(logits, ids):
    """``-log softmax(logits[t-1])[ids[t]]`` for t >= 1, in float64 (one unpadded sequence)."""
    lg = np.asarray(logits, np.float64)[:-1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return lse - lg[np.arange(len(ids) - 1), np.asarray(ids)[1:]]


@pytest.fixture(scope="module")
def llama():
    return jm.load_model(LLAMA, jnp.float32)


@pytest.fixture(scope="module")
def tok():
    return tx.load_tokenizer(LLAMA)


def _bos_ckpt(dst):
    """The tiny Llama with a tokenizer whose post-processor adds <s> ... </s> (as Llama 2's adds <s>)."""
    shutil.copytree(LLAMA, dst)
    path = os.path.join(dst, "tokenizer.json")
    t = json.load(open(path))
    t["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    json.dump(t, open(path, "w"))
    return str(dst)


def test_token_nll_matches_numpy_log_softmax(llama, tok):
    """Right- and left-padded rows: NLL at each real target equals NumPy's log-softmax of the unpadded
    sequence's logits; padding and each row's first token score 0."""
    seqs = tx.encode_texts(tok, DOCS[:3])
    T = 12
    for side in ("right", "left"):
        ids = np.zeros((3, T), np.int32)
        mask = np.zeros((3, T), np.int32)
        for r, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[r, sl], mask[r, sl] = s, 1
        got = np.asarray(ev.token_nll(llama, jnp.asarray(ids), jnp.asarray(mask)))
        assert got.dtype == np.float32 and got.shape == (3, T)
        for r, s in enumerate(seqs):
            want = _np_nll(llama(jnp.asarray([s], jnp.int32))[0], s)
            row = got[r, :len(s)] if side == "right" else got[r, T - len(s):]
            np.testing.assert_allclose(row[1:], want, rtol=2e-5, atol=2e-5)
            assert row[0] == 0.0 and (got[r][mask[r] == 0] == 0).all()
            assert want.mean() > 1.0  # a random model: the reference is not trivially zero


@pytest.mark.parametrize("ckpt", [LLAMA, MIXTRAL])
def test_perplexity_matches_transformers_loss(ckpt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tk = jm.load_model(ckpt, jnp.float32), tx.load_tokenizer(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    seqs = tx.encode_texts(tk, DOCS)
    # one sequence: HF's model(ids, labels=ids).loss is the mean NLL of tokens 1..T-1
    s = seqs[1]
    with torch.no_grad():
        want = float(hf(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss)
    got = jm.perplexity(model, [np.asarray([s], np.int32)])
    assert got.tokens == len(s) - 1 and _rel(got.nll, want) <= 1e-5, (got.nll, want)
    # all documents, right-padded, labels -100 on padding: HF's token-weighted mean over the batch
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros_like(ids)
    for r, q in enumerate(seqs):
        ids[r, :len(q)], mask[r, :len(q)] = q, 1
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        want = float(hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels)).loss)
    got = jm.perplexity(model, tx.make_batches(seqs, 4, max_length=64))
    assert got.tokens == sum(len(q) - 1 for q in seqs) and got.sequences == len(seqs)
    assert _rel(got.nll, want) <= 1e-5 and math.isclose(got.perplexity, math.exp(want), rel_tol=1e-5)


def test_padding_and_batching_do_not_change_results(llama, tok):
    seqs = tx.encode_texts(tok, DOCS)
    one = [tx.make_batches([s], 1, bucket=False, fill=False)[0] for s in seqs]
    assert all(b.ids.shape == (1, len(s)) for b, s in zip(one, seqs))
    alone = np.array([ev.sequence_losses(llama, [b])[0][0] for b in one])
    for bs in (2, 4, 8):
        batches = tx.make_batches(seqs, bs, max_length=64)
        assert any((b.mask == 0).any() for b in batches)  # padding is there
        nll, cnt = ev.sequence_losses(llama, batches)
        np.testing.assert_array_equal(cnt, [len(s) - 1 for s in seqs])
        np.testing.assert_allclose(nll, alone, rtol=1e-5)
    p1, p8 = jm.perplexity(llama, one), jm.perplexity(llama, tx.make_batches(seqs, 8))
    assert _rel(p8.nll, p1.nll) <= 1e-6 and p8.tokens == p1.tokens


def test_one_compile_per_bucket_and_none_per_model(tok):
    """Batches are padded to (batch_size, power of two) shapes; a second model of the architecture
    (a sweep) and the (graphdef, state) form reuse the compiled function."""
    from flax import nnx
    seqs = tx.encode_texts(tok, DOCS)
    batches = tx.make_batches(seqs, 2, max_length=64)
    shapes = {b.ids.shape for b in batches}
    assert shapes <= {(2, 8), (2, 16)} and len(batches) == 3, shapes
    assert tx.bucket_length(9) == 16 and tx.bucket_length(3) == 8 and tx.bucket_length(40, max_length=48) == 48
    fn = getattr(ev, "_row_sums_jit", None)
    if fn is None or not hasattr(fn, "_cache_size"):
        pytest.skip("jax.jit cache size not inspectable")
    fn.clear_cache()
    a = jm.load_model(LLAMA, jnp.float32)
    ra = jm.perplexity(a, batches)
    assert fn._cache_size() == len(shapes)
    graphdef, state = nnx.split(jm.load_model(LLAMA, jnp.float32))
    state = jax.tree.map(lambda x: x * 1.05 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    rb = jm.perplexity((graphdef, state), batches)
    assert fn._cache_size() == len(shapes)  # other parameters: traced, no recompile
    assert abs(rb.nll - ra.nll) > 1e-4  # and they are used
    ref = jm.perplexity(nnx.merge(graphdef, state), tx.make_batches(seqs, 1, bucket=False, fill=False))
    assert _rel(rb.nll, ref.nll) <= 1e-6


def test_special_tokens_follow_the_post_processor(tmp_path, tok):
    ckpt = _bos_ckpt(tmp_path / "bos")
    btok = tx.load_tokenizer(ckpt)
    plain = tx.encode_texts(tok, DOCS[:2])
    assert tx.encode_texts(btok, DOCS[:2]) == [[1] + s + [2] for s in plain]
    # a pair: BOS, the prompt's tokens, the answer's own tokens (no EOS between or after)
    ids, start = tx.encode_pair(btok, "the cat sat on", "the mat")
    p = btok.encode("the cat sat on", add_special_tokens=False).ids
    a = btok.encode("the mat", add_special_tokens=False).ids
    assert ids == [1] + p + a and start == 1 + len(p)
    assert tx.encode_pair(btok, "", "the mat") == ([1] + a, 1)
    assert tx.encode_pair(tok, "the cat sat on", "the mat") == (p + a, len(p))
    # truncation keeps the BOS and the answer, dropping the prompt's first tokens
    assert tx.encode_pair(btok, "the cat sat on", "the mat", max_length=4) == ([1, p[-1]] + a, 2)
    transformers = pytest.importorskip("transformers")  # the same ids as transformers' tokenizer(text)
    for d in (LLAMA, ckpt):
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        assert tx.encode_texts(tx.load_tokenizer(d), DOCS) == [hf_tok(t)["input_ids"] for t in DOCS]


def _task_reference(model, tokenizer, records, max_length=512):
    """Per task: summed NumPy NLL of the answer tokens of each unpadded sequence / answer tokens."""
    acc = {}
    for r in records:
        ids, start = tx.encode_pair(tokenizer, r["prompt"], r["answer"], max_length=max_length)
        nll = _np_nll(model(jnp.asarray([ids], jnp.int32))[0], ids)[max(start, 1) - 1:]
        s = acc.setdefault(r.get("task", ""), [0.0, 0])
        s[0] += nll.sum()
        s[1] += len(nll)
    return {t: (v[0] / v[1], v[1]) for t, v in acc.items()}


@pytest.mark.parametrize("bos", [False, True])
def test_task_losses_answer_only(tmp_path, llama, bos):
    tk = tx.load_tokenizer(_bos_ckpt(tmp_path / "bos")) if bos else tx.load_tokenizer(LLAMA)
    got = jm.task_losses(llama, tk, RECORDS, batch_size=2)
    want = _task_reference(llama, tk, RECORDS)
    assert list(got) == ["cats", "dogs", "merging"]
    for t, (loss, n) in want.items():
        assert got[t].tokens == n and _rel(got[t].loss, loss) <= 1e-5, (t, got[t], loss)
    assert got["cats"].examples == 2 and got["cats"].tokens == 2 + 8
    assert math.isclose(got["dogs"].perplexity, math.exp(got["dogs"].loss))
    # the prompt is context, not scored: the whole-sequence loss differs
    whole = jm.perplexity(llama, [np.asarray([tx.encode_pair(tk, "ties", "trims and elects signs")[0]], np.int32)])
    assert abs(whole.nll - got["merging"].loss) > 1e-3
    # truncated prompts: the same reference on the truncated sequences
    short = jm.task_losses(llama, tk, RECORDS, batch_size=3, max_length=5)
    for t, (loss, n) in _task_reference(llama, tk, RECORDS, max_length=5).items():
        assert short[t].tokens == n and _rel(short[t].loss, loss) <= 1e-5
    assert short["cats"].tokens < got["cats"].tokens  # the long answer was cut


def test_task_losses_match_transformers_labels(llama, tok):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32).eval()
    got = jm.task_losses(llama, tok, RECORDS, task_field=None, batch_size=4)
    assert list(got) == [""]
    ids_all, labels_all = [], []
    for r in RECORDS:
        ids, start = tx.encode_pair(tok, r["prompt"], r["answer"])
        ids_all.append(ids)
        labels_all.append([-100] * start + ids[start:])
    T = max(map(len, ids_all))
    pad = lambda rows, v: torch.tensor([x + [v] * (T - len(x)) for x in rows])  # noqa: E731
    mask = pad([[1] * len(x) for x in ids_all], 0)
    with torch.no_grad():
        want = float(hf(input_ids=pad(ids_all, 0), attention_mask=mask, labels=pad(labels_all, -100)).loss)
    assert _rel(got[""].loss, want) <= 1e-5, (got[""].loss, want)


def test_bfloat16_model_is_close(tok):
    seqs = tx.encode_texts(tok, DOCS)
    f32 = jm.perplexity(jm.load_model(LLAMA, jnp.float32), tx.make_batches(seqs, 4))
    b16 = jm.perplexity(jm.load_model(LLAMA, jnp.bfloat16), tx.make_batches(seqs, 4))
    assert _rel(b16.nll, f32.nll) <= 2e-2 and b16.nll != f32.nll


def test_text_errors(tmp_path, tok):
    with pytest.raises(tx.TextDataError, match="no such text file"):
        tx.read_lines(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a", "reply": "b"}\n')
    with pytest.raises(tx.TextDataError, match=r"bad.jsonl:3: no field 'answer' \(the record's fields: 'prompt', "
                                               r"'reply'\)"):
        tx.read_jsonl(bad, ["prompt", "answer"])
    bad.write_text('[1, 2]\n')
    with pytest.raises(tx.TextDataError, match="bad.jsonl:1: a JSONL record must be an object"):
        tx.read_jsonl(bad, ["prompt"])
    with pytest.raises(tx.TextDataError, match="no tokenizer.json"):
        tx.load_tokenizer(tmp_path)
    with pytest.raises(tx.TextDataError, match="outside the model's vocabulary"):
        tx.make_batches([[1, 70]], 2, vocab_size=64)
    with pytest.raises(tx.TextDataError, match="longer than max_length"):
        tx.make_batches([[1, 2, 3]], 2, max_length=2)
    with pytest.raises(tx.TextDataError, match="has no token to score"):
        jm.task_losses(jm.load_model(LLAMA, jnp.float32), tok, [{"prompt": "the cat", "answer": ""}])
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than 3 tokens"):
        assert [len(s) for s in tx.encode_texts(tok, ["the cat", "the cat sat on"], max_length=3)] == [2, 3]


def test_cli_perplexity_and_out(tmp_path, capsys, llama, tok):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(DOCS[:4]) + "\n\n")
    out = tmp_path / "r.jsonl"
    assert main(["eval", LLAMA, "--text", str(text), "--batch-size", "3", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    want = jm.perplexity(llama, tx.make_batches(tx.encode_texts(tok, DOCS[:4]), 1, bucket=False, fill=False))
    # printed to 4 decimals; batches of 3 and of 1 round the float32 NLL differently (~1e-6 relative), which can
    # move the 4th decimal: compare the number, to the print's half unit plus that
    word, value = cap.out.split()[:2]
    assert word == "perplexity" and abs(float(value) - want.perplexity) <= 5e-5 + 5e-6 * want.perplexity, cap.out
    assert f"{want.tokens} tokens, 4 documents" in cap.out and "eval 100.0%" in cap.err
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["tokens"] == want.tokens and _rel(row["nll"], want.nll) <= 1e-6


def test_cli_task_table(tmp_path, capsys, llama, tok):
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"q": r["prompt"], "a": r["answer"], "kind": r["task"]}) + "\n" for r in RECORDS))
    out = tmp_path / "r.jsonl"
    assert main(["eval", LLAMA, "--jsonl", str(jl), "--prompt-field", "q", "--answer-field", "a",
                 "--task-field", "kind", "--out", str(out), "--quiet"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0].split() == ["task", "examples", "tokens", "loss", "perplexity"] and cap.err == ""
    want = _task_reference(llama, tok, RECORDS)
    rows = {json.loads(x)["task"]: json.loads(x) for x in out.read_text().splitlines()}
    assert set(rows) == set(want)
    for line in lines[1:4]:
        t, ex, n, loss, ppl = line.split()
        assert int(n) == want[t][1] == rows[t]["tokens"] and abs(float(loss) - want[t][0]) <= 2e-6
        assert _rel(rows[t]["loss"], want[t][0]) <= 1e-5 and int(ex) == rows[t]["examples"]


def test_cli_errors(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"prompt": "the cat", "response": "sat"}\n')
    notok = tmp_path / "notok"
    shutil.copytree(LLAMA, notok)
    os.remove(notok / "tokenizer.json")
    cases = [
        (["--text", str(tmp_path / "missing.txt")], 2, "missing.txt: no such text file"),
        (["--text", str(empty)], 2, "empty.txt: no text"),
        (["--jsonl", str(jl)], 2, "t.jsonl:1: no field 'answer'"),
        (["--text", str(text), "--out", str(tmp_path / "no" / "r.jsonl")], 2, "its directory does not exist"),
    ]
    for extra, code, msg in cases:
        assert main(["eval", LLAMA] + extra) == code, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (extra, err)
    assert main(["eval", str(notok), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json" in err
    assert main(["eval", str(tmp_path / "nockpt"), "--text", str(text)]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["eval", LLAMA, "--text", str(text), "--jsonl", str(jl)]) == 2  # one source only
    capsys.readouterr()
    assert not (tmp_path / "no").exists()
