"""Twin-Merging: shared knowledge plus low-rank exclusive knowledge, merged per input by a router.

Stage 1 (:func:`twin_merge`, once):

* **shared** ``θ* = merge(base, models)`` with task arithmetic or TIES (or any jmerge transform);
* **exclusive** ``v_t = θ_t − θ*`` per leaf (= ``τ_t − (θ* − θ_0)``), compressed per matrix: each
  matrix leaf is read through its :class:`~jmerge.core.views.MatrixView` (fan-in x fan-out, also for
  ``DenseGeneral`` attention and conv kernels; a batch of matrices for scan-stacked leaves) and kept as
  a truncated SVD ``U_t S_t V_tᵀ`` of a fixed ``rank`` or of the smallest rank holding an ``energy``
  fraction of ``Σσ²`` (each matrix its own rank; the arrays are padded to the largest with zero σ).
  By Eckart–Young the per-matrix error is ``‖v_t − U_t S_t V_tᵀ‖_F = sqrt(Σ dropped σ²)``, returned in
  :attr:`TwinMerge.residual`.
* **non-matrix leaves** (biases, norm scales, position tables of one dimension): ``vectors="dense"``
  (default) keeps ``v_t`` of these leaves in full (exact, counted in the storage); ``vectors="shared"``
  drops them (those leaves are the shared model's). Integer/bool leaves are the shared model's (= base).

Stage 2 (:func:`twin_apply`, per batch or per input): a router (see :mod:`jmerge.dynamic.router`)
gives weights ``w(x)`` over tasks, and the model runs with ``θ(x) = θ* + Σ_t w_t(x) · U_t S_t V_tᵀ``.
``per_input=False`` merges once per batch with the batch-averaged weights; ``per_input=True`` merges
per input (vmapped), as in the paper, where each test input gets its own merged model. Everything in
stage 2 is jittable, with the weights (and the router's temperature) traced.

Departures from the paper: the authors sparsify ``v_t`` by magnitude in their released code and
compress by SVD in the paper; only SVD is offered here.

References: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
(NeurIPS 2024); Eckart & Young, "The approximation of one matrix by another of lower rank" (1936).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core.driver import merge
from ..core.errors import MergeInputError
from ..core.transform import Transform
from ..core.tree import check_compatible, leaves_with_paths
from ..core.views import MatrixView, infer_views
from ..lora.factor import check_rank
from ..methods import task_arithmetic, ties
from .router import check_num_tasks, router_logits, softmax_weights

__all__ = ["TwinMerge", "LeafInfo", "twin_merge", "twin_apply", "twin_forward", "twin_storage", "resolve_rank"]

RankSpec = Any  # int | "full" | {path: int | "full"} | callable(path, (b, m, n)) -> int | "full"


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """How one leaf's exclusive knowledge is stored: ``kind`` is ``"lowrank"`` (factors ``u (T,b,m,r)``,
    ``s (T,b,r)``, ``vt (T,b,r,n)`` under ``view``), ``"dense"`` (``(T, *shape)``) or ``"shared"`` (none).

    References: Lu et al., "Twin-Merging" (NeurIPS 2024).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    view: MatrixView | None = None
    rank: int = 0


