"""Router rows of a mixture of experts built from dense models: from prompts, embeddings or noise.

For each routed (and gated shared) expert, one row per layer of the router ``mlp.gate.weight``:

* ``hidden`` / ``hidden_last``: the base model runs on the expert's prompts (each prefixed with the
  tokenizer's BOS text, no other special tokens, left-padded with BOS as padding); the row of layer ``l``
  is that layer's *input* hidden state at the last position, averaged over the prompts; the average of
  the negative prompts is subtracted and the result L2-normalised.
* ``hidden_avg``: the same with each prompt's hidden states averaged over all its positions (padding
  included, as mergekit-moe does).
* ``cheap_embed``: token embeddings (float32) summed over the prompts' tokens, normalised; negatives
  likewise, subtracted, normalised again; the same row for every layer.
* ``random``: standard normal; ``uniform_random``: uniform on ``±1/sqrt(hidden)`` (``torch.nn.Linear``'s
  initialisation); keyed by the seed and the router's tensor name.

mergekit-moe runs the base model in bfloat16 and makes the averages, differences and norms in bfloat16
too; ``dtype="bfloat16"`` (the default) reproduces that (every reduction rounded to bfloat16 where torch
rounds), ``dtype="float32"`` computes everything in float32.

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) and mergekit-moe's
``router.py`` (read for behaviour); Jiang et al. (2024), "Mixtral of Experts" (the router).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from ..core import MergeInputError, leaf_key

__all__ = ["PROMPT_MODES", "PromptTokenizer", "load_prompt_tokenizer", "gate_vectors", "prompt_vectors"]

#: Gate modes that read prompts (and need the base's tokenizer).
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


class PromptTokenizer:
    """Tokenises prompts as mergekit-moe does: ``bos_text + prompt``, no added special tokens, left padding.

    Attributes:
      bos_text: the BOS token's text ("" when the tokenizer has none).
      pad_id: padding id (BOS, else EOS, else 0).

    References: mergekit-moe ``tokenize_prompts`` (behaviour); Hugging Face ``tokenizers``.
    """

    def __init__(self, tokenizer: Any, bos_text: str, pad_id: int):
        """Wrap a ``tokenizers.Tokenizer``.

        Args:
          tokenizer: the ``tokenizers.Tokenizer``.
          bos_text: the BOS token text, or "".
          pad_id: the padding id.

        References: Hugging Face ``tokenizers``.
        """
        self.tokenizer, self.bos_text, self.pad_id = tokenizer, bos_text, int(pad_id)

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def batch(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` ``[B, T]`` int32, left-padded, each row ``bos_text + prompt``."""
        seqs = [self.ids(self.bos_text + p) for p in prompts]
        t = max(len(s) for s in seqs)
        ids = np.full((len(seqs), t), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for r, s in enumerate(seqs):
            if s:
                ids[r, t - len(s):], mask[r, t - len(s):] = s, 1
        return ids, mask


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def load_prompt_tokenizer(model_dir: str) -> PromptTokenizer:
    """The tokenizer of a model directory (``tokenizer.json`` + ``tokenizer_config.json``) for prompts.

    Args:
      model_dir: a Hugging Face model directory.

    Returns:
      A :class:`PromptTokenizer`.

    Raises:
      MergeInputError: no ``tokenizer.json`` there, or the ``tokenizers`` package is missing.

    References: Hugging Face ``tokenizers`` and ``tokenizer_config.json`` (``bos_token``, ``eos_token``).
    """
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise MergeInputError(f"{model_dir}: no tokenizer.json")
    try:
        import tokenizers  # noqa: PLC0415
    except ImportError:
        raise MergeInputError("tokenising prompts needs the tokenizers package: pip install 'jmerge[lm]'") from None
    tok = tokenizers.Tokenizer.from_file(path)
    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        p = os.path.join(model_dir, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                special.update({k: v for k, v in json.load(f).items() if k in ("bos_token", "eos_token")})
    bos, eos = _token_text(special.get("bos_token")), _token_text(special.get("eos_token"))
    pad = next((tok.token_to_id(t) for t in (bos, eos) if t is not None and tok.token_to_id(t) is not None), 0)
    return PromptTokenizer(tok, bos or "", pad)


def _rounder(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    if dtype == "float32":
        return lambda x: np.asarray(x, np.float32)
    import ml_dtypes  # noqa: PLC0415
    return lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _normalize(x: np.ndarray, r: Callable) -> np.ndarray:
    n = r(np.sqrt(np.sum(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)))
    return r(x / np.maximum(n, np.float32(1e-8)))


def prompt_vectors(mode: str, model: Any, embed: np.ndarray | None, tokenizer: PromptTokenizer,
                   prompts: Sequence[str], num_layers: int, dtype: str = "bfloat16",
                   forward: Callable | None = None) -> np.ndarray:
    """``[num_layers, hidden]``: one prompt set's vector per layer (before the positive/negative combination).

    Args:
      mode: a gate mode of :data:`PROMPT_MODES`.
      model: the base :class:`~jmerge.models.DecoderLM` (``hidden*`` modes) or None.
      embed: the base's embedding matrix (``cheap_embed``) or None.
      tokenizer: the :class:`PromptTokenizer`.
      prompts: the texts.
      num_layers: the base's layer count.
      dtype: ``"bfloat16"`` (mergekit's rounding) or ``"float32"``.
      forward: ``(model, ids, mask, position_ids) -> hidden states`` (a jitted forward), default a fresh one.

    Returns:
      float32 array (bfloat16 values in ``"bfloat16"`` hidden modes).

    References: mergekit-moe ``get_hidden_states`` / ``get_cheap_embedding`` (behaviour).
    """
    ids, mask = tokenizer.batch(prompts)
    if mode == "cheap_embed":
        h = np.asarray(embed, np.float32)[ids] * mask[..., None].astype(np.float32)
        v = h.sum(axis=1, dtype=np.float32).sum(axis=0, keepdims=True, dtype=np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), np.float32(1e-8))
        return np.repeat(v.astype(np.float32), num_layers, axis=0)
    r = _rounder(dtype)
    b, t = ids.shape
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    if mode != "hidden_avg":
        # Only the last position is read: pad the batch to power-of-two sizes (fewer compiles) with extra
        # left padding and fully padded rows, and shift the positions so that every real token keeps the
        # position it has in mergekit's layout (the result is unchanged).
        bb, tt = _bucket(b), _bucket(t)
        ids = np.concatenate([np.full((b, tt - t), tokenizer.pad_id, np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((b, tt - t), np.int32), mask], axis=1)
        pos = np.broadcast_to(np.arange(tt, dtype=np.int32) - (tt - t), (b, tt))
        ids, mask, pos = (np.concatenate([a, np.repeat(a[:1] * (0 if a is mask else 1), bb - b, axis=0)])
                          for a in (ids, mask, pos))
    hs = (forward or _hidden_forward())(model, ids, mask, pos)  # num_layers + 1 arrays [B, T, H]
    h = np.stack([np.asarray(x, np.float32)[:b] for x in hs[:-1]])  # [L, B, T, H]
    if mode == "hidden_avg":
        h = r(r(h.sum(axis=2, dtype=np.float32)) / np.float32(h.shape[2]))
    else:
        h = h[:, :, -1, :]
    return r(r(h.sum(axis=1, dtype=np.float32)) / np.float32(h.shape[1]))


def _bucket(n: int) -> int:
    return max(8, 1 << (int(n) - 1).bit_length())


def _hidden_forward() -> Callable:
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    @nnx.jit
    def run(model, ids, mask, pos):
        return model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), output_hidden_states=True)[1]
    return run


def gate_vectors(mode: str, experts: Sequence[Any], *, num_layers: int, hidden_size: int,
                 model: Any = None, embed: np.ndarray | None = None, tokenizer: PromptTokenizer | None = None,
                 dtype: str = "bfloat16", seed: int = 0, where: Callable[[int, str, int], str] | None = None
                 ) -> np.ndarray:
    """Router rows ``[num_layers, len(experts), hidden_size]`` float32 for one gate mode.

    Args:
      mode: ``hidden``, ``hidden_avg``, ``hidden_last``, ``cheap_embed``, ``random`` or ``uniform_random``.
      experts: objects with ``positive_prompts`` and ``negative_prompts`` (lists of str or None).
      num_layers, hidden_size: the base's sizes.
      model: the base :class:`~jmerge.models.DecoderLM` for the ``hidden*`` modes (its dtype is the forward's).
      embed: the embedding matrix for ``cheap_embed``.
      tokenizer: a :class:`PromptTokenizer` for the prompt modes.
      dtype: precision of the averages and norms: ``"bfloat16"`` (mergekit-moe) or ``"float32"``.
      seed: seed of the random modes (keys folded with ``model.layers.{l}.mlp.gate.weight``).
      where: ``(expert, field, prompt) -> "file:line:col"`` for error messages.

    Returns:
      The router rows, layer-major.

    Raises:
      MergeInputError: a prompt that tokenises to nothing (naming it), or an unknown mode.

    References: mergekit-moe ``get_gate_params`` (behaviour).
    """
    n = len(experts)
    if mode in ("random", "uniform_random"):
        import jax  # noqa: PLC0415
        rows = []
        for layer in range(num_layers):
            key = leaf_key(seed, f"model.layers.{layer}.mlp.gate.weight")
            if mode == "random":
                rows.append(np.asarray(jax.random.normal(key, (n, hidden_size), "float32")))
            else:
                s = float(np.sqrt(1.0 / hidden_size))
                rows.append(np.asarray(jax.random.uniform(key, (n, hidden_size), "float32", -s, s)))
        return np.stack(rows)
    if mode not in PROMPT_MODES:
        raise MergeInputError(f"unknown gate mode {mode!r}")
    loc = where or (lambda i, field, j: f"experts[{i}].{field}[{j}]")
    for i, e in enumerate(experts):
        for field in ("positive_prompts", "negative_prompts"):
            for j, p in enumerate(getattr(e, field) or ()):
                if not tokenizer.ids(p):
                    raise MergeInputError(f"{loc(i, field, j)}: prompt {p!r} tokenises to nothing; give text that "
                                          "has tokens (its hidden state or embedding makes the router row)")
    r = _rounder("float32" if mode == "cheap_embed" else dtype)
    forward = _hidden_forward() if mode != "cheap_embed" else None
    out = []
    for e in experts:
        v = prompt_vectors(mode, model, embed, tokenizer, e.positive_prompts, num_layers, dtype, forward)
        if e.negative_prompts:
            v = r(v - prompt_vectors(mode, model, embed, tokenizer, e.negative_prompts, num_layers, dtype, forward))
        out.append(_normalize(v, r))
    return np.stack(out, axis=1)
