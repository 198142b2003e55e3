"""Language-model losses with the JAX forward: per-token negative log-likelihood, perplexity of documents, and
per-task loss of answers given prompts -- the LM-loss evaluator behind ``jmerge eval`` and merge sweeps.

* :func:`token_nll` is a pure, jittable function of ``(model, ids, mask)``.
* :func:`sequence_losses` runs it over :class:`~jmerge.models.text.TokenBatch` es with one jitted function
  (one compile per batch shape; :func:`~jmerge.models.text.make_batches` pads to power-of-two lengths) and
  returns the summed NLL and the scored-token count of every sequence. :func:`perplexity` and
  :func:`task_losses` are built on it.
* ``model`` is a :class:`~jmerge.models.DecoderLM` or its ``nnx.split(model)`` pair ``(graphdef, state)``:
  the parameters are traced arguments, so evaluating many models of one architecture (a sweep) reuses the
  compiled functions.

Numerics as transformers' ``ForCausalLMLoss``: logits in float32 (also for a bfloat16 model), token ``t`` is
predicted from tokens ``< t``, the mean is over scored tokens (token-weighted across sequences).

References: Jelinek et al. (1977), "Perplexity -- a measure of the difficulty of speech recognition tasks";
Hugging Face transformers ``ForCausalLMLoss`` (shifted labels, -100 ignored, float32 upcast) and its
perplexity guide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .text import TextDataError, TokenBatch, encode_pair, make_batches

__all__ = ["token_nll", "sequence_losses", "perplexity", "task_losses", "PerplexityResult", "TaskLoss"]


def _module(model: Any):
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return nnx.merge(*model)
    return model


def _split(model: Any):
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return model
    return nnx.split(model)


def _nll_valid(model: Any, ids: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    m = _module(model)
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # left or right padding
    logits = m(ids, mask, positions)[:, :-1].astype(jnp.float32)
    target = ids[:, 1:]
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    zero = jnp.zeros((ids.shape[0], 1))
    return (jnp.concatenate([zero, jnp.where(valid, nll, 0.0)], axis=1),
            jnp.concatenate([zero.astype(bool), valid], axis=1))


def token_nll(model: Any, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-token negative log-likelihood of next-token prediction.

    Args:
      model: a :class:`~jmerge.models.DecoderLM` or ``(graphdef, state)`` from ``nnx.split``.
      ids: ``[B, T]`` token ids.
      mask: ``[B, T]`` 1 for tokens, 0 for padding (left or right; rotary positions count real tokens only),
        or None.

    Returns:
      ``[B, T]`` float32: entry ``t`` is ``-log p(ids[t] | ids[<t])``, 0 where not predicted (position 0,
      padding, and a row's first real token).

    References: Hugging Face transformers ``ForCausalLMLoss`` (shift by one, float32 log-softmax).
    """
    return _nll_valid(model, ids, mask)[0]


def _row_sums(model, ids, mask, loss_mask):
    nll, valid = _nll_valid(model, ids, mask)
    w = valid & (loss_mask != 0)
    return jnp.sum(jnp.where(w, nll, 0.0), axis=1), jnp.sum(w, axis=1, dtype=jnp.int32)


_row_sums_jit = jax.jit(_row_sums)


