"""Architectures: tensor naming, tied embeddings, per-layer config fields and MoE expert layout.

The table :data:`ARCHITECTURES` describes the decoder families jmerge knows by their ``config.json``
(``architectures`` first, then ``model_type``): where the layers live and which field counts them,
which embeddings the output head may be tied to, which config fields hold one entry per layer
(``layer_types``) or a list of layer indices (``mlp_only_layers``), and, for mixture-of-experts
models, how the experts are stored on disk.

mergekit 0.1.5 with transformers 5 merges the tensors *as the transformers model names them*: Mixtral
experts stored as ``block_sparse_moe.experts.N.w1/w2/w3.weight`` are seen as one fused
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj``
``[E, H, I]`` per layer, the router as ``mlp.gate.weight``; Qwen MoE experts
(``mlp.experts.N.gate_proj/up_proj/down_proj``) are fused the same way. Parameter filters
(``filter: mlp``) match those names, per-tensor statistics (TIES top-k, SLERP norms) run over the
fused tensors, and the output is written with them. :class:`ModelView` shows a checkpoint reader
under these names, so the planners, filters, hyperparameter resolution and the writer all see what
mergekit sees; :func:`model_views` also refuses inputs of different architectures unless
``allow_crimes`` (mergekit's ``--allow-crimes``). :func:`output_config` writes the output
``config.json``: dtype, layer count and every per-layer field resized to the new depth.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track) for the architecture definitions and the crimes check; Wolf et al.,
"Transformers: State-of-the-Art Natural Language Processing" (EMNLP 2020 demos) for the model
layouts and the v5 checkpoint conversion of MoE experts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import numpy as np

from ..core import MergeInputError

__all__ = ["ArchSpec", "ExpertLayout", "ARCHITECTURES", "find_architecture", "architecture_name", "model_tensor_name",
           "ModelView", "model_views", "check_architectures", "layer_sources", "output_config", "num_layers"]


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How a mixture-of-experts checkpoint stores its experts, and the fused names transformers 5 uses.

    Attributes:
      renames: ``(old, new)`` substring renames applied to every tensor name first
        (Mixtral: ``.block_sparse_moe.`` -> ``.mlp.``, which also renames the router to ``mlp.gate``).
      gate, up, down: the per-expert projection names on disk (``w1``, ``w3``, ``w2`` for Mixtral).
      count_keys: the config fields that may hold the number of experts (the first present counts).

    The experts of one layer, ``<prefix>.experts.<e>.<proj>.weight``, become
    ``<prefix>.experts.gate_up_proj`` ``[E, 2I, H]`` (``gate`` rows, then ``up`` rows, per expert)
    and ``<prefix>.experts.down_proj`` ``[E, H, I]``.

    References: Jiang et al., "Mixtral of Experts" (2024); Wolf et al., "Transformers" (EMNLP 2020
    demos), v5 checkpoint conversion mapping (``MergeModulelist`` + ``Concatenate``).
    """

    renames: tuple = ()
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    count_keys: tuple = ("num_experts", "num_local_experts")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One decoder architecture: naming of layers and embeddings, per-layer config fields, experts.

    Attributes:
      name: short name (``"qwen2"``).
      architectures: ``config.json`` ``architectures`` values it covers.
      model_types: ``config.json`` ``model_type`` values it covers.
      layer_prefix: the layers' name prefix (``model.layers`` -> ``model.layers.<i>.``).
      num_layers_key: the config field holding the layer count.
      embeddings: input embedding tensors (taken from the first slice's model in frankenmerges).
      head: the output head tensor, or None when the architecture always ties it.
      tied_to: tensors the head equals when ``tie_word_embeddings`` (no head tensor on disk).
      per_layer_fields: config lists with one entry per layer (``layer_types``).
      layer_index_fields: config lists of layer indices (``mlp_only_layers``).
      sparse_step_field: Qwen MoE's ``decoder_sparse_step`` (layer ``i`` is sparse when
        ``(i + 1) % step == 0``), rewritten as ``mlp_only_layers`` when the depth changes.
      experts: the MoE expert layout, or None for dense models.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), its architecture JSON
    definitions (``num_layers_config_key``, ``tied_names``).
    """

    name: str
    architectures: tuple
    model_types: tuple
    layer_prefix: str = "model.layers"
    num_layers_key: str = "num_hidden_layers"
    embeddings: tuple = ("model.embed_tokens.weight",)
    head: Optional[str] = "lm_head.weight"
    tied_to: tuple = ("model.embed_tokens.weight",)
    per_layer_fields: tuple = ()
    layer_index_fields: tuple = ()
    sparse_step_field: Optional[str] = None
    experts: Optional[ExpertLayout] = None


_MIXTRAL_EXPERTS = ExpertLayout(renames=((".block_sparse_moe.", ".mlp."),), gate="w1", up="w3", down="w2",
                                count_keys=("num_local_experts",))
_QWEN_EXPERTS = ExpertLayout()  # Qwen2-MoE: num_experts; Qwen3-MoE: num_experts on the Hub, num_local_experts in v5

ARCHITECTURES: tuple = (
    ArchSpec("llama", ("LlamaForCausalLM", "LLaMaForCausalLM"), ("llama",)),
    ArchSpec("mistral", ("MistralForCausalLM",), ("mistral",), per_layer_fields=("layer_types",)),
    ArchSpec("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), per_layer_fields=("layer_types",)),
    ArchSpec("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), per_layer_fields=("layer_types",)),
    ArchSpec("gemma", ("GemmaForCausalLM",), ("gemma",), head=None),
    ArchSpec("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), per_layer_fields=("layer_types",)),
    ArchSpec("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), per_layer_fields=("layer_types",)),
    ArchSpec("phi3", ("Phi3ForCausalLM",), ("phi3",), tied_to=()),
    ArchSpec("gpt2", ("GPT2LMHeadModel",), ("gpt2",), layer_prefix="transformer.h", num_layers_key="n_layer",
             embeddings=("transformer.wte.weight", "transformer.wpe.weight"), tied_to=("transformer.wte.weight",)),
    ArchSpec("mixtral", ("MixtralForCausalLM",), ("mixtral",), per_layer_fields=("layer_types",),
             experts=_MIXTRAL_EXPERTS),
    ArchSpec("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), per_layer_fields=("layer_types",),
             layer_index_fields=("mlp_only_layers",), sparse_step_field="decoder_sparse_step", experts=_QWEN_EXPERTS),
    ArchSpec("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), per_layer_fields=("layer_types",),
             layer_index_fields=("mlp_only_layers",), sparse_step_field="decoder_sparse_step", experts=_QWEN_EXPERTS),
)
"""The architectures jmerge knows (tested on tiny transformers models of each)."""

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def find_architecture(config: Optional[dict]) -> Optional[ArchSpec]:
    """The :class:`ArchSpec` of a ``config.json`` dict (by ``architectures``, then ``model_type``), or None.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), which looks
    architectures up the same way.
    """
    if not isinstance(config, dict):
        return None
    names = config.get("architectures") or []
    for spec in ARCHITECTURES:
        if any(n in spec.architectures for n in names):
            return spec
    mt = config.get("model_type")
    return next((s for s in ARCHITECTURES if mt in s.model_types), None)


def architecture_name(config: Optional[dict]) -> Optional[str]:
    """What the crimes check compares: the config's first ``architectures`` entry, else its ``model_type``.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    if not isinstance(config, dict):
        return None
    names = config.get("architectures") or []
    return str(names[0]) if names else (str(config["model_type"]) if config.get("model_type") else None)


