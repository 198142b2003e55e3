"""``jmerge moe``: a Hugging Face mixture-of-experts checkpoint from dense models, as mergekit-moe builds it.

The attention, norms and embeddings come from the base model; each expert's MLP (gate/up/down) becomes
that expert of every layer; the router rows come from :mod:`jmerge.moe.gates`. Output architectures
(mergekit-moe's, chosen by the same rules):

* **Mixtral** (Llama/Mistral inputs, no shared experts; the default when possible): experts fused as
  transformers 5 stores them, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and
  ``mlp.experts.down_proj`` ``[E, H, I]``; router ``mlp.gate.weight``.
* **DeepSeek MoE** (Llama/Mistral inputs, at most one ungated shared expert): experts one by one
  (``mlp.experts.N.*``, ``mlp.shared_experts.*``); the config loads with DeepSeek's remote code.
* **Qwen MoE** (Qwen2/Llama/Mistral inputs, exactly one shared expert, gated by its prompts): experts
  one by one, ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight``; q/k/v biases the base lacks
  are written as zeros.
* **Qwen3 MoE** (Qwen3 inputs, no shared experts): fused experts as Mixtral.

Tensors are streamed one at a time through the merge executor (out-of-core) into a temporary
directory that is renamed into place at the end; nothing is written when an input is wrong.

Departures from mergekit-moe 0.1.5, deliberate: the output tokenizer files are the base's, unchanged
(mergekit saves its gate-computation tokenizer, whose pad token it set to BOS); a shared expert may be
any model (mergekit fails unless it is also the base or an expert); random gates and ``noise_scale``
are keyed by ``--seed`` and the tensor name (mergekit draws from torch's unseeded generator); model
paths relative to the config file's directory are found too.

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) and mergekit-moe's
``mixtral.py``, ``qwen.py``, ``qwen3.py``, ``deepseek.py`` (read for behaviour); Jiang et al. (2024),
"Mixtral of Experts"; Dai et al. (2024), "DeepSeekMoE"; Qwen Team (2024), "Qwen1.5-MoE".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..core import MergeInputError, leaf_key
from ..mergekit.moe_schema import MoEConfig, load_moe_config
from .gates import PROMPT_MODES, LayerSource, gate_vectors, load_prompt_tokenizer

__all__ = ["MoEPlan", "plan_moe", "build_moe"]

_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
                "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclasses.dataclass
class MoEPlan:
    """Everything :func:`build_moe` decided before writing.

    Attributes:
      config: the validated :class:`~jmerge.mergekit.moe_schema.MoEConfig`.
      architecture: the output architecture's name (``Mixtral``, ``DeepSeek MoE``, ``Qwen MoE``, ``Qwen3 MoE``).
      out_config: the output ``config.json`` object.
      out_dtype: output dtype name, or None (tensors keep theirs).
      specs: the distinct model references opened, in order (base first).
      gated: the experts that get router rows (routed experts, then gated shared experts).

    References: mergekit-moe ``select_output_arch`` (behaviour).
    """

    config: MoEConfig
    architecture: str
    out_config: dict
    out_dtype: Optional[str]
    specs: list
    gated: list


def _dtype_name(cfg: dict | None) -> Optional[str]:
    if not cfg:
        return None
    v = cfg.get("dtype") or cfg.get("torch_dtype")
    return _DTYPE_NAMES.get(str(v).replace("torch.", "")) if v else None


def _supports(name: str, cfg: MoEConfig, types: list[str]) -> Optional[str]:
    """Why output architecture ``name`` cannot take this config (None: it can)."""
    shared = cfg.shared_experts or []
    same = len(set(types)) == 1
    if name == "Mixtral":
        if shared:
            return "no shared experts"
        if not same or types[0] not in ("llama", "mistral"):
            return "all models Llama or Mistral"
    elif name == "DeepSeek MoE":
        if len(shared) > 1 or any(e.positive_prompts or e.negative_prompts for e in shared):
            return "at most one shared expert, without prompts"
        if not same or types[0] not in ("llama", "mistral"):
            return "all models Llama or Mistral"
    elif name == "Qwen MoE":
        if len(shared) != 1:
            return "exactly one shared expert"
        if cfg.gate_mode != "random" and not shared[0].positive_prompts:
            return "prompts for the shared expert"
        if not same or types[0] not in ("llama", "mistral", "qwen2"):
            return "all models Qwen2, Llama or Mistral"
    elif name == "Qwen3 MoE":
        if shared:
            return "no shared experts"
        if any(t != "qwen3" for t in types):
            return "all models Qwen3"
    return None


def _select_architecture(cfg: MoEConfig, types: list[str]) -> str:
    from ..mergekit.moe_schema import OUTPUT_ARCHITECTURES  # noqa: PLC0415
    names = [a for a in OUTPUT_ARCHITECTURES
             if cfg.architecture is None or a.lower().startswith(cfg.architecture.lower())]
    why = {a: _supports(a, cfg, types) for a in names}
    ok = [a for a in names if why[a] is None]
    if not ok:
        reasons = "; ".join(f"{a} needs {w}" for a, w in why.items())
        raise MergeInputError(f"{cfg.where('architecture' if cfg.architecture else 'experts')}: no output "
                              f"architecture takes these models (model types {sorted(set(types))}): {reasons}")
    return "Mixtral" if "Mixtral" in ok else ok[0]


def _out_config(arch: str, base: dict, n_experts: int, k: int, n_shared: int, dtype: Optional[str]) -> dict:
    """The output ``config.json``: the base's with the MoE fields mergekit-moe sets."""
    c = {key: v for key, v in base.items() if key not in ("_name_or_path", "transformers_version")}
    inter = c.get("intermediate_size")
    if arch == "Mixtral":
        c.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=n_experts,
                 num_experts_per_tok=k, sliding_window=None)
        for key, v in (("output_router_logits", False), ("router_aux_loss_coef", 0.001), ("router_jitter_noise", 0.0)):
            c.setdefault(key, v)
    elif arch == "Qwen MoE":
        c.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=n_experts,
                 num_experts_per_tok=k, decoder_sparse_step=1, norm_topk_prob=True, sliding_window=None,
                 use_sliding_window=False, shared_expert_intermediate_size=inter, moe_intermediate_size=inter)
        for key, v in (("mlp_only_layers", []), ("output_router_logits", False), ("router_aux_loss_coef", 0.001),
                       ("qkv_bias", True)):
            c.setdefault(key, v)
    elif arch == "Qwen3 MoE":
        c.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_local_experts=n_experts,
                 num_experts_per_tok=k, decoder_sparse_step=1, norm_topk_prob=True, moe_intermediate_size=inter)
        for key, v in (("mlp_only_layers", []), ("output_router_logits", False), ("router_aux_loss_coef", 0.001)):
            c.setdefault(key, v)
    else:  # DeepSeek MoE (remote code)
        c.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=n_experts,
                 n_shared_experts=n_shared or None, num_experts_per_tok=k, first_k_dense_replace=0,
                 moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True, moe_intermediate_size=inter,
                 auto_map={
                     "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
                     "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM":
                         "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM"})
        if dtype is not None:
            c["torch_dtype"] = dtype
    if dtype is not None:
        c["dtype"] = dtype
        if "torch_dtype" in c:
            c["torch_dtype"] = dtype
    return dict(sorted(c.items()))


