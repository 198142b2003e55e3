"""Text for the language models: a checkpoint's tokenizer, documents and prompt/answer records from files, and
right-padded token batches whose shapes come from a few buckets (one compile per bucket).

* :func:`load_tokenizer` reads a checkpoint's ``tokenizer.json`` with the ``tokenizers`` package (extra
  ``jmerge[lm]``; imported when first needed).
* :func:`read_lines`, :func:`read_jsonl`, :func:`read_documents`: one document per non-empty line of a text
  file, or JSONL records with named string fields (errors name ``file:line`` and the field).
* :func:`encode_texts`, :func:`encode_pair`: token ids. Special tokens follow the tokenizer's own
  post-processor -- ``tokenizer.encode(text)`` with ``add_special_tokens=True``, what transformers'
  ``tokenizer(text)`` gives -- so a tokenizer whose template adds ``<s>`` (Llama 2, Mistral, Gemma) gets a BOS
  and one without (Qwen2, GPT-2) gets none.
* :func:`make_batches`: :class:`TokenBatch` es of ``batch_size`` rows (short batches filled with empty rows),
  sequences sorted by length, lengths padded to the next power of two (capped at ``max_length``).

References: Hugging Face ``tokenizers`` (``Tokenizer.from_file``, ``TemplateProcessing``); Hugging Face
transformers ``PreTrainedTokenizerFast.__call__`` (``add_special_tokens=True``, right padding,
``attention_mask``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["TextDataError", "TokenBatch", "load_tokenizer", "read_lines", "read_jsonl", "read_documents",
           "encode_texts", "encode_pair", "bucket_length", "make_batches"]


class TextDataError(ValueError):
    """Unusable text input: a missing or malformed file, a record without a field, text with no tokens.

    References: none (infrastructure).
    """


class TokenBatch(NamedTuple):
    """One batch of right-padded sequences.

    Attributes:
      ids: ``[B, L]`` int32 token ids (padding is ``pad_id``).
      mask: ``[B, L]`` int32, 1 for tokens, 0 for padding (the model's ``attention_mask``).
      loss_mask: ``[B, L]`` int32, 1 where the token at that position is scored (predicted from the tokens
        before it): positions ``start .. len-1`` of each sequence. Position 0 is never predicted.
      rows: ``[B]`` int64, the index of each row's sequence in the input list, -1 for filler rows.

    References: Hugging Face transformers (``input_ids``, ``attention_mask``; labels -100 where not scored).
    """

    ids: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray
    rows: np.ndarray


def load_tokenizer(ckpt: str | os.PathLike) -> Any:
    """The fast tokenizer of a checkpoint directory, from its ``tokenizer.json``.

    Args:
      ckpt: a Hugging Face model directory.

    Returns:
      A ``tokenizers.Tokenizer``.

    Raises:
      ImportError: the ``tokenizers`` package is not installed (``pip install 'jmerge[lm]'``).
      TextDataError: the directory has no ``tokenizer.json`` (or it does not parse).

    References: Hugging Face ``tokenizers`` (``Tokenizer.from_file``).
    """
    try:
        import tokenizers  # noqa: PLC0415
    except ImportError:
        raise ImportError("tokenising text needs the tokenizers package: pip install 'jmerge[lm]' "
                          "(or pip install tokenizers)") from None
    path = os.path.join(os.fspath(ckpt), "tokenizer.json")
    if not os.path.isfile(path):
        raise TextDataError(f"{ckpt}: no tokenizer.json; the checkpoint's fast tokenizer is needed to tokenise text "
                            "(copy tokenizer.json from the model it was made from)")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise TextDataError(f"{path}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else e!r})") from None


def _open(path: str | os.PathLike, what: str):
    if not os.path.isfile(path):
        raise TextDataError(f"{path}: no such {what} file")
    return open(path, encoding="utf-8")


def read_lines(path: str | os.PathLike) -> list[str]:
    """The documents of a text file: one per non-empty line, stripped of surrounding whitespace.

    Args:
      path: a UTF-8 text file.

    Returns:
      The documents, in file order.

    Raises:
      TextDataError: the file does not exist.

    References: none (file format).
    """
    with _open(path, "text") as f:
        return [line.strip() for line in f if line.strip()]


def read_jsonl(path: str | os.PathLike, fields: Sequence[str], *, optional: Sequence[str] = ()) -> list[dict]:
    """The records of a JSONL file (blank lines skipped), each required to hold string ``fields``.

    Args:
      path: a UTF-8 JSONL file, one JSON object per line.
      fields: names of fields every record must hold as strings.
      optional: names of fields a record may hold (any JSON scalar; converted with ``str``).

    Returns:
      One dict per record with exactly ``fields`` and the present ``optional`` fields.

    Raises:
      TextDataError: the file does not exist, a line is not a JSON object, or a record lacks a field (the
        message names ``file:line``, the field and the record's fields).

    References: the JSON Lines format (jsonlines.org).
    """
    out = []
    with _open(path, "JSONL") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextDataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise TextDataError(f"{path}:{n}: a JSONL record must be an object, got {type(rec).__name__}")
            for k in fields:
                if not isinstance(rec.get(k), str):
                    has = ", ".join(map(repr, rec)) or "none"
                    why = "no" if k not in rec else "a non-string"
                    raise TextDataError(f"{path}:{n}: {why} field {k!r} (the record's fields: {has}); "
                                        "name the field that holds it")
            out.append({k: rec[k] for k in fields} | {k: str(rec[k]) for k in optional if rec.get(k) is not None})
    return out


def read_documents(text: str | os.PathLike | None = None, jsonl: str | os.PathLike | None = None, *,
                   text_field: str = "text", task_field: str | None = None) -> dict[str, list[str]]:
    """Documents grouped by task from a text file (one per non-empty line) and/or a JSONL file.

    Args:
      text: a text file (its documents have task ``""``), or None.
      jsonl: a JSONL file with a string ``text_field`` per record, or None.
      text_field: the JSONL field holding the text.
      task_field: the JSONL field naming a record's task (absent: task ``""``); None: no tasks.

    Returns:
      ``{task: [document]}`` in order of first appearance.

    Raises:
      TextDataError: a bad file or record, or no document at all.

    References: none (file formats).
    """
    docs: dict[str, list[str]] = {}
    if text:
        docs.setdefault("", []).extend(read_lines(text))
    if jsonl:
        for rec in read_jsonl(jsonl, [text_field], optional=[task_field] if task_field else []):
            docs.setdefault(rec.get(task_field, "") if task_field else "", []).append(rec[text_field])
    docs = {k: [d for d in v if d.strip()] for k, v in docs.items()}
    docs = {k: v for k, v in docs.items() if v}
    if not docs:
        where = " and ".join(os.fspath(f) for f in (text, jsonl) if f) or "no file given"
        raise TextDataError(f"{where}: no text (no non-empty line or document); give a file with documents")
    return docs


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text, with the special tokens the tokenizer's post-processor adds (BOS or not).

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (:func:`load_tokenizer`).
      texts: the documents.
      max_length: keep at most this many tokens of each (the first ones); one warning says how many texts
        were cut. None: no limit.

    Returns:
      One list of ids per text (possibly empty).

    References: Hugging Face ``tokenizers`` ``Tokenizer.encode_batch`` (``add_special_tokens=True``).
    """
    seqs = [list(e.ids) for e in tokenizer.encode_batch(list(texts))] if texts else []
    if max_length is not None:
        long = sum(len(s) > max_length for s in seqs)
        if long:
            warnings.warn(f"{long} of {len(seqs)} texts are longer than {max_length} tokens and were truncated",
                          UserWarning, stacklevel=2)
        seqs = [s[:max_length] for s in seqs]
    return seqs


def _template_split(tokenizer: Any, text: str) -> tuple[list[int], list[int], list[int]]:
    """``(prefix, ids, suffix)``: the post-processor's tokens before and after ``text``'s own tokens."""
    raw = list(tokenizer.encode(text, add_special_tokens=False).ids)
    full = list(tokenizer.encode(text).ids)
    n = len(raw)
    for k in range(len(full) - n + 1):  # a template only adds tokens around the text
        if full[k:k + n] == raw:
            return full[:k], raw, full[k + n:]
    return [], raw, []  # a post-processor that rewrites the text's tokens: take them as they are


def encode_pair(tokenizer: Any, prompt: str, answer: str, *, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of a prompt followed by its answer, and where the answer starts.

    The sequence is the post-processor's leading special tokens (BOS where the tokenizer adds one), the
    prompt's own tokens, then the answer's own tokens: each text is tokenised on its own
    (``add_special_tokens=False``) and the ids are concatenated, so the answer's tokens are exactly
    ``encode(answer)``'s and the boundary is exact (tokenising ``prompt + answer`` as one string could merge
    characters across the boundary, and cutting it at ``len(encode(prompt))`` would then score the wrong
    tokens). Tokens the post-processor appends after a text (an EOS) are left out: under causal attention
    they cannot change the answer's loss. Whitespace between prompt and answer belongs in one of the two
    strings, where the tokenizer expects it (``"Q: ...\\nA:"`` and ``" 42"`` for a byte-level BPE).

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      prompt: the context (may be empty).
      answer: the continuation to score.
      max_length: longest sequence: a longer one loses prompt tokens from the prompt's start (the BOS
        stays), then answer tokens from its end. None: no limit.

    Returns:
      ``(ids, start)``: the ids, and the index of the answer's first token.

    References: Hugging Face transformers' supervised fine-tuning recipe (prompt and answer tokenised
    separately, prompt labels set to -100); ``tokenizers`` ``TemplateProcessing``.
    """
    prefix, p, _ = _template_split(tokenizer, prompt)
    a = list(tokenizer.encode(answer, add_special_tokens=False).ids)
    if not p and a:  # a prompt with no tokens cannot place the template: read the prefix off the answer's
        prefix = _template_split(tokenizer, answer)[0]
    if max_length is not None:
        over = len(prefix) + len(p) + len(a) - max_length
        p = p[max(over, 0):]
        ids = (prefix + p + a)[:max_length]
        return ids, min(len(prefix) + len(p), len(ids))
    return prefix + p + a, len(prefix) + len(p)


def bucket_length(n: int, *, max_length: int | None = None, minimum: int = 8) -> int:
    """The padded length of a batch whose longest sequence has ``n`` tokens: the next power of two
    (at least ``minimum``), capped at ``max_length`` (itself used when ``n`` fits).

    References: none (padding to a few shapes so each compiles once).
    """
    b = max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())
    return max(int(n), min(b, int(max_length))) if max_length else b


def make_batches(seqs: Sequence[Sequence[int]], batch_size: int, *, starts: Sequence[int] | None = None,
                 max_length: int | None = None, pad_id: int = 0, sort: bool = True, bucket: bool = True,
                 fill: bool = True, vocab_size: int | None = None) -> list[TokenBatch]:
    """Right-padded batches of token sequences, in few shapes.

    Args:
      seqs: token ids per sequence (empty sequences are kept as rows that score nothing).
      batch_size: rows per batch.
      starts: per sequence, the first scored position (:func:`encode_pair`'s ``start``); None: every
        predicted token (positions 1 on).
      max_length: cap of the padded length (sequences must already fit; see :func:`encode_texts`).
      pad_id: the id written in padding (never attended to nor scored).
      sort: order sequences by length (longest first) so batches hold similar lengths; ``rows`` maps back.
      bucket: pad lengths to :func:`bucket_length` (a power of two); False: to the batch's longest.
      fill: give every batch ``batch_size`` rows (filler rows have mask 0 and ``rows`` -1).
      vocab_size: if given, every id must be below it.

    Returns:
      The :class:`TokenBatch` es; with ``bucket`` and ``fill`` their shapes are ``(batch_size, 2**k)``
      (or ``max_length``), so a jitted function compiles once per length bucket.

    Raises:
      TextDataError: no sequence, a sequence longer than ``max_length``, or an id outside the vocabulary.

    References: Hugging Face transformers ``DataCollatorWithPadding`` (right padding, attention mask).
    """
    if batch_size < 1:
        raise TextDataError(f"batch size {batch_size} must be at least 1")
    seqs = [list(s) for s in seqs]
    if not any(seqs):
        raise TextDataError("the text tokenises to nothing")
    starts = [0] * len(seqs) if starts is None else [int(s) for s in starts]
    if len(starts) != len(seqs):
        raise TextDataError(f"{len(starts)} starts for {len(seqs)} sequences")
    longest = max(len(s) for s in seqs)
    if max_length is not None and longest > max_length:
        raise TextDataError(f"a sequence of {longest} tokens is longer than max_length={max_length}; truncate it")
    if vocab_size is not None:
        top = max((max(s) for s in seqs if s), default=0)
        low = min((min(s) for s in seqs if s), default=0)
        if top >= vocab_size or low < 0:
            raise TextDataError(f"token id {top if top >= vocab_size else low} from the tokenizer is outside the "
                                f"model's vocabulary ({vocab_size}); use the tokenizer of this checkpoint")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) if sort else list(range(len(seqs)))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        n = max(max(len(seqs[j]) for j in chunk), 1)
        length = bucket_length(n, max_length=max_length) if bucket else n
        rows = batch_size if fill else len(chunk)
        ids = np.full((rows, length), pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        loss = np.zeros((rows, length), np.int32)
        index = np.full((rows,), -1, np.int64)
        for r, j in enumerate(chunk):
            s = seqs[j]
            ids[r, :len(s)], mask[r, :len(s)], index[r] = s, 1, j
            loss[r, max(starts[j], 1):len(s)] = 1
        out.append(TokenBatch(ids, mask, loss, index))
    return out
