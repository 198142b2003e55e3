"""The Llama-family decoder in Flax NNX: Llama, Mistral, Qwen2, Qwen3, Gemma-2 and the MoE forms Mixtral,
Qwen2-MoE and Qwen3-MoE.

One module covers them: the differences are configuration (biases, q/k norm, tied head, sliding windows, rotary
scaling; Gemma-2's scaled embeddings, ``1 + w`` norms around attention and MLP, GeGLU, soft-capped attention
scores and logits) and the MLP of each layer (:class:`~jmerge.models.layers.MLP` or
:class:`~jmerge.models.moe.SparseMoE`). Parameters keep the Hugging Face ``[out, in]`` layout; MoE experts are
stacked ``[E, ...]``.

References: Touvron et al. (2023), LLaMA; Jiang et al. (2023), Mistral 7B; Qwen Team (2024), Qwen2 Technical
Report; Jiang et al. (2024), Mixtral of Experts; Qwen Team (2025), Qwen3 Technical Report; Gemma Team (2024),
Gemma 2; Hugging Face transformers ``modeling_llama.py`` and siblings.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DecoderConfig
from .layers import MLP, Attention, Linear, RMSNorm, rounded
from .moe import Experts, SparseMoE

Array = jax.Array
#: ``name -> array or None``: a tensor source keyed by (canonical) Hugging Face names.
TensorGetter = Callable[[str], "Array | None"]


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; with Gemma-2's sandwich norms,
    ``x + post_attn_norm(attn(norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``.

    References: Touvron et al. (2023), LLaMA; Gemma Team (2024), Gemma 2; transformers ``LlamaDecoderLayer``,
    ``Gemma2DecoderLayer``.
    """

    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm,
                 mlp: MLP | SparseMoE, *, pre_feedforward_layernorm: RMSNorm | None = None,
                 post_feedforward_layernorm: RMSNorm | None = None):
        """Assemble a layer.

        Args:
          input_layernorm: norm before attention.
          self_attn: attention.
          post_attention_layernorm: norm before the MLP (Llama); with the sandwich norms, norm of the attention
            output.
          mlp: dense MLP or MoE block.
          pre_feedforward_layernorm, post_feedforward_layernorm: Gemma-2's norms before and after the MLP (both
            or neither).

        References: transformers ``LlamaDecoderLayer``, ``Gemma2DecoderLayer``.
        """
        if (pre_feedforward_layernorm is None) != (post_feedforward_layernorm is None):
            raise ValueError("give both pre_feedforward_layernorm and post_feedforward_layernorm, or neither")
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self.pre_feedforward_layernorm = pre_feedforward_layernorm
        self.post_feedforward_layernorm = post_feedforward_layernorm

    def __call__(self, x: Array, positions: Array, attention_mask: Array | None, *, allowed: Array | None = None,
                 counts: bool = False) -> Array | tuple[Array, Array | None]:
        # residual sums rounded where torch rounds them (bf16/fp16; see layers.rounded)
        a = self.self_attn(self.input_layernorm(x), positions, attention_mask)
        if self.pre_feedforward_layernorm is not None:  # Gemma-2: sandwich norms
            x = rounded(x + self.post_attention_layernorm(a))
            y = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return (rounded(x + y), None) if counts else rounded(x + y)
        x = rounded(x + a)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoE):
            y = self.mlp(h, allowed=allowed, token_mask=attention_mask, counts=counts)
            return (rounded(x + y[0]), y[1]) if counts else rounded(x + y)
        y = self.mlp(h)
        return (rounded(x + y), None) if counts else rounded(x + y)


