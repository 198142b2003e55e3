"""Expert surgery on MoE checkpoints: measure expert load, switch experts off or force them, prune experts.

* :func:`expert_load` runs a :class:`~jmerge.models.DecoderLM` over token batches and sums, per layer, how
  many (token, slot) assignments each expert receives (padding not counted).
* :func:`expert_mask` builds the ``[layers, experts]`` mask :class:`~jmerge.models.DecoderLM` takes as
  ``expert_mask=`` (switched-off experts get ``-inf`` router logits; forcing experts allows only them).
* :func:`prune_experts` writes a smaller checkpoint keeping ``K`` experts per layer (the most loaded) or
  given experts: expert tensors dropped and renumbered, router rows removed, ``config.json`` updated.
  Mixtral (``block_sparse_moe.experts.N.w1``), Qwen2-MoE / Qwen3-MoE (``mlp.experts.N.gate_proj``) and
  transformers 5's fused ``mlp.experts.gate_up_proj``/``down_proj`` layouts are handled as stored.

Pruning experts that receive no token leaves the logits unchanged when the top-k weights are renormalised
(Mixtral; Qwen2-MoE / Qwen3-MoE with ``norm_topk_prob``, as the released Qwen3 MoE models have it). Without
renormalisation (Qwen2-MoE's default) each weight is a softmax probability over *all* experts, so removing
router rows raises the kept experts' weights: the pruned model is a different (usually close) model.

References: Lu et al. (2024), "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models"; Dahlke et al. (2025), "Mixture of Tunable Experts" (expert
(de)activation at inference); Jiang et al. (2024), Mixtral of Experts.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..io import CheckpointFormatError, CheckpointWriter, copy_aux_files, open_checkpoint
from .config import DecoderConfig
from .llama import DecoderLM

__all__ = ["expert_load", "expert_mask", "prune_experts", "resolve_keep"]

_PER_EXPERT = re.compile(r"^(?P<pre>model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.experts\.)"
                         r"(?P<e>\d+)\.(?P<rest>.+)$")
_FUSED = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?:gate_up_proj|down_proj)(?:_bias)?$")
_ROUTER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.gate\.(?:weight|bias)$")


def expert_load(model: DecoderLM, token_batches: Iterable[Any]) -> np.ndarray:
    """Per layer, the number of (token, slot) assignments each expert receives over some token batches.

    Args:
      model: an MoE :class:`~jmerge.models.DecoderLM`.
      token_batches: ``input_ids [B, T]`` arrays, or ``(input_ids, attention_mask)`` pairs (padding, where
        the mask is 0, is not counted).

    Returns:
      ``[num_hidden_layers, num_experts]`` int64 counts; rows of dense layers are zero. Each counted token
      adds ``num_experts_per_tok`` to every MoE layer's row.

    Raises:
      ValueError: the model has no experts.

    References: Lu et al. (2024), "Not All Experts are Equal" (expert load as the pruning criterion).
    """
    if model.config.num_experts <= 0:
        raise ValueError(f"model_type {model.config.model_type!r} has no experts; expert load needs an MoE model")
    fwd = jax.jit(lambda m, i, a: m(i, a, output_expert_counts=True)[1])
    total = np.zeros((model.config.num_hidden_layers, model.config.num_experts), np.int64)
    for batch in token_batches:
        ids, mask = batch if isinstance(batch, tuple) else (batch, None)
        ids = jnp.asarray(ids, jnp.int32)
        mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        total += np.asarray(fwd(model, ids, mask), np.int64)
    return total


def expert_mask(config: DecoderConfig, off: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
                force: Mapping[int, Sequence[int]] | Sequence[int] | None = None) -> np.ndarray:
    """The ``expert_mask`` of :class:`~jmerge.models.DecoderLM`: which experts each layer may route to.

    Args:
      config: the model's configuration.
      off: experts to switch off, as ``{layer: [experts]}`` or one list for every MoE layer.
      force: experts to force, same forms: in those layers tokens are routed only among them (a single
        forced expert gets weight 1: the layer's MLP becomes that expert's FFN).

    Returns:
      ``[num_hidden_layers, num_experts]`` bool.

    Raises:
      ValueError: an expert or layer index out of range, or a layer left with no expert.

    References: Dahlke et al. (2025), "Mixture of Tunable Experts" (expert deactivation and forcing).
    """
    L, E = config.num_hidden_layers, config.num_experts
    if E <= 0:
        raise ValueError(f"model_type {config.model_type!r} has no experts to switch off or force")
    mask = np.ones((L, E), bool)

    def per_layer(spec):
        if spec is None:
            return {}
        if isinstance(spec, Mapping):
            return {int(k): list(v) for k, v in spec.items()}
        return {i: list(spec) for i in range(L) if config.moe_layers[i]}

    for what, spec in (("force", force), ("off", off)):
        for layer, experts in per_layer(spec).items():
            if not 0 <= layer < L:
                raise ValueError(f"{what}: layer {layer} out of range (the model has {L} layers)")
            bad = [e for e in experts if not 0 <= int(e) < E]
            if bad:
                raise ValueError(f"{what}: expert {bad[0]} of layer {layer} out of range (the model has {E} experts)")
            if what == "force":
                mask[layer] = False
                mask[layer, [int(e) for e in experts]] = True
            else:
                mask[layer, [int(e) for e in experts]] = False
    for i in range(L):
        if config.moe_layers[i] and not mask[i].any():
            raise ValueError(f"layer {i} would have no expert left; keep at least one")
    return mask


def resolve_keep(config: DecoderConfig, keep: int | Sequence[Sequence[int]], load: Any = None) -> list[list[int]]:
    """The experts to keep per layer, ascending: given per layer, or the ``keep`` most loaded of each layer.

    Args:
      config: the checkpoint's configuration.
      keep: ``K`` (needs ``load``; ties go to the lower expert id), or one list of expert ids per layer
        (one list alone applies to every layer); all layers keep the same number of experts.
      load: ``[layers, experts]`` counts from :func:`expert_load` when ``keep`` is an int.

    Returns:
      ``num_hidden_layers`` sorted lists of expert ids (all experts for dense layers).

    Raises:
      ValueError: ``K`` larger than the experts or below ``num_experts_per_tok``, bad or duplicate ids,
        lists of different lengths, or a missing ``load``.

    References: Lu et al. (2024), "Not All Experts are Equal" (keep the most used experts).
    """
    L, E, k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    if E <= 0:
        raise ValueError(f"model_type {config.model_type!r} has no experts to prune")
    if isinstance(keep, (int, np.integer)):
        K = int(keep)
        if K > E:
            raise ValueError(f"keep={K} is more than the {E} experts per layer; use at most {E}")
        if K < k:
            raise ValueError(f"keep={K} is below num_experts_per_tok={k}; keep at least {k} experts per layer")
        if load is None:
            raise ValueError("keep=K needs the expert load (expert_load(...) or --text/--jsonl) to pick experts")
        load = np.asarray(load)
        if load.shape != (L, E):
            raise ValueError(f"load has shape {load.shape}; expected (layers, experts) = {(L, E)}")
        return [sorted(np.argsort(-load[i], kind="stable")[:K].tolist()) for i in range(L)]
    lists = [list(x) for x in keep]
    if len(lists) == 1 and L > 1:
        lists = lists * L
    if len(lists) != L:
        raise ValueError(f"keep has {len(lists)} per-layer lists; the model has {L} layers (or give one list)")
    out = []
    for i, ids in enumerate(lists):
        ids = [int(e) for e in ids]
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise ValueError(f"keep: expert {bad[0]} of layer {i} out of range (the model has {E} experts)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"keep: layer {i} lists an expert twice: {ids}")
        out.append(sorted(ids) if config.moe_layers[i] else list(range(E)))
    sizes = {len(ids) for i, ids in enumerate(out) if config.moe_layers[i]}
    if len(sizes) > 1:
        raise ValueError(f"keep: every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    K = sizes.pop() if sizes else E
    if K < k:
        raise ValueError(f"keep: {K} experts per layer is below num_experts_per_tok={k}; keep at least {k}")
    return out


def prune_experts(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, keep: int | Sequence[Sequence[int]],
                  *, load: Any = None, overwrite: bool = False) -> list[list[int]]:
    """Write a copy of an MoE checkpoint with only some experts per layer (atomically).

    Expert tensors of dropped experts are left out and the kept ones renumbered ``0..K-1`` in their original
    order; router rows (``gate.weight``) are selected likewise; ``num_local_experts`` / ``num_experts`` in
    ``config.json`` (whichever it has) become ``K``; the other config and tokenizer files are copied. Nothing is
    written on error (the output appears by rename at the end).

    Args:
      ckpt_dir: a Mixtral, Qwen2-MoE or Qwen3-MoE safetensors checkpoint (per-expert or transformers-5 fused
        experts).
      out_dir: the output directory (must not exist unless ``overwrite``).
      keep: ``K`` (the ``K`` most loaded experts per layer by ``load``) or per-layer lists of expert ids.
      load: ``[layers, experts]`` counts (:func:`expert_load`), needed when ``keep`` is an int.
      overwrite: replace an existing ``out_dir``.

    Returns:
      The kept expert ids per layer (old numbering).

    Raises:
      ValueError: a bad ``keep`` (see :func:`resolve_keep`).
      jmerge.io.CheckpointError: unreadable input, not an MoE checkpoint, or ``out_dir`` exists.

    References: Lu et al. (2024), "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
    Mixture-of-Experts Large Language Models".
    """
    reader = open_checkpoint(ckpt_dir)
    try:
        if reader.config is None:
            raise CheckpointFormatError(f"{ckpt_dir}: no config.json next to the weights; pruning needs it")
        cfg = dict(reader.config)
        config = DecoderConfig.from_dict(cfg, source=os.path.join(reader.dir, "config.json"))
        kept = resolve_keep(config, keep, load)
        E = config.num_experts
        K = max((len(kept[i]) for i in range(len(kept)) if config.moe_layers[i]), default=E)
        if K < E and not config.norm_topk_prob:
            warnings.warn(f"{ckpt_dir}: norm_topk_prob is false, so routing weights are softmax probabilities over "
                          "all experts; removing experts raises the kept ones' weights and changes the outputs "
                          "even where no token used the removed experts", stacklevel=2)
        plan: list[tuple[str, str, Any]] = []  # (out name, in name, row selection or None)
        for name in reader.keys():
            m = _PER_EXPERT.match(name)
            if m:
                ids = kept[int(m.group("layer"))]
                e = int(m.group("e"))
                if e in ids:
                    plan.append((f"{m.group('pre')}{ids.index(e)}.{m.group('rest')}", name, None))
                continue
            m = _FUSED.match(name) or _ROUTER.match(name)
            if m and reader.shape(name) and reader.shape(name)[0] == E:
                plan.append((name, name, kept[int(m.group("layer"))]))
                continue
            if m:
                raise CheckpointFormatError(f"{ckpt_dir}: tensor {name!r} has shape {reader.shape(name)}; "
                                            f"expected {E} experts on its first axis (config.json)")
            plan.append((name, name, None))
        layout = [(out, (len(rows),) + tuple(reader.shape(src)[1:]) if rows is not None else reader.shape(src),
                   reader.dtype(src)) for out, src, rows in plan]
        key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
        cfg[key] = K
        with CheckpointWriter(out_dir, layout, overwrite=overwrite) as w:
            for out, src, rows in plan:
                a = reader.get(src)
                w.write(out, a if rows is None else np.ascontiguousarray(a[np.asarray(rows)]))
            copy_aux_files(reader.dir, w, config=False)
            gen = os.path.join(reader.dir, "generation_config.json")
            if os.path.isfile(gen):
                w.add_file(gen, "generation_config.json")
            w.write_text("config.json", json.dumps(cfg, indent=2) + "\n")
        return kept
    finally:
        reader.close()
