"""A merged vocabulary: the output tokenizer, and embedding / LM-head rows re-indexed to it, as mergekit does.

When a config sets ``tokenizer_source`` (``union``, ``base`` or a model) or a ``tokenizer:`` block,
mergekit 0.1.5 builds an output tokenizer and re-indexes every vocabulary-indexed tensor (embeddings,
LM heads) of every input to it before the merge method runs. jmerge does the same:

* **The output tokenizer** (:func:`build_vocabulary`): the base model's tokenizer (``base_model``, else
  the config's first model) without tokens at ids ``>= vocab_size``; for ``union`` every other token of
  every model appended (ordinary tokens, then added tokens; models base first then in config order,
  tokens by id -- mergekit appends in hash order, which differs from run to run); for a model, that
  model's tokenizer; then every token named under ``tokenizer.tokens`` that is new. The vocabulary is
  padded to ``pad_to_multiple_of``.
* **Rows** (:class:`VocabRows`): per output tensor, each input's rows are its own rows of the tokens it
  has; a token a model lacks (or a ``force``d one) gets one shared row for every model: its
  ``tokens:`` source if configured (``zero``, a model's row, ``model_token``), else the only model
  that has it, else nothing (zeros, with a warning) when no model has it, else the base model's row
  when the base has it, else the mean of the models that have it (in the tensor's dtype, models in
  config order). Padding rows are each model's mean row. Then the config's method merges the
  re-indexed tensors as any other tensor. Tied heads (no ``lm_head`` on disk) use the re-indexed
  embeddings, as the planners already pair them.
* **Files** (:func:`write_tokenizer_files`): the output tokenizer (``tokenizer.json`` /
  ``tokenizer_config.json`` edited as JSON, added tokens kept), the chat template resolved
  (:mod:`jmerge.mergekit.chat_templates`; ``auto``: the template most input models use), and the new
  ``vocab_size`` for ``config.json``.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (EMNLP 2024
industry track); mergekit 0.1.5 ``tokenizer/build.py`` and ``tokenizer/embed.py``; Hewitt, "Initializing
New Word Embeddings for Pretrained Language Models" (2021) for mean-initialised padding rows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..core import MergeInputError, layer_index
from ..mergekit import MergePlan
from ..mergekit.chat_templates import AUTO, named_chat_template
from ..mergekit.tokenizer_schema import config_models, located_error
from .jobs import Copy, Merge, Rows, Tensor, TensorJob, Zeros

__all__ = ["VOCAB_TENSOR", "is_vocab_tensor", "OutputVocabulary", "VocabRows", "VocabularyPlan", "build_vocabulary",
           "vocabulary_plan", "write_tokenizer_files", "set_vocab_size", "resolve_chat_template"]

VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embed_out|lm_head|output|output_layer|"
    r"shared|vocab_projector)\.(?:weight|bias)$|(?:^|\.)predictions\.(?:decoder\.weight|bias)$")
"""Names of tensors indexed by token id along axis 0 (mergekit's ``vocabulary_axis: 0`` weights)."""


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token id along its first axis (embeddings, LM heads, their biases).

    References: mergekit 0.1.5 architecture definitions (``vocabulary_axis``).
    """
    return bool(VOCAB_TENSOR.search(name)) and layer_index(name) is None


def _config_vocab_size(cfg: Any) -> Optional[int]:
    """``vocab_size`` of a model config (or of its ``text_config``), else None."""
    for c in (cfg, (cfg or {}).get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict):
            for k in ("vocab_size", "padded_vocab_size"):
                v = c.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def set_vocab_size(cfg: dict, size: int) -> dict:
    """A copy of a model config with its vocabulary size set (``vocab_size``, or ``text_config``'s).

    References: mergekit 0.1.5 ``_update_config_vocab``.
    """
    out = dict(cfg)
    text = out.get("text_config")
    if "vocab_size" not in out and isinstance(text, dict) and "vocab_size" in text:
        out["text_config"] = {**text, "vocab_size": int(size)}
    elif "padded_vocab_size" in out and "vocab_size" not in out:
        out["padded_vocab_size"] = int(size)
    else:
        out["vocab_size"] = int(size)
    return out


# --------------------------------------------------------------------------------------------
# The config's models: names as written -> input readers and directories


class _Models:
    """Maps the config's model names (as written) to input reader indices and local directories."""

    def __init__(self, plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]):
        self.plan, self.readers, self.paths = plan, readers, list(paths)
        src = getattr(plan, "source", None)
        self.base_dir = os.path.dirname(os.path.abspath(src)) if src and os.path.isfile(src) else ""
        self._real = {}
        for i, p in enumerate(self.paths):
            if os.path.exists(p):
                self._real.setdefault(os.path.realpath(p), i)

    def _candidate(self, name: str) -> str:
        if os.path.isabs(name) or os.path.exists(name) or not self.base_dir:
            return name
        cand = os.path.join(self.base_dir, name)
        return cand if os.path.exists(cand) else name

    def reader(self, name: str) -> Optional[int]:
        """The index of the input reader of a model name, or None when it is not an input."""
        if name in self.paths:
            return self.paths.index(name)
        cand = self._candidate(name)
        if cand in self.paths:
            return self.paths.index(cand)
        return self._real.get(os.path.realpath(cand)) if os.path.exists(cand) else None

    def dir(self, name: str) -> Optional[str]:
        """A model's local directory: its reader's, the path itself, or its Hub cache snapshot."""
        i = self.reader(name)
        if i is not None:
            d = getattr(self.readers[i], "dir", "") or ""
            return d if d and os.path.isdir(d) else None
        cand = self._candidate(name)
        if os.path.isdir(cand):
            return cand
        if os.path.isfile(cand):
            return os.path.dirname(os.path.abspath(cand))
        try:
            from .. import io  # noqa: PLC0415
            d = io.resolve_model_dir(name, base_dir=self.base_dir or None, download=False)
        except Exception:  # noqa: BLE001 - not resolvable: reported by the caller
            return None
        return d if d and os.path.isdir(d) else None

    def config(self, name: str) -> Optional[dict]:
        """A model's ``config.json`` (its reader's, else read from its directory)."""
        i = self.reader(name)
        if i is not None:
            cfg = getattr(self.readers[i], "config", None)
            if isinstance(cfg, dict):
                return cfg
        d = self.dir(name)
        p = os.path.join(d, "config.json") if d else ""
        if p and os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None
        return None


# --------------------------------------------------------------------------------------------
# The output vocabulary


@dataclasses.dataclass
class OutputVocabulary:
    """The merged tokenizer and, per input reader, the row of every output token in that input.

    Attributes:
      tokenizer: the output tokenizer (:class:`jmerge.io.tokenizer.TokenizerFiles`).
      tokens: the output tokens by id.
      size: rows of the output tensors (``len(tokens)`` padded to ``pad_to_multiple_of``).
      rows: reader index -> ``int64[len(tokens)]``: the input row of each output token, -1 when the
        input's tokenizer lacks it (or has it at an id ``>= vocab_size``).
      vocabs: reader index -> that model's own tokenizer vocabulary (for ``model_token`` sources), or
        None when its tokenizer was not found (it is assumed to equal the base's).
      base: reader index of the base model (None when the base is not an input).
      rank: reader index -> position in mergekit's order of a tensor's inputs (the mean's order).
      settings: ``tokenizer.tokens`` (token -> :class:`~jmerge.mergekit.tokenizer_schema.TokenSettings`).
      names: reader index -> the model's name as the config writes it.
      index_of: every model name of the config -> its reader index (None: not an input).
      plan: the merge plan (for located errors).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``TokenizerInfo``.
    """

    tokenizer: Any
    tokens: list
    size: int
    rows: dict
    vocabs: dict
    base: Optional[int]
    rank: dict
    settings: dict
    names: dict
    index_of: dict
    plan: Any

    @property
    def n(self) -> int:
        """Number of tokens (before padding)."""
        return len(self.tokens)


def _who(name: str) -> str:
    return f"model '{name}'"


def _tokenizer_settings(plan: MergePlan) -> tuple[Optional[str], dict, Optional[int]]:
    cfg = plan.config
    block = getattr(cfg, "tokenizer", None)
    if block is not None:
        return block.source, dict(block.tokens or {}), block.pad_to_multiple_of
    return getattr(cfg, "tokenizer_source", None), {}, None


def _mergekit_order(plan: MergePlan) -> list[str]:
    """The order of a tensor's inputs in mergekit: models in config order, the base last when unlisted."""
    cfg = plan.config
    if cfg.models:
        names = [m.model for m in cfg.models]
        return list(dict.fromkeys(names + ([cfg.base_model] if cfg.base_model else [])))
    return list(dict.fromkeys(src.model for s in cfg.slices or [] for src in s.sources))


def build_vocabulary(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> Optional[OutputVocabulary]:
    """The output tokenizer of a config with ``tokenizer_source`` / ``tokenizer:``, or None without them.

    Reads only tokenizer and config files.

    Raises:
      MergeInputError: a tokenizer cannot be read or built (the message names the model and the fix).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``build_tokenizer``.
    """
    from ..io import tokenizer as tk  # noqa: PLC0415 - io is loaded when a tokenizer is built
    from ..io.errors import CheckpointError  # noqa: PLC0415
    source, settings, pad = _tokenizer_settings(plan)
    if source is None:
        return None
    models = _Models(plan, readers, paths)
    names = config_models(plan.config)
    base_name = plan.config.base_model or names[0]

    def need_dir(name: str, what: str) -> str:
        d = models.dir(name)
        if d is None:
            raise MergeInputError(f"{plan.source}: cannot find the directory of {_who(name)} to read its tokenizer "
                                  f"({what}); give a local path or a Hugging Face id that is in the cache.")
        return d

    def size_of(name: str, tok: Any) -> int:
        return _config_vocab_size(models.config(name)) or len(tok.vocab())

    try:
        base_tok = tk.read_tokenizer(need_dir(base_name, "the base tokenizer"), _who(base_name))
        if base_tok is None:
            raise MergeInputError(f"{plan.source}: {_who(base_name)} (the base of the tokenizer) has no tokenizer "
                                  f"files; add them or set tokenizer_source to a model that has them.")
        base_tok = tk.strip_tokens(base_tok, size_of(base_name, base_tok), _who(base_name))
        toks = {base_name: base_tok}
        for name in names:
            if name == base_name:
                continue
            d = models.dir(name)
            t = tk.read_tokenizer(d, _who(name)) if d is not None else None
            if t is None:
                # stacklevel 1: one location, so a merge (which builds the vocabulary twice) warns once
                warnings.warn(f"{_who(name)}: no tokenizer found; assuming it equals the base model's "
                              f"('{base_name}'), mergekit's rule for a model without tokenizer files.", stacklevel=1)
                continue
            toks[name] = t
        if source == "base":
            out = base_tok
        elif source == "union":
            out = tk.union_tokenizer(base_tok, [(t, _config_vocab_size(models.config(n)) or t.base_vocab_size())
                                                for n, t in toks.items()])
        else:
            out = tk.read_tokenizer(need_dir(source, "tokenizer_source"), _who(source))
            if out is None:
                raise MergeInputError(f"{plan.source}: tokenizer source {_who(source)} has no tokenizer files.")
        out = tk.add_tokens(out, list(settings))
    except CheckpointError as e:
        raise MergeInputError(f"{plan.source}: {e}") from None
    vocab = out.vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        if not 0 <= i < len(vocab) or tokens[i] is not None:
            raise MergeInputError(f"{plan.source}: the output tokenizer's ids are not 0..{len(vocab) - 1} (token "
                                  f"{t!r} has id {i}); its tokenizer.json cannot index embedding rows.")
        tokens[i] = t
    n = len(tokens)
    size = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    rows, vocabs, names_of, rank = {}, {}, {}, {}
    order = _mergekit_order(plan)
    for i in range(len(paths)):
        name = next((nm for nm in names if models.reader(nm) == i), None)
        if name is None:
            continue
        own = toks.get(name, base_tok)
        mv = own.vocab()
        vs = _config_vocab_size(models.config(name)) or len(mv)
        r = np.full(n, -1, np.int64)
        for t, oid in mv.items():
            j = vocab.get(t)
            if j is not None and oid < vs:
                r[j] = oid
        rows[i], vocabs[i], names_of[i] = r, (mv if name in toks else None), name
        rank[i] = order.index(name) if name in order else len(order)
    base_i = models.reader(base_name)
    return OutputVocabulary(out, tokens, size, rows, vocabs, base_i if base_i in rows else None, rank, settings,
                            names_of, {nm: models.reader(nm) for nm in names}, plan)


# --------------------------------------------------------------------------------------------
# Rows of one output tensor


def _work_dtype(plan: MergePlan, dtypes: Sequence[Any]) -> np.dtype:
    from .planners import np_dtype  # noqa: PLC0415 - planners import this module
    dt = np_dtype(plan.config.dtype)
    if dt is not None:
        return dt
    uniq = {np.dtype(d) for d in dtypes}
    return uniq.pop() if len(uniq) == 1 else np.dtype(np.float32)


class VocabRows:
    """The row group of one vocabulary-indexed output tensor: every input re-indexed to the output vocabulary.

    The fill rule of each token that some input lacks (or that is forced) is decided when the group is
    planned, so configuration problems surface before any tensor is read; the rows are gathered when
    the job runs (:class:`~jmerge.pipeline.jobs.Rows`).

    Args:
      vocab: the output vocabulary.
      name: the output tensor name (for messages).
      members: ``(reader index, source, input shape)`` of each distinct input.
      dtype: the dtype rows are gathered and filled in (the config's ``dtype``, else the inputs').

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``PermutedVocabulary``.
    """

    def __init__(self, vocab: OutputVocabulary, name: str, members: Sequence[tuple[int, Any, tuple]], dtype: Any):
        self.vocab, self.name, self.dtype = vocab, name, np.dtype(dtype)
        self.readers = [m[0] for m in members]
        self.sources = tuple(m[1] for m in members)
        self.rest = tuple(members[0][2][1:])
        self.shape = (vocab.size,) + self.rest
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}
        self._plan_rows([m[2][0] for m in members])

    # -- planning ---------------------------------------------------------------------------

    def _error(self, token: str, field: Optional[str], msg: str) -> MergeInputError:
        p = self.vocab.plan
        if token in self.vocab.settings:
            loc = ("tokenizer", "tokens", token) + ((field,) if field else ())
            return located_error(p.yaml_text, p.source, loc, f"{msg} (tensor '{self.name}')")
        return MergeInputError(f"{p.source}: tensor '{self.name}': {msg}")

    def _plan_rows(self, n_rows: Sequence[int]) -> None:
        v, K = self.vocab, len(self.readers)
        self._n_rows = list(n_rows)
        R = np.stack([v.rows[i] for i in self.readers])  # (K, n)
        for k, i in enumerate(self.readers):
            top = int(R[k].max(initial=-1))
            if top >= n_rows[k]:
                raise MergeInputError(f"tensor '{self.name}' of model '{v.names[i]}' has {n_rows[k]} rows, but its "
                                      f"tokenizer puts token {v.tokens[int(R[k].argmax())]!r} at row {top}; the "
                                      "model's vocab_size and tokenizer disagree.")
        P = R >= 0
        cnt = P.sum(axis=0)
        ids = {t: i for i, t in enumerate(v.tokens)}
        forced = np.zeros(v.n, bool)
        for tok, ts in v.settings.items():
            forced[ids[tok]] = bool(ts.force)
        need = np.flatnonzero((cnt < K) | forced)
        src_member = np.full(need.size, -1, np.int64)  # a single row: member and row
        src_row = np.full(need.size, -1, np.int64)
        mean = np.zeros(need.size, bool)
        member_of = {i: k for k, i in enumerate(self.readers)}
        base_k = member_of.get(v.base) if v.base is not None else None
        missing_everywhere = []
        for f, t in enumerate(need):
            tok = v.tokens[t]
            ts = v.settings.get(tok)
            if ts is not None:
                self._user_rule(ts, tok, t, R, P, member_of, src_member, src_row, f)
            elif cnt[t] == 1:
                k = int(np.argmax(P[:, t]))
                src_member[f], src_row[f] = k, R[k, t]
            elif cnt[t] == 0:
                missing_everywhere.append(tok)  # zeros
            elif base_k is not None and P[base_k, t]:
                src_member[f], src_row[f] = base_k, R[base_k, t]
            else:
                mean[f] = True
        if missing_everywhere:
            warnings.warn(f"tensor '{self.name}': {len(missing_everywhere)} token(s) are in no model "
                          f"({', '.join(repr(t) for t in missing_everywhere[:5])}); their rows are zero.",
                          stacklevel=3)
        self._R, self._P, self._cnt, self._forced = R, P, cnt, forced
        self._need, self._src_member, self._src_row, self._mean = need, src_member, src_row, mean
        self._order = sorted(range(K), key=lambda k: v.rank.get(self.readers[k], K))

    def _user_rule(self, ts, tok, t, R, P, member_of, src_member, src_row, f) -> None:
        v = self.vocab
        src = ts.source
        if src is None:
            lacking = [v.names[self.readers[k]] for k in range(len(self.readers)) if not P[k, t]]
            raise self._error(tok, None, f"the token is missing from model(s) {', '.join(map(repr, lacking))} and "
                              "has no `source`; give one (a model, {kind: zero} or {kind: model_token, ...}).")
        if src.kind == "zero":
            return
        k = member_of.get(v.index_of.get(src.model))
        if k is None:
            have = ", ".join(repr(v.names[i]) for i in self.readers)
            raise self._error(tok, "source", f"model {src.model!r} has no input to this tensor (its inputs: {have}); "
                              "name one of them.")
        if src.kind == "model":
            if not P[k, t]:
                raise self._error(tok, "source", f"model {src.model!r} does not have the token {tok!r}; use "
                                  "{kind: model_token, model: ..., token: ...} to take another token's row.")
            src_member[f], src_row[f] = k, R[k, t]
            return
        row = src.token_id
        if row is None:
            own = v.vocabs.get(self.readers[k])
            if own is None or src.token not in own:
                raise self._error(tok, "source", f"token {src.token!r} is not in the tokenizer of model "
                                  f"{src.model!r}.")
            row = own[src.token]
        if not 0 <= int(row) < self._n_rows[k]:
            raise self._error(tok, "source", f"token_id {row} is outside the {self._n_rows[k]} rows of model "
                              f"{src.model!r}.")
        src_member[f], src_row[f] = k, int(row)

    # -- running ----------------------------------------------------------------------------

    def _compute(self, read: Callable[[Any], tuple[np.ndarray, list]]) -> tuple[list, list]:
        raw_all, X = [], []
        for k, s in enumerate(self.sources):
            a, raw = read(s)
            raw_all += raw
            X.append(np.asarray(a).astype(self.dtype, copy=False))  # read only here: the outputs are new arrays
        dt, need, n = self.dtype, self._need, self.vocab.n
        F = np.zeros((need.size,) + self.rest, dt)
        for k in range(len(X)):
            sel = self._src_member == k
            if sel.any():
                F[sel] = X[k][self._src_row[sel]]
        if self._mean.any():
            ids = need[self._mean]
            E = np.zeros((ids.size,) + self.rest, dt)
            for k in self._order:  # mergekit: zeros, then each model's row added in turn, then / count
                has = self._P[k, ids]
                E[has] = E[has] + X[k][self._R[k, ids[has]]]
            cnt = self._cnt[ids].astype(dt).reshape((-1,) + (1,) * len(self.rest))
            F[self._mean] = E / cnt
        outs = []
        for k in range(len(X)):
            out = np.zeros(self.shape, dt)
            own = np.flatnonzero(self._P[k] & ~self._forced)
            out[own] = X[k][self._R[k, own]]
            fill = ~self._P[k, need] | self._forced[need]
            out[need[fill]] = F[fill]
            if self.vocab.size > n:  # padding rows: the model's mean row
                out[n:] = np.mean(out[:n].astype(np.float32), axis=0).astype(dt)
            outs.append(out)
        return outs, raw_all

    def take(self, member: int, read: Callable[[Any], tuple[np.ndarray, list]]) -> tuple[np.ndarray, list]:
        """Member ``member``'s re-indexed array (every member computed at the first take) and the raw buffers read.

        References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``PermutedVocabulary``.
        """
        with self._lock:
            if member in self._cache:
                out = self._cache.pop(member)
                return out, []
            outs, raw = self._compute(read)
            self._cache = {k: o for k, o in enumerate(outs) if k != member}
            return outs[member], raw


# --------------------------------------------------------------------------------------------
# Planning: the hook of plan_jobs


class _ShapeView:
    """A reader whose vocabulary tensors report the output vocabulary's row count (for planning only)."""

    def __init__(self, reader: Any, rows: Optional[int] = None, ref: Optional[Callable[[str], Optional[tuple]]] = None):
        self._r, self._rows, self._ref = reader, rows, ref

    def __getattr__(self, k: str) -> Any:
        return getattr(self._r, k)

    def __contains__(self, name: str) -> bool:
        return name in self._r

    def __len__(self) -> int:
        return len(self._r)

    def shape(self, name: str) -> tuple:
        s = tuple(self._r.shape(name))
        if not s or not is_vocab_tensor(name):
            return s
        if self._rows is not None:
            return (self._rows,) + s[1:]
        ref = self._ref(name) if self._ref is not None else None
        return ref if ref is not None and ref[1:] == s[1:] else s


@dataclasses.dataclass
class VocabularyPlan:
    """What :func:`~jmerge.pipeline.planners.plan_jobs` needs for a merged vocabulary.

    Attributes:
      vocab: the output vocabulary (None: the config builds no tokenizer, or the inputs' tokenizers are
        not available locally -- headers-only validation of remote models).
      readers: the readers to plan with (vocabulary tensors seen with the output row count).
      originals: the real readers (for dtypes and shapes).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """

    vocab: Optional[OutputVocabulary]
    readers: list
    originals: list

    def apply(self, jobs: Sequence[TensorJob]) -> list[TensorJob]:
        """The jobs with every vocabulary-indexed tensor's inputs re-indexed (:class:`VocabRows`).

        References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``PermutedVocabulary``.
        """
        if self.vocab is None:
            return list(jobs)
        return [self._job(j) if is_vocab_tensor(j.out_name) else j for j in jobs]

    def _job(self, job: TensorJob) -> TensorJob:
        v, rs = self.vocab, self.originals
        srcs = job.sources
        members: dict[int, Any] = {}
        for s in srcs:
            if isinstance(s, Tensor):
                members.setdefault(s.reader, s)
            elif not isinstance(s, Zeros):
                raise MergeInputError(f"tensor '{job.out_name}': a vocabulary tensor built from {type(s).__name__} "
                                      "sources cannot be re-indexed to the merged tokenizer.")
        if not members:
            return job
        unknown = [i for i in members if i not in v.rows]
        if unknown:
            raise MergeInputError(f"tensor '{job.out_name}': input {rs[unknown[0]].path} is not a model of the config.")
        dtype = _work_dtype(v.plan, [rs[i].dtype(s.name) for i, s in members.items()])
        shapes = {i: tuple(rs[i].shape(s.name)) for i, s in members.items()}
        group = VocabRows(v, job.out_name, [(i, s, shapes[i]) for i, s in members.items()], dtype)
        k_of = {i: k for k, i in enumerate(members)}

        def swap(s: Any) -> Any:
            if isinstance(s, Tensor):
                return Rows(group, k_of[s.reader], group.shape, group.dtype)
            if isinstance(s, Zeros):
                return Zeros(group.shape, s.dtype)
            return s

        op = job.op
        if isinstance(op, Merge):
            op = dataclasses.replace(op, base=swap(op.base), models=tuple(swap(m) for m in op.models))
        elif isinstance(op, Copy):
            op = dataclasses.replace(op, source=swap(op.source))
        return dataclasses.replace(job, shape=group.shape, op=op)


def vocabulary_plan(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> VocabularyPlan:
    """The hook of ``plan_jobs``: the readers to plan with and the rewrite of vocabulary tensors.

    Without ``tokenizer_source`` / ``tokenizer`` it changes nothing. When an input's directory is not
    available (a Hub model validated from its remote headers) the vocabulary tensors are planned with
    the first input's row count and left as they are.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    readers = list(readers)
    source, _, _ = _tokenizer_settings(plan)
    if source is None:
        return VocabularyPlan(None, readers, readers)
    if any(not (getattr(r, "dir", "") and os.path.isdir(r.dir)) for r in readers):
        first = readers[0]

        def ref(name: str) -> Optional[tuple]:
            return tuple(first.shape(name)) if name in first else None

        return VocabularyPlan(None, [_ShapeView(r, ref=ref) for r in readers], readers)
    vocab = build_vocabulary(plan, readers, paths)
    return VocabularyPlan(vocab, [_ShapeView(r, rows=vocab.size) for r in readers], readers)


# --------------------------------------------------------------------------------------------
# Output files


def resolve_chat_template(plan: MergePlan, readers: Sequence[Any], paths: Sequence[str]) -> Optional[str]:
    """The chat template to write: a named template's text, a literal, ``auto``'s choice, or None.

    ``auto`` takes the template most of the config's models use (each model's template as
    ``transformers`` loads it, stripped; ties go to the first in config order, the base first); None
    when no model has one (the tokenizer keeps its own).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``_set_chat_template``.
    """
    value = getattr(plan.config, "chat_template", None)
    if not value:
        return None
    tmpl = named_chat_template(value)
    if value != AUTO:
        return tmpl
    from ..io import tokenizer as tk  # noqa: PLC0415
    models = _Models(plan, readers, paths)
    found = []
    for name in config_models(plan.config):
        d = models.dir(name)
        t = tk.read_chat_template(d) if d else None
        if t and t.strip():
            found.append(t.strip())
    return collections.Counter(found).most_common(1)[0][0] if found else None


def write_tokenizer_files(plan: MergePlan, writer: Any, readers: Sequence[Any], copy_tokenizer: bool = True
                          ) -> Optional[int]:
    """Write the output's tokenizer files and chat template; return the new vocabulary size, if any.

    With ``tokenizer_source`` / ``tokenizer``: the built tokenizer (always, as mergekit). Otherwise,
    when ``copy_tokenizer``: the donor's (the base, else the first model) tokenizer files, with the
    config's chat template when it sets one.

    Args:
      plan: the merge plan.
      writer: the output :class:`~jmerge.io.CheckpointWriter`.
      readers: the input readers (in :func:`~jmerge.pipeline.planners.input_paths` order).
      copy_tokenizer: copy the donor's tokenizer when the config builds none.

    Returns:
      The output vocabulary size (padded) when the config builds a tokenizer, for ``config.json``.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``run_merge``.
    """
    from ..io import tokenizer as tk  # noqa: PLC0415
    from .planners import input_paths  # noqa: PLC0415
    paths = input_paths(plan)
    template = resolve_chat_template(plan, readers, paths)
    vocab = build_vocabulary(plan, readers, paths)
    if vocab is not None:
        tk.write_tokenizer(writer, vocab.tokenizer, chat_template=template)
        return vocab.size
    donor = getattr(readers[0], "dir", "") if readers else ""
    if not copy_tokenizer or not donor or not os.path.isdir(donor):
        if template is not None:
            warnings.warn("chat_template is set but no tokenizer is written (--no-copy-tokenizer); the template is "
                          "not saved.", stacklevel=2)
        return None
    tok = tk.read_tokenizer(donor) if template is not None and os.path.isfile(os.path.join(donor, tk.TOKENIZER_JSON)) \
        else None
    if tok is not None:
        tk.write_tokenizer(writer, tok, chat_template=template)
        return None
    from .. import io  # noqa: PLC0415
    names = io.copy_aux_files(donor, writer, config=False, tokenizer=True)
    if template is not None:
        for n in names:
            if n.startswith("chat_template") and n != tk.CHAT_TEMPLATE_FILE:
                warnings.warn(f"the donor's {n} is copied next to the config's chat template "
                              f"({tk.CHAT_TEMPLATE_FILE}, which transformers prefers).", stacklevel=2)
        writer.write_text(tk.CHAT_TEMPLATE_FILE, template)
    return None
