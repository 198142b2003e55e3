"""LM loss as a sweep's evaluation: Hugging Face decoder checkpoints as flat ``{tensor name: array}`` dicts,
merged by name (as ``jmerge merge`` merges them tensor by tensor) and scored with the JAX forward.

:func:`lm_eval` builds the model's structure once from the base checkpoint (``nnx.split``), maps each
parameter of that structure to its Hugging Face tensor name, and returns ``eval_fn(merged, batch)`` giving the
summed next-token NLL and the scored-token count of a batch; :func:`lm_finalize` turns the sums into
``loss`` (token-weighted mean NLL, as ``jmerge eval``) and ``perplexity``.

References: Hugging Face transformers ``ForCausalLMLoss`` (shifted labels, float32 log-softmax); Jelinek et al.
(1977), "Perplexity".
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core import MergeInputError
from ..io import open_model
from ..models import DecoderConfig, DecoderLM, token_nll
from ..models.text import bucket_length, encode_texts, load_tokenizer, read_lines

__all__ = ["read_tensors", "lm_eval", "lm_finalize", "text_batches"]


def read_tensors(spec: str, names: Sequence[str] | None = None, *, base_dir: str | None = None) -> dict:
    """The tensors of a checkpoint (path, Hub id, ``MODEL+LORA``) as ``{name: jax array}`` in stored dtypes.

    References: none (infrastructure).
    """
    reader = open_model(spec, base_dir=base_dir)
    try:
        keys = list(reader.keys()) if names is None else list(names)
        return {k: jnp.asarray(reader.get(k)) for k in keys}
    finally:
        reader.close()


def text_batches(path: str, tokenizer_dir: str, *, batch_size: int = 8, max_length: int = 256,
                 vocab_size: int | None = None) -> dict:
    """The documents of a text file (one per line), tokenised and padded to one length: ``{"ids", "mask"}``
    of shape ``(batches, batch_size, length)`` (filler rows have mask 0).

    References: Hugging Face transformers ``DataCollatorWithPadding`` (right padding, attention mask).
    """
    tok = load_tokenizer(tokenizer_dir)
    seqs = [s for s in encode_texts(tok, read_lines(path), max_length=max_length) if s]
    if not seqs:
        raise MergeInputError(f"{path}: the text tokenises to nothing; give a file with text lines.")
    if vocab_size is not None and max(max(s) for s in seqs) >= vocab_size:
        raise MergeInputError(f"{path}: token ids reach {max(max(s) for s in seqs)} but the model's vocabulary has "
                              f"{vocab_size}; use the model's tokenizer.")
    length = bucket_length(max(len(s) for s in seqs), max_length=max_length)
    nb = -(-len(seqs) // batch_size)
    ids = np.zeros((nb * batch_size, length), np.int32)
    mask = np.zeros((nb * batch_size, length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"ids": ids.reshape(nb, batch_size, length), "mask": mask.reshape(nb, batch_size, length)}


def lm_eval(config: Mapping[str, Any], template: Mapping[str, Any], *, dtype: Any = None
            ) -> tuple[Callable[[Mapping[str, Any], Mapping[str, Any]], dict], list[str]]:
    """``(eval_fn, names)``: ``eval_fn(merged, batch) -> {"nll": sum, "tokens": count}`` for a dense decoder.

    Args:
      config: the checkpoint's ``config.json`` as a dict.
      template: ``{name: array}`` of one checkpoint (its shapes build the model's structure).
      dtype: the dtype the merged tensors are cast to before the forward (the merge's output dtype).

    Returns:
      The evaluation function and the tensor names the model reads (the rest are not needed).

    Raises:
      MergeInputError: the architecture is not a dense decoder jmerge.models runs.

    References: Hugging Face transformers ``ForCausalLMLoss``.
    """
    cfg = DecoderConfig.from_dict(dict(config))
    if getattr(cfg, "num_experts", 0):
        raise MergeInputError("LM-loss sweeps support dense decoders; this config has experts (MoE).")
    ids: dict[int, str] = {}

    def get(name: str):
        v = template.get(name)
        if v is None:
            return None
        ids[id(v)] = name
        return v
    model = DecoderLM(cfg, get)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    try:
        names = [ids[id(x)] for x in leaves]
    except KeyError:
        raise MergeInputError("LM-loss sweeps: a model parameter does not come from one checkpoint tensor "
                              "(this architecture transforms tensors when loading).") from None

    def eval_fn(merged: Mapping[str, Any], batch: Mapping[str, Any]) -> dict:
        st = jax.tree.unflatten(treedef, [merged[n] if dtype is None else merged[n].astype(dtype) for n in names])
        nll = token_nll((graphdef, st), batch["ids"], batch["mask"])
        m = batch["mask"]
        valid = jnp.concatenate([jnp.zeros_like(m[:, :1]), (m[:, 1:] != 0) & (m[:, :-1] != 0)], axis=1)
        return {"nll": jnp.sum(jnp.where(valid, nll, 0.0)), "tokens": jnp.sum(valid).astype(jnp.float32)}
    return eval_fn, sorted(set(names))


def lm_finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """``{"loss": nll / tokens, "perplexity": exp(loss), "tokens": tokens}`` from summed outputs.

    References: Jelinek et al. (1977), "Perplexity -- a measure of the difficulty of speech recognition tasks".
    """
    tokens = sums["tokens"]
    loss = sums["nll"] / tokens if tokens > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
            "tokens": tokens}
