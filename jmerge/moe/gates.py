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

__all__ = ["PROMPT_MODES", "PromptTokenizer", "LayerSource", "load_prompt_tokenizer", "gate_vectors"]

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


class LayerSource:
    """The base model's decoder layers one at a time, read from a checkpoint only when needed.

    The gate forward pass needs the inputs of every layer, so it runs layers ``0 .. L-2`` (never the last
    layer, the final norm or the LM head) and holds one layer's weights at a time.

    Attributes:
      config: the :class:`~jmerge.models.DecoderConfig`.
      dtype: the parameters' (and activations') dtype.

    References: transformers ``output_hidden_states`` (the inputs of every layer).
    """

    def __init__(self, reader: Any, config: Any, dtype: Any):
        """Wrap an open checkpoint reader.

        Args:
          reader: a :class:`~jmerge.io.CheckpointReader` of the base.
          config: its :class:`~jmerge.models.DecoderConfig`.
          dtype: ``jnp.bfloat16`` or ``jnp.float32``.

        References: none (infrastructure).
        """
        self.reader, self.config, self.dtype = reader, config, dtype

    def embed(self, ids: np.ndarray) -> Any:
        """The first layer's input ``[B, T, H]`` for token ids."""
        import jax.numpy as jnp  # noqa: PLC0415
        rows = np.asarray(self.reader.get("model.embed_tokens.weight"))[ids]
        x = jnp.asarray(rows).astype(self.dtype)
        if getattr(self.config, "embed_scale", False):
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
        return x

    def layer(self, i: int) -> Any:
        """Decoder layer ``i`` as a module (its weights read now)."""
        import dataclasses  # noqa: PLC0415

        from ..models import model_from_reader  # noqa: PLC0415
        c = self.config
        one = dataclasses.replace(c, num_hidden_layers=1, sliding_windows=(c.sliding_windows[i],),
                                  moe_layers=(c.moe_layers[i],), tie_word_embeddings=True)
        return model_from_reader(_OneLayerView(self.reader, i, c.hidden_size), one, self.dtype).layers[0]


class _OneLayerView:
    """A reader seen as a one-layer model: layer ``i``'s tensors as layer 0, placeholder embeddings and norm."""

    _PLACEHOLDERS = ("model.embed_tokens.weight", "model.norm.weight")

    def __init__(self, reader: Any, i: int, hidden: int):
        self.reader, self.i, self.hidden, self.dir = reader, i, hidden, reader.dir

    def _name(self, name: str) -> str:
        pre = "model.layers.0."
        return f"model.layers.{self.i}." + name[len(pre):] if name.startswith(pre) else name

    def __contains__(self, name: str) -> bool:
        return name in self._PLACEHOLDERS or self._name(name) in self.reader

    def keys(self) -> list[str]:
        return [n for n in self.reader.keys() if n.startswith(f"model.layers.{self.i}.")]

    def get(self, name: str) -> np.ndarray:
        if name == "model.embed_tokens.weight":
            return np.zeros((1, self.hidden), np.float32)
        if name == "model.norm.weight":
            return np.ones((self.hidden,), np.float32)
        return self.reader.get(self._name(name))

    def shape(self, name: str) -> tuple:
        return self.reader.shape(self._name(name))


def _model_source(model: Any) -> Any:
    """A :class:`LayerSource`-like view of an in-memory :class:`~jmerge.models.DecoderLM`."""
    class _Mem:
        config, dtype = model.config, model.dtype

        @staticmethod
        def embed(ids):
            import jax.numpy as jnp  # noqa: PLC0415
            return model.embed(jnp.asarray(ids))

        @staticmethod
        def layer(i):
            return model.layers[i]
    return _Mem()


def _layer_step() -> Callable:
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    @nnx.jit
    def step(layer, x, pos, mask):
        return layer(x, jnp.asarray(pos), jnp.asarray(mask))
    return step