def num_layers(config: Optional[dict]) -> Optional[int]:
    """The layer count a ``config.json`` dict declares (its architecture's field, or a common one), or None.

    References: none (infrastructure).
    """
    if not isinstance(config, dict):
        return None
    spec = find_architecture(config)
    for k in ((spec.num_layers_key,) if spec else ()) + _LAYER_COUNT_KEYS:
        if isinstance(config.get(k), int):
            return int(config[k])
    return None


_EXPERT = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")


def _rename(name: str, lay: Optional[ExpertLayout]) -> str:
    for old, new in (lay.renames if lay else ()):
        name = name.replace(old, new)
    return name


def model_tensor_name(name: str, spec: Optional[ArchSpec]) -> str:
    """The name mergekit (transformers 5) gives an on-disk tensor: what parameter filters match.

    ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` -> ``model.layers.0.mlp.experts.gate_up_proj``
    (expert 3's gate rows of it), ``...block_sparse_moe.gate.weight`` -> ``...mlp.gate.weight``; names
    of dense architectures are unchanged.

    References: Wolf et al., "Transformers" (EMNLP 2020 demos), v5 checkpoint conversion mapping.
    """
    if spec is None or spec.experts is None:
        return name
    lay = spec.experts
    name = _rename(name, lay)
    m = _EXPERT.match(name)
    if m and m.group("proj") in (lay.gate, lay.up):
        return f"{m.group('pre')}.gate_up_proj"
    if m and m.group("proj") == lay.down:
        return f"{m.group('pre')}.down_proj"
    return name