@jax.tree_util.register_pytree_node_class
class TwinMerge:
    """Shared parameters and compressed exclusive knowledge of ``T`` tasks (a pytree: jit/vmap-able).

    Attributes:
      shared: the shared model ``θ*`` (the input tree's structure).
      exclusive: per leaf (in ``jax.tree`` order): ``(u, s, vt)``, a dense ``(T, *shape)`` array or None.
      residual: per leaf: ``(T, b)`` Frobenius errors ``sqrt(Σ dropped σ²)`` of each matrix (None otherwise).
      info: per leaf :class:`LeafInfo` (static).
      num_tasks: ``T``.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024).
    """

    def __init__(self, shared, exclusive, residual, info, treedef, num_tasks):
        self.shared = shared
        self.exclusive = list(exclusive)
        self.residual = list(residual)
        self.info = tuple(info)
        self.treedef = treedef
        self.num_tasks = int(num_tasks)

    def tree_flatten(self):
        return (self.shared, self.exclusive, self.residual), (self.info, self.treedef, self.num_tasks)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def _delta_leaves(self, weights: jax.Array) -> list:
        w = jnp.asarray(weights, jnp.float32)
        if w.shape != (self.num_tasks,):
            raise MergeInputError(f"twin-merging: weights must have shape ({self.num_tasks},) (one per task), "
                                  f"got {tuple(w.shape)}.")
        out = []
        for inf, ex in zip(self.info, self.exclusive):
            if inf.kind == "lowrank":
                u, s, vt = ex
                m = jnp.einsum("tbmr,tbrn->bmn", u * (w[:, None, None, None] * s[:, :, None, :]), vt)
                out.append(inf.view.from_matrices(m, inf.shape))
            elif inf.kind == "dense":
                out.append(jnp.tensordot(w, ex, axes=1))
            else:
                out.append(None)
        return out

    def exclusive_delta(self, weights: jax.Array) -> Any:
        """``Σ_t w_t · U_t S_t V_tᵀ`` (and the dense leaves' ``Σ_t w_t v_t``) as a tree of the shared
        model's structure (float32; None where a leaf has no exclusive part). ``weights``: ``(T,)``, may be traced.

        References: Lu et al., "Twin-Merging" (NeurIPS 2024), Eq. (dynamic merge).
        """
        return self.treedef.unflatten(self._delta_leaves(weights))

    def params(self, weights: jax.Array) -> Any:
        """The merged parameters ``θ* + Σ_t w_t · U_t S_t V_tᵀ`` for weights ``(T,)`` (shared leaves' dtypes).

        References: Lu et al., "Twin-Merging" (NeurIPS 2024).
        """
        shared = self.treedef.flatten_up_to(self.shared)
        out = [b if d is None else (jnp.asarray(b, jnp.float32) + d).astype(jnp.asarray(b).dtype)
               for b, d in zip(shared, self._delta_leaves(weights))]
        return self.treedef.unflatten(out)

    def storage(self) -> dict:
        """Storage of this Twin-Merging model against ``T`` full fine-tuned models (see :func:`twin_storage`).

        References: Lu et al., "Twin-Merging" (NeurIPS 2024), Sec. 4 (storage).
        """
        return twin_storage(self)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _shared_method(shared: str | Transform) -> Transform:
    if isinstance(shared, Transform):
        return shared
    if shared == "task_arithmetic":
        return task_arithmetic()
    if shared == "ties":
        return ties()
    raise MergeInputError(f"twin_merge: shared must be 'task_arithmetic', 'ties' or a jmerge Transform, "
                          f"got {shared!r}.")


def resolve_rank(rank: RankSpec, path: str, mshape: tuple[int, int, int], *, where: str = "twin_merge",
                 clamp: bool = False) -> int:
    """The rank kept for the matrix leaf ``path`` of matrix shape ``(batch, fan_in, fan_out)``.

    ``rank``: an int, ``"full"`` (``min(fan_in, fan_out)``), ``{path: rank}`` (missing paths: full) or a
    callable ``f(path, (batch, fan_in, fan_out)) -> rank``; ``clamp`` lowers a too-large rank to the full one.

    Raises:
      MergeInputError: a rank that is not a positive int or ``"full"``, or (unless ``clamp``) one larger than
        ``min(fan_in, fan_out)``; the message names ``where`` and the leaf.

    References: Eckart & Young (Psychometrika 1936): a matrix has at most ``min(m, n)`` singular values.
    """
    r = rank
    if isinstance(rank, Mapping):
        r = rank.get(path, "full")
    elif callable(rank):
        r = rank(path, mshape)
    return check_rank(r, min(mshape[1], mshape[2]), f"{where}: leaf '{path}' is a {mshape[1]}x{mshape[2]} matrix",
                      fix="'full', a per-leaf rank (a mapping or a callable), or clamp_rank=True.",
                      dims="min(fan_in, fan_out)", clamp=clamp)


def _energy_rank(s: np.ndarray, energy: float) -> np.ndarray:
    """Per matrix (leading axes of ``s``): the smallest rank whose σ² hold ``energy`` of Σσ² (>= 1)."""
    e = np.asarray(s, np.float64) ** 2
    tot = e.sum(-1, keepdims=True)
    frac = np.cumsum(e, -1) / np.where(tot > 0, tot, 1.0)
    r = np.sum(frac < energy - 1e-12, axis=-1) + 1
    return np.minimum(r, s.shape[-1]).astype(np.int64)


