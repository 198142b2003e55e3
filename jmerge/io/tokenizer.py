"""Tokenizer files edited as JSON: vocabularies, added tokens, mergekit's union, chat templates.

A Hugging Face fast tokenizer is a ``tokenizer.json`` (the model's vocabulary, merges and the list of
*added tokens*) next to a ``tokenizer_config.json``. Everything a merge changes in a tokenizer lives in
that JSON: stripping tokens the model has no embedding row for, adding tokens (the union of several
vocabularies, tokens named in a config), the chat template. This module does it on the JSON itself, so
jmerge needs neither ``tokenizers`` nor ``transformers``. Added tokens get their ids exactly as the
``tokenizers`` library assigns them when it loads the file (it re-adds the list in order: a token the
vocabulary already holds keeps its id, a new one takes the next free id after the model vocabulary
and the added tokens), so the ids written are the ids a loaded tokenizer reports.

References: the Hugging Face ``tokenizers`` serialization format (``tokenizer.json``: ``model``,
``added_tokens``) and ``transformers`` ``save_pretrained`` layout; Goddard et al., "Arcee's MergeKit: A
Toolkit for Merging Large Language Models" (EMNLP 2024 industry track) for the union vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Optional, Sequence

from .errors import CheckpointError

__all__ = ["TokenizerFiles", "read_tokenizer", "has_tokenizer_files", "strip_tokens", "union_tokenizer",
           "add_tokens", "read_chat_template", "write_tokenizer", "TOKENIZER_JSON", "TOKENIZER_CONFIG"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SLOW_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _plain_token(content: str) -> dict:
    """An added token as ``tokenizer.add_tokens("text")`` makes it: normalized, not special."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "special": False}


def _same_token(a: dict, b: dict) -> bool:
    return a.get("content") == b.get("content") and all(bool(a.get(k)) == bool(b.get(k)) for k in _FLAGS)


@dataclasses.dataclass
class TokenizerFiles:
    """One tokenizer as JSON: ``tokenizer.json``, ``tokenizer_config.json`` and the directory they came from.

    Attributes:
      dir: the directory the files were read from.
      tokenizer: the parsed ``tokenizer.json`` (never modified in place; edits return a new object).
      config: the parsed ``tokenizer_config.json`` (``{}`` when the file is absent).
      changed: whether ``tokenizer`` differs from the file in ``dir`` (stripped or tokens added).

    References: the Hugging Face ``tokenizers`` serialization format.
    """

    dir: str
    tokenizer: dict
    config: dict
    changed: bool = False

    @property
    def model_type(self) -> str:
        """The tokenization model (``BPE``, ``Unigram``, ``WordPiece``, ``WordLevel``)."""
        return str(self.tokenizer.get("model", {}).get("type", "?"))

    def model_vocab(self) -> dict[str, int]:
        """The model's own vocabulary (no added tokens), token -> id."""
        model = self.tokenizer.get("model", {})
        vocab = model.get("vocab", {})
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            return {str(p[0]): i for i, p in enumerate(vocab)}
        return {str(k): int(v) for k, v in vocab.items()}

    def added(self) -> list[dict]:
        """The added tokens (``{"id", "content", flags...}``) in file order."""
        return [dict(t) for t in self.tokenizer.get("added_tokens", [])]

    def vocab(self) -> dict[str, int]:
        """Every token with its id, added tokens included (``tokenizer.get_vocab()``)."""
        v = self.model_vocab()
        v.update({t["content"]: int(t["id"]) for t in self.added()})
        return v

    def base_vocab_size(self) -> int:
        """The model vocabulary's size without added tokens (``tokenizer.vocab_size``)."""
        return len(self.model_vocab())


def has_tokenizer_files(model_dir: str) -> bool:
    """Whether a model directory holds any tokenizer file (fast or slow).

    References: the Hugging Face ``transformers`` ``save_pretrained`` layout.
    """
    return any(os.path.isfile(os.path.join(model_dir, n)) for n in (TOKENIZER_JSON, TOKENIZER_CONFIG) + _SLOW_FILES)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tokenizer file: {e}") from None