@dataclasses.dataclass(frozen=True)
class _Fused:
    shape: tuple
    dtype: np.dtype
    parts: tuple  # (disk name, expert, row start, row stop)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class ModelView:
    """A checkpoint reader under transformers-5 model names (fused MoE experts), as mergekit sees it.

    Dense architectures pass through unchanged (use :func:`model_views`, which only wraps readers
    that need it). For MoE checkpoints, every expert tensor of a layer is read into one fused
    tensor (each expert's part read straight into its rows, no extra copy) and renamed tensors are
    read from their on-disk names. It has the reader interface the pipeline uses (``keys``, ``shape``,
    ``dtype``, ``nbytes``, ``get(name, out=)``, ``dir``, ``config``, ``path``, ``close``).

    Args:
      reader: a checkpoint reader (:func:`jmerge.io.open_checkpoint`).
      spec: its architecture.

    Raises:
      MergeInputError: the experts of a layer are incomplete or of mixed shapes/dtypes.

    References: Wolf et al., "Transformers" (EMNLP 2020 demos), v5 checkpoint conversion of MoE
    experts; Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """

    def __init__(self, reader: Any, spec: ArchSpec):
        self.reader, self.spec = reader, spec
        self._disk: dict[str, str] = {}
        self._fused: dict[str, _Fused] = {}
        order: list[str] = []
        groups: dict[str, dict] = {}
        lay = spec.experts
        for disk in reader.keys():
            name = _rename(disk, lay)
            m = _EXPERT.match(name) if lay else None
            if m and m.group("proj") in (lay.gate, lay.up, lay.down):
                pre = m.group("pre")
                if pre not in groups:
                    groups[pre] = {}
                    order += [f"{pre}.gate_up_proj", f"{pre}.down_proj"]
                groups[pre].setdefault(int(m.group("e")), {})[m.group("proj")] = disk
                continue
            if name in self._disk:
                raise MergeInputError(f"{reader.path}: tensors '{self._disk[name]}' and '{disk}' both map to "
                                      f"'{name}'; the checkpoint mixes two layouts.")
            self._disk[name] = disk
            order.append(name)
        for pre, experts in groups.items():
            self._fuse(pre, experts)
        clash = set(self._fused) & set(self._disk)
        if clash:
            raise MergeInputError(f"{reader.path}: '{sorted(clash)[0]}' is stored both fused and per expert; "
                                  "re-save the checkpoint in one layout.")
        self._order = order

    def _fuse(self, pre: str, experts: dict) -> None:
        lay, r = self.spec.experts, self.reader
        n = len(experts)
        where = f"{r.path}: experts of '{pre}'"
        if sorted(experts) != list(range(n)):
            raise MergeInputError(f"{where}: expert indices {sorted(experts)} are not 0..{n - 1}; the checkpoint "
                                  "is incomplete.")
        for e, parts in experts.items():
            miss = [p for p in (lay.gate, lay.up, lay.down) if p not in parts]
            if miss:
                raise MergeInputError(f"{where}: expert {e} has no '{miss[0]}' tensor; the checkpoint is incomplete.")
        g0, d0 = experts[0][lay.gate], experts[0][lay.down]
        gshape, dshape, dt = tuple(r.shape(g0)), tuple(r.shape(d0)), np.dtype(r.dtype(g0))
        for e, parts in experts.items():
            for p, want in ((lay.gate, gshape), (lay.up, gshape), (lay.down, dshape)):
                if tuple(r.shape(parts[p])) != want or np.dtype(r.dtype(parts[p])) != dt:
                    raise MergeInputError(f"{where}: '{parts[p]}' has shape {tuple(r.shape(parts[p]))} "
                                          f"{np.dtype(r.dtype(parts[p])).name}, expert 0 has {want} {dt.name}; "
                                          "experts must match to be fused.")
        inter = gshape[0]
        gate_up = tuple(p for e in range(n) for p in ((experts[e][lay.gate], e, 0, inter),
                                                      (experts[e][lay.up], e, inter, 2 * inter)))
        self._fused[f"{pre}.gate_up_proj"] = _Fused((n, 2 * inter) + gshape[1:], dt, gate_up)
        self._fused[f"{pre}.down_proj"] = _Fused((n,) + dshape, dt,
                                                 tuple((experts[e][lay.down], e, None, None) for e in range(n)))

    # reader interface -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The underlying checkpoint's path."""
        return self.reader.path

    @property
    def dir(self) -> str:
        """The underlying checkpoint's directory."""
        return self.reader.dir

    @property
    def config(self) -> Optional[dict]:
        """The underlying checkpoint's ``config.json``."""
        return self.reader.config

    @property
    def metadata(self) -> dict:
        """The underlying checkpoint's safetensors metadata."""
        return getattr(self.reader, "metadata", {})

    def keys(self) -> list[str]:
        """Tensor names (model names), in storage order of their first part."""
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._fused or name in self._disk

    def __len__(self) -> int:
        return len(self._order)

    def disk_names(self, name: str) -> list[str]:
        """The on-disk tensors a model tensor is read from."""
        if name in self._fused:
            return [p[0] for p in self._fused[name].parts]
        return [self._disk_name(name)]

    def _disk_name(self, name: str) -> str:
        try:
            return self._disk[name]
        except KeyError:
            raise MergeInputError(f"{self.reader.path}: no tensor named '{name}' ({len(self)} tensors)") from None

    def shape(self, name: str) -> tuple:
        return self._fused[name].shape if name in self._fused else tuple(self.reader.shape(self._disk_name(name)))

    def dtype(self, name: str) -> np.dtype:
        return self._fused[name].dtype if name in self._fused else self.reader.dtype(self._disk_name(name))

    def nbytes(self, name: str) -> int:
        return self._fused[name].nbytes if name in self._fused else int(self.reader.nbytes(self._disk_name(name)))

    def file_of(self, name: str) -> str:
        return self.reader.file_of(self.disk_names(name)[0])

    def layout(self) -> list:
        return [(k, self.shape(k), self.dtype(k)) for k in self._order]

    def get(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read one tensor (a fused one part by part into its rows); ``out`` as the reader's."""
        if name not in self._fused:
            return self.reader.get(self._disk_name(name), out=out)
        f = self._fused[name]
        if out is None:
            arr = np.empty(f.shape, f.dtype)
        else:
            if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable) \
                    or out.nbytes != f.nbytes:
                raise MergeInputError(f"{self.reader.path}: tensor '{name}': `out` must be a writeable C-contiguous "
                                      f"array of {f.nbytes} bytes")
            arr = out.reshape(-1).view(np.uint8).view(f.dtype).reshape(f.shape)
        for disk, e, lo, hi in f.parts:
            self.reader.get(disk, out=arr[e] if lo is None else arr[e, lo:hi])
        return arr

    def get_rows(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``start:stop`` of a tensor stored whole (see :meth:`rows_readable`); ``out`` as the reader's."""
        if not self.rows_readable(name):
            raise MergeInputError(f"{self.reader.path}: tensor '{name}' cannot be read by rows")
        return self.reader.get_rows(self._disk_name(name), start, stop, out=out)

    def get_flat(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Entries ``start:stop`` (flat order) of a tensor stored whole (see :meth:`rows_readable`)."""
        if not self.rows_readable(name):
            raise MergeInputError(f"{self.reader.path}: tensor '{name}' cannot be read in parts")
        return self.reader.get_flat(self._disk_name(name), start, stop, out=out)

    def rows_readable(self, name: str) -> bool:
        """Whether :meth:`get_rows` and :meth:`get_flat` read ``name``: a tensor stored whole, in a checkpoint that
        reads rows."""
        return (name not in self._fused and hasattr(self.reader, "rows_readable")
                and self.reader.rows_readable(self._disk_name(name)))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "ModelView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelView({self.reader!r}, {self.spec.name})"


def check_architectures(readers: Sequence[Any], paths: Sequence[str], *, allow_crimes: bool = False) -> None:
    """Refuse inputs whose ``config.json`` name different architectures, unless ``allow_crimes``.

    Only the configs are read (no tensor). Inputs without a ``config.json`` are not compared.

    Raises:
      MergeInputError: one line naming the models and their architectures and the flag.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track): its
    ``--allow-crimes`` flag.
    """
    seen: dict[str, list[str]] = {}
    for r, p in zip(readers, paths):
        a = architecture_name(getattr(r, "config", None))
        if a is not None:
            seen.setdefault(a, []).append(str(p))
    if len(seen) > 1 and not allow_crimes:
        desc = "; ".join(f"{a}: {', '.join(ps)}" for a, ps in seen.items())
        raise MergeInputError(f"the models mix architectures ({desc}); pass --allow-crimes (mergekit's flag; "
                              "allow_crimes=True in Python) to merge them anyway.")


def model_views(readers: Sequence[Any], paths: Sequence[str], *, allow_crimes: bool = False) -> list:
    """Check the inputs' architectures, then show each reader under mergekit's tensor names.

    Readers of dense architectures (or without a config) are returned as they are; MoE readers are
    wrapped in a :class:`ModelView`. Reads no tensor.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track).
    """
    check_architectures(readers, paths, allow_crimes=allow_crimes)
    out = []
    for r in readers:
        spec = find_architecture(getattr(r, "config", None))
        out.append(ModelView(r, spec) if spec is not None and spec.experts is not None else r)
    return out


def _resize_lists(cfg: dict, spec: Optional[ArchSpec], n_src: Optional[int], sources: Sequence[tuple]) -> None:
    """Per-layer and layer-index config fields for the output layers ``sources[i] = (config, layer)``."""
    per_layer = set(spec.per_layer_fields) if spec else set()
    index_fields = set(spec.layer_index_fields) if spec else set()
    # any other list with one entry per source layer and 'layer' in its name is per-layer too
    per_layer |= {k for k, v in cfg.items() if isinstance(v, list) and n_src and len(v) == n_src
                  and "layer" in k and k not in index_fields}
    for k in sorted(per_layer):
        if not isinstance(cfg.get(k), list):
            continue
        new = []
        for scfg, j in sources:
            lst = (scfg or {}).get(k)
            lst = lst if isinstance(lst, list) and j < len(lst) else cfg[k]
            if j >= len(lst):
                break
            new.append(lst[j])
        if len(new) == len(sources):
            cfg[k] = new
        else:  # no source says what this layer is: let the library rebuild its default
            del cfg[k]
    step_key = spec.sparse_step_field if spec else None
    for k in sorted(index_fields):
        if k not in cfg and not step_key:
            continue
        dense = []
        for i, (scfg, j) in enumerate(sources):
            s = scfg or cfg
            listed = j in set(s.get(k) or [])
            step = int(s.get(step_key) or 1) if step_key else 1
            if listed or (j + 1) % step != 0:
                dense.append(i)
        cfg[k] = dense
    if step_key and step_key in cfg and any(int((s or cfg).get(step_key) or 1) != 1 for s, _ in sources):
        cfg[step_key] = 1  # the sparse/dense pattern is now spelled out in the index field


def layer_sources(entries: Sequence[tuple], configs: Sequence[Optional[dict]]) -> list:
    """Where each output layer comes from: ``[(source config, source layer index)]`` per output layer.

    Args:
      entries: ``(output tensor name, input index, input tensor name)`` for output tensors; the first
        entry naming an output layer decides it.
      configs: each input's ``config.json`` dict (or None).

    Raises:
      MergeInputError: some output layer below the highest has no tensor.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for slices.
    """
    from ..core import layer_index  # noqa: PLC0415

    found: dict[int, tuple] = {}
    for out_name, ri, src_name in entries:
        i, j = layer_index(out_name), layer_index(src_name)
        if i is not None and j is not None and i not in found:
            found[i] = (configs[ri], j)
    n = max(found) + 1 if found else 0
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise MergeInputError(f"output layer {missing[0]} has no tensors (of {n} layers); check the slices.")
    return [found[i] for i in range(n)]


def output_config(config: dict, *, dtype: Optional[str] = None,
                  layer_sources: Optional[Sequence[tuple]] = None) -> dict:
    """The output ``config.json`` dict: a copy of ``config`` with the output dtype and depth.

    Args:
      config: the donor's ``config.json`` (the base, or the first model).
      dtype: the output dtype name (``out_dtype``, else ``dtype`` of the merge config), written to
        ``dtype`` and ``torch_dtype`` (as mergekit does, for passthrough too); None keeps the donor's.
      layer_sources: for a merge that changes the layer stack (slices), one ``(source config,
        source layer index)`` per output layer. The layer count is set and every per-layer field
        (``layer_types`` ...) takes each output layer's entry from its source layer's config; lists of
        layer indices (``mlp_only_layers``) and Qwen MoE's ``decoder_sparse_step`` are rewritten so each
        output layer keeps its source layer's dense/sparse kind.

    Returns:
      A new dict (``config`` is not modified).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for the layer count and
    dtype; the per-layer fields follow the transformers configs (``layer_types`` validation).
    """
    import copy  # noqa: PLC0415

    cfg = copy.deepcopy(dict(config))
    if dtype:
        cfg["dtype"] = cfg["torch_dtype"] = dtype
    if layer_sources is not None:
        spec = find_architecture(cfg)
        n_src = num_layers(cfg)
        keys = [k for k in _LAYER_COUNT_KEYS if k in cfg]
        if spec is not None and spec.num_layers_key not in keys:
            keys.append(spec.num_layers_key)
        for k in keys:
            cfg[k] = len(layer_sources)
        _resize_lists(cfg, spec, n_src, list(layer_sources))
    return cfg