def twin_merge(base: Any, models: Sequence[Any], *, shared: str | Transform = "task_arithmetic",
               shared_hparams: Mapping[str, Any] | None = None, rank: RankSpec | None = None,
               energy: float | None = None, views: Any = None,
               vectors: Literal["dense", "shared"] = "dense", clamp_rank: bool = False, seed: int = 0) -> TwinMerge:
    """Stage 1 of Twin-Merging: the shared model and each task's SVD-compressed exclusive knowledge.

    Args:
      base: base (pretrained) params pytree ``θ_0``.
      models: ``T >= 1`` fine-tuned params pytrees ``θ_t`` with the base's structure.
      shared: how the shared model is merged: ``"task_arithmetic"``, ``"ties"`` (factory defaults) or any
        jmerge :class:`~jmerge.core.transform.Transform`.
      shared_hparams: hyperparameters of the shared merge (passed to :func:`jmerge.merge`; may be traced).
      rank: per matrix rank: an int, ``"full"``, ``{path: rank}`` (missing paths: full) or
        ``f(path, (batch, fan_in, fan_out)) -> rank``. Default ``"full"`` unless ``energy`` is given.
      energy: instead of ``rank``: keep the smallest rank holding this fraction (0, 1] of each matrix's
        ``Σσ²`` (needs concrete values: not under ``jit``).
      views: overrides of the inferred matrix views (see :func:`jmerge.core.views.infer_views`).
      vectors: non-matrix leaves: ``"dense"`` keeps ``θ_t − θ*`` in full, ``"shared"`` uses ``θ*`` only.
      clamp_rank: lower a rank larger than a matrix allows to its full rank instead of refusing it.
      seed: seed of random shared merges.

    Returns:
      :class:`TwinMerge`.

    Raises:
      MergeInputError: no models, models whose tree differs from the base's (naming the leaf path), a rank
        larger than a matrix allows (naming the leaf), both ``rank`` and ``energy``, a bad ``energy``.

    References: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
    (NeurIPS 2024); Eckart & Young (Psychometrika 1936).
    """
    models = list(models)
    T = check_num_tasks(len(models), "twin_merge")
    check_compatible(base, models)
    if rank is not None and energy is not None:
        raise MergeInputError("twin_merge: give rank or energy, not both.")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise MergeInputError(f"twin_merge: energy must be a fraction in (0, 1], got {energy!r}.")
    if vectors not in ("dense", "shared"):
        raise MergeInputError(f"twin_merge: vectors must be 'dense' or 'shared', got {vectors!r}.")
    rank = "full" if rank is None else rank
    method = _shared_method(shared)
    shared_tree = merge(method, base, models, hparams=shared_hparams, seed=seed)
    paths, shared_leaves, treedef = leaves_with_paths(shared_tree)
    model_leaves = [leaves_with_paths(m)[1] for m in models]
    leaf_views = infer_views(paths, [np.shape(x) for x in shared_leaves], views)
    exclusive, residual, info = [], [], []
    for i, (path, sh, view) in enumerate(zip(paths, shared_leaves, leaf_views)):
        shape = tuple(int(d) for d in np.shape(sh))
        if not _is_float(sh):
            exclusive.append(None), residual.append(None), info.append(LeafInfo(path, "shared", shape))
            continue
        v = jnp.stack([jnp.asarray(ml[i], jnp.float32) for ml in model_leaves]) - jnp.asarray(sh, jnp.float32)
        if view is None:
            if vectors == "dense":
                exclusive.append(v), residual.append(None), info.append(LeafInfo(path, "dense", shape))
            else:
                exclusive.append(None), residual.append(None), info.append(LeafInfo(path, "shared", shape))
            continue
        mats = view.to_matrices(v, lead=1)  # (T, b, m, n)
        mshape = view.matrix_shape(shape)
        u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
        if energy is not None:
            ranks = _energy_rank(np.asarray(s), float(energy))  # (T, b)
            r = int(ranks.max())
            keep = (np.arange(r)[None, None, :] < ranks[..., None])
            s_kept = jnp.where(jnp.asarray(keep), s[..., :r], 0.0)
            dropped = jnp.sum(jnp.where(jnp.asarray(keep), 0.0, s[..., :r] ** 2), -1) + jnp.sum(s[..., r:] ** 2, -1)
        else:
            r = resolve_rank(rank, path, mshape, clamp=clamp_rank)
            s_kept = s[..., :r]
            dropped = jnp.sum(s[..., r:] ** 2, -1)
        exclusive.append((u[..., :, :r], s_kept, vt[..., :r, :]))
        residual.append(jnp.sqrt(dropped))
        info.append(LeafInfo(path, "lowrank", shape, view, r))
    return TwinMerge(shared_tree, exclusive, residual, info, treedef, T)