def _row_states(mode: str, source: Any, tokenizer: PromptTokenizer, groups: Sequence[Sequence[str]],
                num_layers: int, dtype: str, max_rows: int = 64) -> list[np.ndarray]:
    """Per prompt group, ``[num_layers, rows, H]`` float32: each prompt's layer inputs at its last token
    (``hidden``/``hidden_last``) or averaged over its padded positions (``hidden_avg``, rounded as torch).

    Each group is laid out as mergekit-moe lays it out (one left-padded batch per group, padding length
    of the group's longest prompt). For the last-token modes every group's rows share batches of
    power-of-two sizes, with extra left padding and positions shifted so that every token keeps its
    position in the group's own layout (the same numbers, fewer and larger forward passes); the average
    reads every position, so ``hidden_avg`` runs each group as its own batch.
    """
    r = _rounder(dtype)
    laid = [tokenizer.batch(g) for g in groups]  # per group (ids, mask) [n_g, T_g]
    batches = []  # (ids, mask, pos, [(group, row in group, row in batch)])
    if mode == "hidden_avg":
        for gi, (ids, mask) in enumerate(laid):
            b, t = ids.shape
            batches.append((ids, mask, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                            [(gi, j, j) for j in range(b)]))
    else:
        rows = [(gi, j) for gi, (ids, _) in enumerate(laid) for j in range(ids.shape[0])]
        tt = _bucket(max(ids.shape[1] for ids, _ in laid))
        for k in range(0, len(rows), max_rows):
            chunk = rows[k:k + max_rows]
            bb = _bucket(len(chunk))
            ids = np.full((bb, tt), tokenizer.pad_id, np.int32)
            mask = np.zeros((bb, tt), np.int32)
            pos = np.broadcast_to(np.arange(tt, dtype=np.int32), (bb, tt)).copy()
            where = []
            for q, (gi, j) in enumerate(chunk):
                g_ids, g_mask = laid[gi]
                t = g_ids.shape[1]
                ids[q, tt - t:], mask[q, tt - t:] = g_ids[j], g_mask[j]
                pos[q] = np.arange(tt, dtype=np.int32) - (tt - t)
                where.append((gi, j, q))
            batches.append((ids, mask, pos, where))
    out = [np.zeros((num_layers, ids.shape[0], source.config.hidden_size), np.float32) for ids, _ in laid]
    xs = [source.embed(ids) for ids, _, _, _ in batches]
    step = _layer_step()
    for layer_i in range(num_layers):
        for (ids, mask, pos, where), x in zip(batches, xs):
            h = np.asarray(x, np.float32)
            red = r(r(h.sum(axis=1, dtype=np.float32)) / np.float32(h.shape[1])) if mode == "hidden_avg" else h[:, -1]
            for gi, j, q in where:
                out[gi][layer_i, j] = red[q]
        if layer_i == num_layers - 1:
            break
        layer = source.layer(layer_i)
        xs = [step(layer, x, pos, mask) for (ids, mask, pos, where), x in zip(batches, xs)]
        del layer
    return out


def _bucket(n: int) -> int:
    return max(8, 1 << (int(n) - 1).bit_length())


def gate_vectors(mode: str, experts: Sequence[Any], *, num_layers: int, hidden_size: int,
                 model: Any = None, embed: np.ndarray | None = None, tokenizer: PromptTokenizer | None = None,
                 dtype: str = "bfloat16", seed: int = 0, where: Callable[[int, str, int], str] | None = None
                 ) -> np.ndarray:
    """Router rows ``[num_layers, len(experts), hidden_size]`` float32 for one gate mode.

    Args:
      mode: ``hidden``, ``hidden_avg``, ``hidden_last``, ``cheap_embed``, ``random`` or ``uniform_random``.
      experts: objects with ``positive_prompts`` and ``negative_prompts`` (lists of str or None).
      num_layers, hidden_size: the base's sizes.
      model: for the ``hidden*`` modes, the base as a :class:`LayerSource` (layers read one at a time) or an
        in-memory :class:`~jmerge.models.DecoderLM`; its dtype is the forward's.
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
    if mode == "cheap_embed":
        out = []
        for e in experts:
            v = _cheap_embed(embed, tokenizer, e.positive_prompts, num_layers)
            if e.negative_prompts:
                v = v - _cheap_embed(embed, tokenizer, e.negative_prompts, num_layers)
            out.append(_normalize(v, _rounder("float32")))
        return np.stack(out, axis=1)
    r = _rounder(dtype)
    source = model if isinstance(model, LayerSource) or hasattr(model, "layer") else _model_source(model)
    groups, index = [], []
    for i, e in enumerate(experts):
        for sign, field in ((1, "positive_prompts"), (-1, "negative_prompts")):
            if getattr(e, field):
                index.append((i, sign))
                groups.append(list(getattr(e, field)))
    states = _row_states(mode, source, tokenizer, groups, num_layers, dtype)
    vec: dict = {}
    for (i, sign), h in zip(index, states):
        vec[(i, sign)] = r(r(h.sum(axis=1, dtype=np.float32)) / np.float32(h.shape[1]))  # mean over prompts
    out = []
    for i in range(len(experts)):
        v = vec[(i, 1)]
        if (i, -1) in vec:
            v = r(v - vec[(i, -1)])
        out.append(_normalize(v, r))
    return np.stack(out, axis=1)


def _cheap_embed(embed: np.ndarray, tokenizer: PromptTokenizer, prompts: Sequence[str], num_layers: int) -> np.ndarray:
    """Summed float32 token embeddings of the prompts (padding excluded), normalised, for every layer."""
    ids, mask = tokenizer.batch(prompts)
    h = np.asarray(embed, np.float32)[ids] * mask[..., None].astype(np.float32)
    v = h.sum(axis=1, dtype=np.float32).sum(axis=0, keepdims=True, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), np.float32(1e-8))
    return np.repeat(v.astype(np.float32), num_layers, axis=0)
