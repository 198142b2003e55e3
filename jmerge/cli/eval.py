"""``jmerge eval``: perplexity of a checkpoint on text, or its per-task answer loss on prompt/answer records,
with the JAX forward (:mod:`jmerge.models`).

    jmerge eval CKPT --text FILE [--batch-size 8] [--max-length 512] [--dtype float32|bfloat16] [--out R.jsonl]
    jmerge eval CKPT --jsonl FILE [--prompt-field prompt --answer-field answer --task-field task] ...

``--text``: one document per non-empty line; prints the token-weighted perplexity. ``--jsonl``: records with a
prompt and an answer (and optionally a task); prints the mean NLL of the answer tokens per task. Text is
tokenised with the checkpoint's ``tokenizer.json`` (BOS as its post-processor adds it). ``--out`` writes the
results as JSONL (one line per task). A progress line goes to stderr.

References: Hugging Face transformers ``ForCausalLMLoss`` and "Perplexity of fixed-length models".
"""

from __future__ import annotations

import json
import os
import sys
import time

from .common import fail

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file, or per-task answer loss on a prompt/answer JSONL")
    p.add_argument("ckpt", help="a Hugging Face model directory with tokenizer.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text file, one document per non-empty line: perplexity")
    src.add_argument("--jsonl", help="a JSONL file of prompt/answer records: loss of the answers, per task")
    p.add_argument("--prompt-field", default="prompt", help="JSONL field of the prompt (default: prompt)")
    p.add_argument("--answer-field", default="answer", help="JSONL field of the answer (default: answer)")
    p.add_argument("--task-field", default="task", help="JSONL field naming the task (default: task; "
                                                         "records without it form task '')")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence at most (default: 512)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and activation dtype (default: float32; losses are float32 either way)")
    p.add_argument("--out", help="write the results as JSONL to this file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run)


class _Bar:
    """Tokens done / total and the rate on one stderr line (redrawn on a terminal; one line at the end otherwise)."""

    def __init__(self, disable: bool):
        self.disable, self.t0, self.stream = disable, time.perf_counter(), sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.line = ""

    def __call__(self, done: int, total: int | None) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        of = f"/{total}" if total else ""
        pct = f"{100 * done / total:5.1f}% " if total else ""
        self.line = f"eval {pct}{done}{of} tokens, {done / dt:,.0f} tokens/s, {dt:.1f} s"
        if self.tty and not self.disable:
            self.stream.write("\r\033[K" + self.line)
            self.stream.flush()

    def close(self) -> None:
        if not self.disable and self.line:
            self.stream.write(("\r\033[K" if self.tty else "") + self.line + "\n")
            self.stream.flush()
        self.line = ""

    def end_line(self) -> None:
        """After an error: end a drawn line so the error message starts on its own."""
        if self.tty and not self.disable and self.line:
            self.stream.write("\n")
        self.line = ""


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(a) -> int:
    from ..io import CheckpointError  # noqa: PLC0415
    from ..models.text import TextDataError  # noqa: PLC0415
    try:
        if a.batch_size < 1 or a.max_length < 2:
            raise TextDataError("--batch-size must be at least 1 and --max-length at least 2")
        if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
            raise TextDataError(f"--out {a.out}: its directory does not exist")
        return _run(a)
    except CheckpointError as e:
        return fail(str(e), 1)
    except (TextDataError, ValueError, ImportError) as e:  # ImportError: the tokenizers package
        return fail(str(e), 2)
    except OSError as e:
        return fail(str(e), 1)


def _run(a) -> int:
    import jax.numpy as jnp  # noqa: PLC0415
    from ..models import load_model, perplexity, task_losses  # noqa: PLC0415
    from ..models.text import encode_texts, load_tokenizer, make_batches, read_jsonl, read_lines  # noqa: PLC0415
    from ..models.text import TextDataError  # noqa: PLC0415
    if not os.path.isdir(a.ckpt):
        from ..io import CheckpointNotFoundError  # noqa: PLC0415
        raise CheckpointNotFoundError(f"{a.ckpt}: no such checkpoint directory")
    if a.text:  # read and tokenise everything before loading the model: bad input fails fast
        docs = read_lines(a.text)
        if not docs:
            raise TextDataError(f"{a.text}: no text (every line is empty); give one document per line")
        records = None
    else:
        records = read_jsonl(a.jsonl, [a.prompt_field, a.answer_field], optional=[a.task_field])
        if not records:
            raise TextDataError(f"{a.jsonl}: no records; give one JSON object per line")
    tok = load_tokenizer(a.ckpt)
    model = load_model(a.ckpt, jnp.dtype(a.dtype))
    bar = _Bar(a.quiet)
    try:
        if records is None:
            batches = make_batches(encode_texts(tok, docs, max_length=a.max_length), a.batch_size,
                                   max_length=a.max_length, vocab_size=model.config.vocab_size)
            r = perplexity(model, batches, progress=bar)
            bar.close()
            print(f"perplexity {r.perplexity:.4f} (mean NLL {r.nll:.6f} nats per token, {r.tokens} tokens, "
                  f"{r.sequences} documents)")
            rows = [{"checkpoint": a.ckpt, "text": a.text, "nll": r.nll, "perplexity": r.perplexity,
                     "tokens": r.tokens, "documents": r.sequences}]
        else:
            res = task_losses(model, tok, records, a.prompt_field, a.answer_field, a.task_field,
                              batch_size=a.batch_size, max_length=a.max_length, progress=bar)
            bar.close()
            width = max([4] + [len(t) for t in res])
            print(f"{'task':<{width}} {'examples':>8} {'tokens':>8} {'loss':>10} {'perplexity':>12}")
            for t, v in res.items():
                print(f"{t or '-':<{width}} {v.examples:>8d} {v.tokens:>8d} {v.loss:>10.6f} {v.perplexity:>12.4f}")
            rows = [{"checkpoint": a.ckpt, "task": t, "loss": v.loss, "perplexity": v.perplexity,
                     "tokens": v.tokens, "examples": v.examples} for t, v in res.items()]
    finally:
        bar.end_line()
    if a.out:
        _write_jsonl(a.out, rows)
        print(f"wrote {a.out}")
    return 0