class DecoderLM(nnx.Module):
    """A causal language model: embeddings, decoder layers, final RMSNorm, LM head (tied or not).

    Call it as ``model(input_ids, attention_mask=None, position_ids=None, output_hidden_states=False)``.
    Positions default to ``0..T-1`` for every row, as transformers uses when ``position_ids`` is not given
    (also with left padding); pass ``position_ids`` to shift them.

    Attributes:
      config: the :class:`DecoderConfig`.

    References: Touvron et al. (2023), LLaMA; transformers ``LlamaForCausalLM``.
    """

    def __init__(self, config: DecoderConfig, get: TensorGetter, *, moe_impl: str = "auto"):
        """Build from tensors addressed by Hugging Face names.

        Args:
          config: the configuration.
          moe_impl: how MoE layers compute their experts (:func:`~jmerge.models.moe_ffn`'s ``impl``: ``"auto"``
            the dispatch kernel, ``"ragged"``, ``"pallas"``, ``"dense"``).
          get: returns the tensor of a name or None when absent. Names are those of a transformers-4 style
            checkpoint; the experts of layer ``i`` are asked for as ``model.layers.{i}.mlp.experts.gate``,
            ``.up`` (``[E, I, H]``) and ``.down`` (``[E, H, I]``) -- :func:`~jmerge.models.load_model` maps
            stored layouts onto these.

        Raises:
          KeyError: a required tensor is missing.

        References: transformers ``LlamaForCausalLM`` (parameter names).
        """
        def need(name: str) -> Array:
            v = get(name)
            if v is None:
                raise KeyError(f"tensor {name!r} is missing from the checkpoint ({config.model_type})")
            return v

        def linear(prefix: str) -> Linear:
            return Linear(need(prefix + ".weight"), get(prefix + ".bias"))

        c = config

        def mlp(prefix: str, act: str = "silu") -> MLP:
            return MLP(linear(prefix + ".gate_proj"), linear(prefix + ".up_proj"), linear(prefix + ".down_proj"),
                       act)

        def norm(name: str) -> RMSNorm:
            return RMSNorm(need(name + ".weight"), c.rms_norm_eps, plus_one=c.norm_plus_one)

        self.config = c
        self.embed_tokens = nnx.Param(jnp.asarray(need("model.embed_tokens.weight")))
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar ** -0.5
        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            qn = kn = None
            if c.qk_norm:
                qn, kn = norm(p + ".self_attn.q_norm"), norm(p + ".self_attn.k_norm")
            attn = Attention(linear(p + ".self_attn.q_proj"), linear(p + ".self_attn.k_proj"),
                             linear(p + ".self_attn.v_proj"), linear(p + ".self_attn.o_proj"),
                             num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                             head_dim=c.head_dim, rope_theta=c.rope_theta, window=c.sliding_windows[i],
                             q_norm=qn, k_norm=kn, rope_scaling=c.rope_scaling, scale=scale,
                             softcap=c.attn_logit_softcapping)
            if c.moe_layers[i]:
                shared = gate = None
                if c.shared_expert_intermediate_size:
                    shared = mlp(p + ".mlp.shared_expert")
                    if get(p + ".mlp.shared_expert_gate.weight") is not None:
                        gate = linear(p + ".mlp.shared_expert_gate")
                experts = Experts(need(p + ".mlp.experts.gate"), need(p + ".mlp.experts.up"),
                                  need(p + ".mlp.experts.down"))
                ffn: MLP | SparseMoE = SparseMoE(
                    linear(p + ".mlp.gate"), experts, c.num_experts_per_tok, normalize=c.norm_topk_prob,
                    shared_expert=shared, shared_expert_gate=gate, cast_weights=c.model_type != "mixtral",
                    impl=moe_impl)
            else:
                ffn = mlp(p + ".mlp", c.hidden_act)
            pre_ff = post_ff = None
            if c.sandwich_norms:
                pre_ff, post_ff = norm(p + ".pre_feedforward_layernorm"), norm(p + ".post_feedforward_layernorm")
            layers.append(DecoderLayer(norm(p + ".input_layernorm"), attn, norm(p + ".post_attention_layernorm"),
                                       ffn, pre_feedforward_layernorm=pre_ff, post_feedforward_layernorm=post_ff))
        self.layers = nnx.List(layers)
        self.norm = norm("model.norm")
        head = None if c.tie_word_embeddings else get("lm_head.weight")
        if head is None and not c.tie_word_embeddings:
            raise KeyError("tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
        self.lm_head = nnx.Param(jnp.asarray(head)) if head is not None else None

    @property
    def dtype(self) -> jnp.dtype:
        """The parameters' (and activations') dtype."""
        return self.embed_tokens[...].dtype

    def embed(self, input_ids: Array) -> Array:
        """The input of the first layer: embedding rows (Gemma: times ``sqrt(hidden_size)`` in their dtype).

        Args:
          input_ids: ``[B, T]`` token ids.

        Returns:
          ``[B, T, H]`` in the parameters' dtype.

        References: transformers ``Gemma2TextScaledWordEmbedding``.
        """
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        return x

    def logits_from_hidden(self, h: Array) -> Array:
        """The LM head on final (normed) hidden states, with Gemma-2's logit soft-capping ``c * tanh(z / c)``.

        Args:
          h: ``[..., H]`` the final norm's output.

        Returns:
          ``[..., V]`` logits in ``h``'s dtype.

        References: transformers ``LlamaForCausalLM``, ``Gemma2ForCausalLM`` (``final_logit_softcapping``).
        """
        head = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("...h,vh->...v", h, head)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            c = jnp.asarray(cap, logits.dtype)
            logits = jnp.tanh(logits / c) * c
        return logits

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, position_ids: Array | None = None,
                 output_hidden_states: bool = False, *, expert_mask: Array | None = None,
                 output_expert_counts: bool = False) -> Array | tuple:
        """Logits of every position.

        Args:
          input_ids: ``[B, T]`` token ids.
          attention_mask: ``[B, T]`` 1 for tokens, 0 for padding (left or right), or None.
          position_ids: ``[B, T]`` rotary positions, default ``0..T-1``.
          output_hidden_states: also return the hidden states as transformers does: the input of every
            layer (the embeddings first), then the final normed output -- ``num_hidden_layers + 1`` arrays
            ``[B, T, H]``.
          expert_mask: ``[num_hidden_layers, E]`` bool, the experts each MoE layer may route to (expert
            surgery): False switches an expert off (its router logit becomes ``-inf``); allowing only some
            experts forces every token onto them (one allowed expert: that expert's FFN with weight 1).
            Rows of dense layers are ignored. None: every expert. Traced (no recompilation per mask).
          output_expert_counts: also return ``[num_hidden_layers, E]`` int32: per layer, how many (token,
            slot) assignments each expert received, padding (``attention_mask == 0``) not counted; zero rows
            for dense layers. Each real token adds ``num_experts_per_tok`` to its layer's row (fewer when
            ``expert_mask`` leaves fewer experts).

        Returns:
          ``logits [B, T, V]`` in the parameters' dtype; with ``output_hidden_states`` and/or
          ``output_expert_counts``, the tuple ``(logits, hidden_states?, expert_counts?)``.

        References: transformers ``LlamaForCausalLM.forward`` (``output_hidden_states``).
        """
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(input_ids)
        n_exp = max(self.config.num_experts, 1)
        hidden, counts = [], []
        for i, layer in enumerate(self.layers):
            hidden.append(x)
            allowed = None if expert_mask is None else jnp.asarray(expert_mask, bool)[i]
            if output_expert_counts:
                x, cnt = layer(x, position_ids, attention_mask, allowed=allowed, counts=True)
                counts.append(jnp.zeros((n_exp,), jnp.int32) if cnt is None else cnt)
            else:
                x = layer(x, position_ids, attention_mask, allowed=allowed)
        x = self.norm(x)
        hidden.append(x)
        logits = self.logits_from_hidden(x)
        out = (logits,) + ((tuple(hidden),) if output_hidden_states else ()) + \
            ((jnp.stack(counts),) if output_expert_counts else ())
        return out if len(out) > 1 else logits