def _as_batch(batch: Any) -> TokenBatch:
    if isinstance(batch, TokenBatch):
        return batch
    ids, mask = batch if isinstance(batch, tuple) else (batch, None)
    ids = np.asarray(ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
    return TokenBatch(ids, mask, mask, np.full((ids.shape[0],), -2, np.int64))


def sequence_losses(model: Any, batches: Iterable[Any], *,
                    progress: Callable[[int, int | None], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and scored-token count of every sequence in some batches.

    Args:
      model: a :class:`~jmerge.models.DecoderLM` or ``(graphdef, state)``.
      batches: :class:`~jmerge.models.text.TokenBatch` es (rows mapped back to their sequence index), or
        ``(ids, mask)`` pairs / ``ids`` arrays (rows numbered in order; every predicted token scored).
      progress: called after each batch as ``progress(tokens_done, tokens_total)`` (real tokens; the total
        is None when ``batches`` is not a sequence).

    Returns:
      ``(nll_sum, tokens)``: float64 and int64 arrays, one entry per sequence (by ``rows`` index).

    References: Hugging Face transformers ``ForCausalLMLoss`` (``reduction="sum"`` per sequence).
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    next_row = done = 0
    total = None
    if isinstance(batches, Sequence):
        batches = [_as_batch(b) for b in batches]
        total = sum(int(b.mask.sum()) for b in batches)
    pending = None

    def collect(item):
        nonlocal next_row
        b, (s, c) = item
        s, c = np.asarray(s, np.float64), np.asarray(c, np.int64)
        rows = b.rows
        if (rows == -2).all():  # plain arrays: number the rows in order
            rows = np.arange(next_row, next_row + len(rows))
            next_row += len(rows)
        for r, sv, cv in zip(rows, s, c):
            if r >= 0:
                sums[int(r)] = sums.get(int(r), 0.0) + float(sv)
                counts[int(r)] = counts.get(int(r), 0) + int(cv)
        nonlocal done
        done += int(np.asarray(b.mask).sum())
        if progress is not None:
            progress(done, total)

    split = _split(model)  # one pytree form for modules and split pairs: they share the compiled functions
    for batch in batches:
        b = _as_batch(batch)
        out = _row_sums_jit(split, b.ids, b.mask, b.loss_mask)  # dispatched; the previous one is read meanwhile
        if pending is not None:
            collect(pending)
        pending = (b, out)
    if pending is not None:
        collect(pending)
    n = max(sums, default=-1) + 1
    nll, tok = np.zeros(n, np.float64), np.zeros(n, np.int64)
    for r in sums:
        nll[r], tok[r] = sums[r], counts[r]
    return nll, tok


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of some documents.

    Attributes:
      nll: mean negative log-likelihood per scored token (nats).
      perplexity: ``exp(nll)``.
      tokens: scored tokens (every token after each document's first).
      sequences: documents.

    References: Jelinek et al. (1977), perplexity.
    """

    nll: float
    perplexity: float
    tokens: int
    sequences: int


def perplexity(model: Any, batches: Iterable[Any], *,
               progress: Callable[[int, int | None], None] | None = None) -> PerplexityResult:
    """Token-weighted perplexity of documents: ``exp(sum of NLL / scored tokens)`` over all of them.

    Each document is scored on its own (no context across documents); its first token (a BOS where the
    tokenizer adds one) is not predicted.

    Args:
      model: a :class:`~jmerge.models.DecoderLM` or ``(graphdef, state)``.
      batches: as :func:`sequence_losses` takes them (e.g. :func:`~jmerge.models.text.make_batches` of
        :func:`~jmerge.models.text.encode_texts`).
      progress: called after each batch as ``progress(tokens_done, tokens_total)`` (real tokens; the total
        is None when ``batches`` is not a sequence).

    Returns:
      A :class:`PerplexityResult`.

    Raises:
      TextDataError: no token is scored (every document has fewer than two tokens).

    References: Hugging Face transformers, "Perplexity of fixed-length models" (mean NLL, ``exp``).
    """
    nll, tok = sequence_losses(model, batches, progress=progress)
    total = int(tok.sum())
    if total == 0:
        raise TextDataError("no token to score: every document has fewer than two tokens")
    mean = float(nll.sum() / total)
    return PerplexityResult(mean, math.exp(mean), total, int(len(tok)))


@dataclass(frozen=True)
class TaskLoss:
    """Loss of one task's answers.

    Attributes:
      loss: mean NLL per answer token over the task's records (token-weighted, nats).
      perplexity: ``exp(loss)``.
      tokens: scored answer tokens.
      examples: records.

    References: Hugging Face transformers ``ForCausalLMLoss`` (prompt labels -100).
    """

    loss: float
    perplexity: float
    tokens: int
    examples: int


def task_losses(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], prompt_field: str = "prompt",
                answer_field: str = "answer", task_field: str | None = "task", *, batch_size: int = 8,
                max_length: int = 512,
                progress: Callable[[int, int | None], None] | None = None) -> dict[str, TaskLoss]:
    """Per-task loss of the answers given their prompts: only the answer's tokens are scored.

    Each record is tokenised by :func:`~jmerge.models.text.encode_pair` (BOS as the tokenizer's post-processor
    adds it, the prompt's tokens, then the answer's own tokens: the boundary is exact). A sequence longer
    than ``max_length`` loses prompt tokens from its start (after the BOS), then answer tokens from its end.

    Args:
      model: a :class:`~jmerge.models.DecoderLM` or ``(graphdef, state)``.
      tokenizer: a ``tokenizers.Tokenizer`` (:func:`~jmerge.models.text.load_tokenizer`).
      records: mappings holding string ``prompt_field`` and ``answer_field``.
      prompt_field: the prompt's field.
      answer_field: the answer's field.
      task_field: the field naming a record's task (missing: task ``""``); None: one task ``""``.
      batch_size: rows per batch.
      max_length: longest sequence (and padded length) in tokens.
      progress: called after each batch as ``progress(tokens_done, tokens_total)`` (real tokens; the total
        is None when ``batches`` is not a sequence).

    Returns:
      ``{task: TaskLoss}`` in order of first appearance.

    Raises:
      TextDataError: a record lacks a field, or has no answer token to score (an empty answer, or a
        one-token answer with nothing before it).

    References: Hugging Face transformers ``ForCausalLMLoss`` with the prompt's labels set to -100.
    """
    seqs, starts, tasks = [], [], []
    for n, rec in enumerate(records):
        for f in (prompt_field, answer_field):
            if not isinstance(rec.get(f), str):
                raise TextDataError(f"record {n}: no string field {f!r}; name the field that holds it")
        ids, start = encode_pair(tokenizer, rec[prompt_field], rec[answer_field], max_length=max_length)
        if len(ids) - max(start, 1) <= 0:
            raise TextDataError(f"record {n}: the answer {rec[answer_field][:40]!r} has no token to score "
                                "(empty, or one token with nothing before it)")
        seqs.append(ids)
        starts.append(start)
        tasks.append(str(rec.get(task_field, "")) if task_field and rec.get(task_field) is not None else "")
    if not seqs:
        raise TextDataError("no records")
    vocab = getattr(getattr(_module(model), "config", None), "vocab_size", None)
    batches = make_batches(seqs, batch_size, starts=starts, max_length=max_length, vocab_size=vocab)
    nll, tok = sequence_losses(model, batches, progress=progress)
    out: dict[str, list] = {}
    for t, s, c in zip(tasks, nll, tok):
        acc = out.setdefault(t, [0.0, 0, 0])
        acc[0] += float(s)
        acc[1] += int(c)
        acc[2] += 1
    return {t: TaskLoss(s / c, math.exp(s / c), c, e) for t, (s, c, e) in out.items()}