def _base_tensor_ok(arch: str, rest: str) -> bool:
    """Whether a base layer tensor (name after ``model.layers.N.``) belongs in the output architecture."""
    if arch == "DeepSeek MoE":
        return True  # mergekit keeps the base architecture's tensors
    ok = {"input_layernorm.weight", "post_attention_layernorm.weight"} | {f"self_attn.{p}.weight" for p in _ATTN}
    if arch == "Qwen MoE":
        ok |= {f"self_attn.{p}.bias" for p in _ATTN[:3]}
    if arch == "Qwen3 MoE":
        ok |= {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    return rest in ok


def _open_all(cfg: MoEConfig, base_dir: Optional[str]):
    from .. import io  # noqa: PLC0415
    specs: list[str] = []
    refs = [("base_model",)] + [("experts", i, "source_model") for i in range(len(cfg.experts))] + \
        [("shared_experts", i, "source_model") for i in range(len(cfg.shared_experts or []))]
    values = [cfg.base_model] + [e.source_model for e in cfg.experts] + [e.source_model for e in cfg.shared_experts or []]
    for v in values:
        if v not in specs:
            specs.append(v)
    readers = []
    try:
        for s in specs:
            loc = refs[values.index(s)]
            try:
                readers.append(io.open_model(s, base_dir=base_dir))
            except io.CheckpointError as e:
                raise MergeInputError(f"{cfg.where(*loc)}: {e}") from None
            if readers[-1].config is None:
                raise MergeInputError(f"{cfg.where(*loc)}: {s}: no config.json; the MoE's config is built from it")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return specs, readers, refs, values


def _check_models(cfg: MoEConfig, readers: Sequence[Any], specs: list, refs: list, values: list) -> list[str]:
    base = readers[0].config
    types = []
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers")
    for loc, v in zip(refs, values):
        c = readers[specs.index(v)].config
        types.append(str(c.get("model_type")))
        if loc == ("base_model",):
            continue
        if c.get("model_type") != base.get("model_type"):
            raise MergeInputError(f"{cfg.where(*loc)}: {v} is a {c.get('model_type')!r} model and the base a "
                                  f"{base.get('model_type')!r} one; every expert must have the base's architecture")
        for k in keys:
            if c.get(k) != base.get(k):
                raise MergeInputError(f"{cfg.where(*loc)}: {v} has {k} {c.get(k)}, the base {base.get(k)}; "
                                      "experts must have the base's shapes")
    return types


def plan_moe(cfg: MoEConfig, readers: Sequence[Any], specs: list, refs: list, values: list,
             out_dtype: Optional[str] = None) -> MoEPlan:
    """Check the models and choose the output architecture and config (reads headers and configs only).

    References: mergekit-moe ``select_output_arch`` and each architecture's ``_generate_config``.
    """
    types = _check_models(cfg, readers, specs, refs, values)
    arch = _select_architecture(cfg, types)
    base = readers[0].config
    dtype = _DTYPE_NAMES.get(cfg.dtype) if cfg.dtype else _dtype_name(base)
    shared = cfg.shared_experts or []
    gated = list(cfg.experts)
    if shared and (any(e.positive_prompts for e in shared) or cfg.gate_mode in ("random", "uniform_random")):
        gated += list(shared)
    out = _out_config(arch, base, len(cfg.experts), cfg.experts_per_token, len(shared), dtype)
    return MoEPlan(cfg, arch, out, dtype, list(specs), gated)


def _jobs(plan: MoEPlan, readers: Sequence[Any], routers: Callable[[], np.ndarray], seed: int,
          gate_dtype: str = "bfloat16"):
    """The output tensor jobs (copies of sources; routers computed): planned before the gates, so every input
    tensor is checked first; ``routers()`` gives the ``[layers, gated experts, hidden]`` rows when the jobs run."""
    from ..pipeline.jobs import Computed, Concat, Copy, Mapped, Stack, Tensor, TensorJob  # noqa: PLC0415
    cfg, arch = plan.config, plan.architecture
    base = readers[0]
    out_dt = np.dtype(_np_dtype(plan.out_dtype)) if plan.out_dtype else None
    layers = int(base.config["num_hidden_layers"])
    jobs, dropped = [], []

    def job(name: str, src: Any, shape: tuple, in_dtype: Any) -> None:
        dt = out_dt if out_dt is not None else np.dtype(in_dtype)
        jobs.append(TensorJob(name, tuple(int(d) for d in shape), dt, Copy(src), np.dtype(in_dtype)))

    def expert_src(e: Any, x: str, name: str, where: str) -> tuple[Any, tuple, Any]:
        """(source, shape, stored dtype) of tensor ``name`` of expert ``e`` (``x`` names it for the noise key)."""
        ri = plan.specs.index(e.source_model)
        if name not in readers[ri]:
            raise MergeInputError(f"{where}: tensor {name!r} is missing from {e.source_model}")
        src: Any = Tensor(ri, name)
        residual = ".down_proj." in name
        if e.noise_scale is not None or (e.residual_scale is not None and residual):
            src = Mapped(src, _noise_scale_fn(e, f"{name}@{x}", seed, residual), f"{name} of {x} (noise/scale)")
        return src, tuple(readers[ri].shape(name)), readers[ri].dtype(name)

    for name in base.keys():
        m = _LAYER.match(name)
        if name.endswith("rotary_emb.inv_freq") or (m and m.group(2).startswith("mlp.")):
            continue
        if m and not _base_tensor_ok(arch, m.group(2)):
            dropped.append(name)
            continue
        job(name, Tensor(0, name), base.shape(name), base.dtype(name))
    if dropped:
        warnings.warn(f"{arch} has no place for {len(dropped)} base tensor(s), left out as mergekit-moe does: "
                      f"{', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}", stacklevel=3)
    if arch == "Qwen MoE":  # Qwen2-MoE's attention has q/k/v biases: zeros where the base has none
        c = base.config
        hd = int(c.get("head_dim") or int(c["hidden_size"]) // int(c["num_attention_heads"]))
        kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
        for i in range(layers):
            for p, heads in (("q_proj", int(c["num_attention_heads"])), ("k_proj", kv), ("v_proj", kv)):
                name = f"model.layers.{i}.self_attn.{p}.bias"
                if name not in base:
                    n = heads * hd
                    dt = out_dt if out_dt is not None else np.dtype(base.dtype(f"model.layers.{i}.self_attn.{p}.weight"))
                    job(name, Computed(lambda n=n, dt=dt: np.zeros(n, dt), (n,), dt, f"{name} (zeros)"), (n,), dt)
    hidden_gates = cfg.gate_mode.startswith("hidden") and gate_dtype == "bfloat16"
    rdt = np.dtype(_np_dtype("bfloat16")) if hidden_gates else np.dtype(np.float32)
    n = len(cfg.experts)
    shared = cfg.shared_experts or []
    for i in range(layers):
        pre = f"model.layers.{i}.mlp"
        ex = {p: [expert_src(e, f"expert{x}", f"{pre}.{p}.weight", cfg.where("experts", x, "source_model"))
                  for x, e in enumerate(cfg.experts)] for p in _MLP}
        if arch in ("Mixtral", "Qwen3 MoE"):
            (inter, hid), dt = ex["gate_proj"][0][1], ex["gate_proj"][0][2]
            gu = Stack(tuple(Concat((g[0], u[0]), 0) for g, u in zip(ex["gate_proj"], ex["up_proj"])))
            job(f"{pre}.experts.gate_up_proj", gu, (n, 2 * inter, hid), dt)
            job(f"{pre}.experts.down_proj", Stack(tuple(d[0] for d in ex["down_proj"])), (n, hid, inter), dt)
        else:
            for x in range(n):
                for p in _MLP:
                    job(f"{pre}.experts.{x}.{p}.weight", *ex[p][x])
            sub = "shared_expert" if arch == "Qwen MoE" else "shared_experts"
            for s, e in enumerate(shared):
                for p in _MLP:
                    job(f"{pre}.{sub}.{p}.weight",
                        *expert_src(e, f"shared{s}", f"{pre}.{p}.weight", cfg.where("shared_experts", s, "source_model")))
        h = int(base.config["hidden_size"])
        job(f"{pre}.gate.weight", Computed(lambda i=i: routers()[i, :n].astype(rdt), (n, h), rdt,
                                           f"{pre}.gate.weight (router)"), (n, h), rdt)
        if arch == "Qwen MoE":
            job(f"{pre}.shared_expert_gate.weight",
                Computed(lambda i=i: routers()[i, n:n + 1].astype(rdt), (1, h), rdt,
                         f"{pre}.shared_expert_gate.weight (router)"), (1, h), rdt)
    return jobs


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _noise_scale_fn(e: Any, key_name: str, seed: int, residual: bool):
    """mergekit's ``noise_and_scale`` in the tensor's own dtype: ``x + N(0, 1) * noise_scale``, then
    ``* residual_scale`` on ``down_proj``; the noise is keyed by the seed, the tensor name and the model."""
    def fn(a: np.ndarray) -> np.ndarray:
        dt = a.dtype
        x = a
        if e.noise_scale is not None:
            import jax  # noqa: PLC0415
            z = np.asarray(jax.random.normal(leaf_key(seed, key_name), a.shape, "float32"))
            noise = (z.astype(dt).astype(np.float32) * np.float32(e.noise_scale)).astype(dt)
            x = (x.astype(np.float32) + noise.astype(np.float32)).astype(dt)
        if residual and e.residual_scale is not None:
            x = (x.astype(np.float32) * np.float32(e.residual_scale)).astype(dt)
        return x
    return fn


def build_moe(config: MoEConfig | str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
              gate_dtype: str = "bfloat16", seed: int = 0, max_shard_bytes: int = 5 * 10**9, quiet: bool = False,
              copy_tokenizer: bool = True, write_model_card: bool = True, allow_all_same: bool = False) -> dict:
    """Build a mixture-of-experts checkpoint from a mergekit-moe config (``jmerge moe CONFIG OUT``).

    Args:
      config: a :class:`~jmerge.mergekit.moe_schema.MoEConfig` or the path of its YAML file.
      out_dir: the output directory; it appears only when everything has been written.
      overwrite: replace an existing ``out_dir``.
      gate_dtype: precision of the ``hidden*`` gates' forward pass and reductions: ``"bfloat16"`` (as
        mergekit-moe computes them) or ``"float32"``.
      seed: seed of ``random`` / ``uniform_random`` gates and of ``noise_scale``.
      max_shard_bytes: output shard size limit.
      quiet: no progress display.
      copy_tokenizer: copy the base's tokenizer files into the output.
      write_model_card: write ``README.md`` and ``mergekit_moe_config.yml`` (the config as run).
      allow_all_same: accept experts that are all one model (mergekit-moe's
        ``--i-understand-this-is-not-useful-without-training``).

    Returns:
      ``{"out_dir", "architecture", "tensors", "bytes_read", "bytes_written", "seconds", "gate_seconds"}``.

    Raises:
      ConfigError: an invalid config (``file:line:column``).
      MergeInputError: models that do not fit (another architecture or size, missing tensors, no tokenizer
        for a prompt gate mode, a prompt without tokens); nothing is written.
      CheckpointError: unreadable inputs or an existing output without ``overwrite``.

    References: mergekit-moe (``mergekit-moe CONFIG OUT``); Jiang et al. (2024), "Mixtral of Experts".
    """
    from .. import io  # noqa: PLC0415
    from ..pipeline import MergeContext, Progress, run_jobs  # noqa: PLC0415
    t0 = time.perf_counter()
    if gate_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"gate_dtype {gate_dtype!r}: use 'bfloat16' (mergekit-moe's) or 'float32'")
    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config, allow_all_same=allow_all_same)
    base_dir = os.path.dirname(os.path.abspath(cfg.source)) if os.path.isfile(cfg.source) else None
    if os.path.exists(out_dir) and not overwrite:
        raise io.OutputExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    specs, readers, refs, values = _open_all(cfg, base_dir)
    try:
        plan = plan_moe(cfg, readers, specs, refs, values)
        base = readers[0]
        layers, hidden = int(base.config["num_hidden_layers"]), int(base.config["hidden_size"])
        tok = model = embed = None
        if cfg.gate_mode in PROMPT_MODES:
            if not os.path.isfile(os.path.join(base.dir, "tokenizer.json")):
                raise MergeInputError(f"{cfg.where('base_model')}: {cfg.base_model} has no tokenizer.json; gate_mode "
                                      f"{cfg.gate_mode!r} tokenises the prompts with the base's tokenizer (add its "
                                      "tokenizer files, or use gate_mode: random)")
            tok = load_prompt_tokenizer(base.dir)
        gates: dict = {}  # filled by the gate computation below; read by the router jobs when they run
        jobs = _jobs(plan, readers, lambda: gates["rows"], seed, gate_dtype)  # checks every input tensor first
        tg = time.perf_counter()
        if cfg.gate_mode == "cheap_embed":
            embed = base.get("model.embed_tokens.weight")
        elif cfg.gate_mode in PROMPT_MODES:
            import jax.numpy as jnp  # noqa: PLC0415
            from ..models import DecoderConfig  # noqa: PLC0415
            dcfg = DecoderConfig.from_dict(base.config, source=os.path.join(base.dir, "config.json"))
            model = LayerSource(base, dcfg, jnp.bfloat16 if gate_dtype == "bfloat16" else jnp.float32)
        kinds = ["experts"] * len(cfg.experts) + ["shared_experts"] * (len(plan.gated) - len(cfg.experts))
        idx = list(range(len(cfg.experts))) + list(range(len(plan.gated) - len(cfg.experts)))
        gates["rows"] = gate_vectors(cfg.gate_mode, plan.gated, num_layers=layers, hidden_size=hidden, model=model,
                               embed=embed, tokenizer=tok, dtype=gate_dtype, seed=seed,
                               where=lambda i, f, j: cfg.where(kinds[i], idx[i], f, j))
        del model, embed
        gate_s = time.perf_counter() - tg
        total = sum(j.read_bytes(readers) for j in jobs)
        meta = {"merged_with": "jmerge", "merge_method": "moe"}
        writer = io.CheckpointWriter(out_dir, [(j.out_name, j.shape, j.dtype) for j in jobs],
                                     max_shard_bytes=max_shard_bytes, overwrite=overwrite, metadata=meta)
        progress = Progress(total, disable=quiet, label="jmerge moe")
        with writer:
            run_jobs(jobs, readers, writer, MergeContext(program=None, hparams={}, views={}, seed=seed),
                     progress=progress)
            progress.close()
            if os.path.isdir(base.dir):
                io.copy_aux_files(base.dir, writer, config=False, tokenizer=copy_tokenizer)
                gen = os.path.join(base.dir, "generation_config.json")
                if os.path.isfile(gen):
                    writer.add_file(gen, "generation_config.json")
            writer.write_text("config.json", json.dumps(plan.out_config, indent=2) + "\n")
            if write_model_card:
                text = _config_text(cfg)
                writer.write_text("README.md", io.model_card(text, f"moe ({plan.architecture})", plan.specs))
                writer.write_text("mergekit_moe_config.yml", text)
        return {"out_dir": os.path.abspath(out_dir), "architecture": plan.architecture, "tensors": len(jobs),
                "bytes_read": total, "bytes_written": int(writer.total_size), "gate_seconds": gate_s,
                "seconds": time.perf_counter() - t0}
    finally:
        for r in readers:
            r.close()


def _config_text(cfg: MoEConfig) -> str:
    if os.path.isfile(cfg.source):
        with open(cfg.source, encoding="utf-8") as f:
            return f.read()
    import yaml  # noqa: PLC0415
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