def read_tokenizer(model_dir: str, who: str = "model") -> Optional[TokenizerFiles]:
    """Read a model directory's ``tokenizer.json`` and ``tokenizer_config.json``.

    Args:
      model_dir: the model directory.
      who: how messages name the model.

    Returns:
      The tokenizer, or None when the directory has no tokenizer file at all.

    Raises:
      CheckpointError: only slow tokenizer files (``tokenizer.model``, ``vocab.json`` ...) without a
        ``tokenizer.json``, or a file that is not valid JSON.

    References: the Hugging Face ``tokenizers`` serialization format.
    """
    tj = os.path.join(model_dir, TOKENIZER_JSON)
    if not os.path.isfile(tj):
        if has_tokenizer_files(model_dir):
            raise CheckpointError(
                f"{who} ({model_dir}) has no {TOKENIZER_JSON} (only slow tokenizer files); building a merged "
                "tokenizer needs the fast tokenizer file: save one with transformers "
                f"(AutoTokenizer.from_pretrained('{model_dir}').save_pretrained('{model_dir}')).")
        return None
    tok = _read_json(tj)
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise CheckpointError(f"{tj}: not a tokenizers JSON file (no 'model' object)")
    cp = os.path.join(model_dir, TOKENIZER_CONFIG)
    cfg = _read_json(cp) if os.path.isfile(cp) else {}
    return TokenizerFiles(model_dir, tok, cfg if isinstance(cfg, dict) else {})


def strip_tokens(tok: TokenizerFiles, vocab_size: int, who: str = "model") -> TokenizerFiles:
    """Drop the tokens whose id is ``>= vocab_size`` (the model has no embedding row for them).

    Removes them from the vocabulary, the added tokens and every BPE merge that names one (as mergekit's
    ``get_stripped_tokenizer``) or produces one (which mergekit keeps, and then fails to load). A
    tokenizer without such tokens is returned unchanged.

    Raises:
      CheckpointError: tokens must go but the tokenizer is not BPE (only BPE can be stripped).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``get_stripped_tokenizer``.
    """
    unused = {t for t, i in tok.vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    if tok.model_type != "BPE":
        raise CheckpointError(f"{who} ({tok.dir}): its tokenizer has {len(unused)} token(s) with ids >= the model's "
                              f"vocab_size {vocab_size}, and only BPE tokenizers can be stripped (this one is "
                              f"{tok.model_type}); use a tokenizer_source whose tokenizer fits the embeddings.")
    out = dict(tok.tokenizer)  # shallow: the parts changed are rebuilt, never edited in place
    out["added_tokens"] = [dict(t) for t in out.get("added_tokens", []) if int(t["id"]) < vocab_size]
    out["model"] = dict(out["model"])
    out["model"]["vocab"] = {k: v for k, v in out["model"]["vocab"].items() if k not in unused}

    prefix = out["model"].get("continuing_subword_prefix") or ""

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise CheckpointError(f"{who} ({tok.dir}): unexpected BPE merge {m!r} in {TOKENIZER_JSON}")
        a, b = parts
        merged = a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)
        # mergekit drops merges naming a stripped token; one *producing* a stripped token must go too
        # (tokenizers refuses to load a merge whose result is not in the vocabulary)
        return a not in unused and b not in unused and merged not in unused

    out["model"]["merges"] = [m for m in out["model"].get("merges", []) if keep(m)]
    return dataclasses.replace(tok, tokenizer=out, changed=True)


def _add_entries(tok: TokenizerFiles, entries: Iterable[dict]) -> TokenizerFiles:
    """Add tokens the way ``tokenizers`` does: known text keeps its id (flags updated), new text takes the next id."""
    out = dict(tok.tokenizer)  # shallow: only the added tokens change, in a new list
    added = out["added_tokens"] = [dict(t) for t in out.get("added_tokens", [])]
    model_vocab = tok.model_vocab()
    model_size = len(model_vocab)
    pos = {t["content"]: i for i, t in enumerate(added)}  # content -> position in the list
    top = max((int(t["id"]) for t in added), default=None)
    changed = tok.changed
    for e in entries:
        c = e.get("content")
        if not c or (c in pos and _same_token(added[pos[c]], e)):
            continue  # an identical added token is ignored
        if c in pos:
            new_id = int(added[pos[c]]["id"])
        elif c in model_vocab:
            new_id = model_vocab[c]
        else:
            new_id = model_size if top is None or (top < model_size and model_size) else top + 1
        special = bool(e.get("special", False))
        entry = {"id": new_id, "content": c,
                 **{k: bool(e.get(k, not special if k == "normalized" else False)) for k in _FLAGS}}
        if c in pos:
            added[pos[c]] = entry
        else:
            pos[c] = len(added)
            added.append(entry)
        top = new_id if top is None else max(top, new_id)
        changed = True
    return dataclasses.replace(tok, tokenizer=out, changed=changed)