def twin_storage(twin: TwinMerge) -> dict:
    """Entries and bytes stored by a Twin-Merging model against ``T`` full fine-tuned models.

    Returns:
      ``{"num_tasks", "model_params" (entries of one model), "shared_params", "factor_params"
      (Σ sizes of u, s, vt), "dense_params" (non-matrix exclusive leaves), "total_params"
      (shared + factors + dense), "full_models_params" (T · model_params), "ratio"
      (full_models / total), and the same counts in bytes (`*_bytes`; factors in float32)}``.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024), Sec. 4 (storage of the compressed experts).
    """
    shared = jax.tree.leaves(twin.shared)
    n_model = sum(int(np.size(x)) for x in shared)
    b_model = sum(int(np.size(x)) * jnp.asarray(x).dtype.itemsize for x in shared)
    fac = sum(sum(int(np.size(a)) for a in ex) for inf, ex in zip(twin.info, twin.exclusive) if inf.kind == "lowrank")
    dense = sum(int(np.size(ex)) for inf, ex in zip(twin.info, twin.exclusive) if inf.kind == "dense")
    total = n_model + fac + dense
    total_b = b_model + 4 * (fac + dense)
    T = twin.num_tasks
    return {"num_tasks": T, "model_params": n_model, "shared_params": n_model, "factor_params": fac,
            "dense_params": dense, "total_params": total, "full_models_params": T * n_model,
            "ratio": T * n_model / total, "total_bytes": total_b, "full_models_bytes": T * b_model,
            "ratio_bytes": T * b_model / total_b}


def twin_apply(apply_fn: Callable[[Any, Any], Any], twin: TwinMerge, x: Any, weights: jax.Array, *,
               per_input: bool = False) -> Any:
    """Stage 2: run ``apply_fn(params, x)`` with the dynamically merged parameters (jittable).

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` of any Flax (or other) model whose parameters have the
        shared tree's structure (e.g. ``lambda p, x: module.apply({"params": p}, x)``).
      twin: from :func:`twin_merge`.
      x: the batch (an array or pytree whose leaves have a leading batch axis ``N``).
      weights: ``(T,)`` or ``(N, T)`` routing weights (e.g. from a router's softmax; may be traced).
      per_input: False: one merged model per batch with the batch-averaged weights; True: one merged model
        per input (``vmap`` over inputs; each input runs as a batch of one).

    References: Lu et al., "Twin-Merging" (NeurIPS 2024): the router's weights merge the exclusive knowledge
    into the shared model per input.
    """
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim not in (1, 2) or w.shape[-1] != twin.num_tasks:
        raise MergeInputError(f"twin_apply: weights must be (T,) or (N, T) with T = {twin.num_tasks}, "
                              f"got shape {tuple(w.shape)}.")
    if not per_input:
        return apply_fn(twin.params(w if w.ndim == 1 else jnp.mean(w, axis=0)), x)
    n = jax.tree.leaves(x)[0].shape[0]
    if w.ndim == 1:
        w = jnp.broadcast_to(w, (n, twin.num_tasks))

    def one(wi, xi):
        out = apply_fn(twin.params(wi), jax.tree.map(lambda a: a[None], xi))
        return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(w, x)


def twin_forward(apply_fn: Callable[[Any, Any], Any], features_fn: Callable[[Any, Any], jax.Array], *,
                 per_input: bool = False) -> Callable:
    """A jittable ``f(twin, router_params, x, temperature=1.0) -> outputs``: features of ``x`` from the
    shared model (``features_fn(shared_params, x) -> (N, F)``), router softmax weights, then :func:`twin_apply`.

    References: Lu et al., "Twin-Merging" (NeurIPS 2024): the router reads the shared model's representation.
    """
    def f(twin: TwinMerge, router_params: Any, x: Any, temperature: float | jax.Array = 1.0):
        feats = features_fn(twin.shared, x)
        w = softmax_weights(router_logits(router_params, feats), temperature)
        return twin_apply(apply_fn, twin, x, w, per_input=per_input)

    return f