def add_tokens(tok: TokenizerFiles, tokens: Sequence[str]) -> TokenizerFiles:
    """Add plain tokens (normalized, not special) that the tokenizer does not know yet, in order.

    References: the Hugging Face ``transformers`` ``add_tokens`` (the ``tokenizers`` added vocabulary).
    """
    known = set(tok.vocab())
    new = []
    for t in tokens:
        if t not in known:
            new.append(_plain_token(t))
            known.add(t)
    return _add_entries(tok, new) if new else tok


def union_tokenizer(base: TokenizerFiles, others: Sequence[tuple[TokenizerFiles, int]]) -> TokenizerFiles:
    """mergekit's union vocabulary: the base tokenizer plus every other token, then every added token.

    Args:
      base: the (stripped) base tokenizer; it keeps all its ids.
      others: ``(tokenizer, vocab_size)`` of every model, the base first; tokens with an id
        ``>= vocab_size`` (no embedding row) are left out.

    Returns:
      The base tokenizer with, appended in this order: each model's ordinary tokens the base lacks (as
      plain added tokens; models in order, tokens by id), then each model's added tokens the base lacks,
      with the first model's settings (base first).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``build_union_tokenizer``.
    """
    regular: dict[str, None] = {}
    special: dict[str, dict] = {}
    for tok, size in others:
        for t, i in sorted(tok.vocab().items(), key=lambda kv: kv[1]):
            if i < size:
                regular.setdefault(t)
        for t in sorted(tok.added(), key=lambda e: int(e["id"])):
            if int(t["id"]) < size:
                special.setdefault(t["content"], t)
    base_vocab = base.vocab()
    plain = [_plain_token(t) for t in regular if t not in special and t not in base_vocab]
    return _add_entries(base, plain + list(special.values()))


def read_chat_template(model_dir: str) -> Optional[str]:
    """A model's chat template as ``transformers`` loads it, or None.

    ``chat_template.jinja`` first, then ``chat_template.json``, then ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: the one named ``default``).

    References: the Hugging Face ``transformers`` chat template storage.
    """
    p = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", TOKENIZER_CONFIG):
        p = os.path.join(model_dir, name)
        if not os.path.isfile(p):
            continue
        try:
            t = _read_json(p).get("chat_template")
        except (CheckpointError, AttributeError):
            continue
        if isinstance(t, list):
            t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t
    return None


def write_tokenizer(writer: Any, tok: TokenizerFiles, *, chat_template: Optional[str] = None) -> list[str]:
    """Write a tokenizer into a writer's output (``writer.write_text`` / ``writer.add_file``).

    An unchanged tokenizer without a new chat template is copied file by file from its directory (slow
    files included). Otherwise ``tokenizer.json`` and ``tokenizer_config.json`` are written as edited
    (with ``added_tokens_decoder`` entries for added tokens when the config keeps that map), plus
    ``special_tokens_map.json`` when the source has one; ``chat_template`` (when given) goes to
    ``chat_template.jinja`` and replaces any template of the source.

    Returns:
      The names of the files written.

    References: the Hugging Face ``transformers`` ``save_pretrained`` tokenizer layout.
    """
    names: list[str] = []
    src = tok.dir
    if not tok.changed and chat_template is None:
        for n in sorted(os.listdir(src)):
            if os.path.isfile(os.path.join(src, n)) and (
                    n in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "added_tokens.json") + _SLOW_FILES
                    or n.startswith("chat_template")):
                writer.add_file(os.path.join(src, n), n)
                names.append(n)
        return names
    cfg = dict(tok.config)
    if chat_template is not None:
        cfg.pop("chat_template", None)
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        decoder = dict(decoder)
        for t in tok.added():
            decoder[str(t["id"])] = {"content": t["content"], **{k: bool(t.get(k, False)) for k in _FLAGS}}
        cfg["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    writer.write_text(TOKENIZER_JSON, json.dumps(tok.tokenizer, indent=2, ensure_ascii=False))
    writer.write_text(TOKENIZER_CONFIG, json.dumps(cfg, indent=2, ensure_ascii=False))
    names += [TOKENIZER_JSON, TOKENIZER_CONFIG]
    if os.path.isfile(os.path.join(src, SPECIAL_TOKENS_MAP)):
        writer.add_file(os.path.join(src, SPECIAL_TOKENS_MAP), SPECIAL_TOKENS_MAP)
        names.append(SPECIAL_TOKENS_MAP)
    template = chat_template if chat_template is not None else read_chat_template(src)
    if template is not None and (chat_template is not None or "chat_template" not in cfg):
        writer.write_text(CHAT_TEMPLATE_FILE, template)
        names.append(CHAT_TEMPLATE_FILE)
    return names
