"""Mixture-of-experts dispatch: top-k routing, tokens grouped by expert, grouped SwiGLU matmuls, combine.

Three implementations of the same layer, chosen by ``moe_dispatch(..., impl=...)``:

- ``"ragged"``: ``jax.lax.ragged_dot`` over the expert-sorted rows (the reference path and ``"auto"``'s choice).
- ``"pallas"``: a Pallas grouped matmul over the expert-sorted rows, each expert's group padded to
  whole row tiles (opt-in: compiled on a GPU/TPU, in the Pallas interpreter on CPU).
- ``"dense"``: every expert on every token, combined with one-hot routing weights (``moe_dense_reference``;
  for checks and benchmarks; ``E / top_k`` times the FLOPs).

Expert weights use the ``x @ W`` layout: ``w_gate``, ``w_up`` are ``(E, hidden, ffn)``, ``w_down`` is
``(E, ffn, hidden)`` (Hugging Face's Mixtral ``w1``/``w3``/``w2`` linear weights transposed). Each expert
computes ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``; matmuls accumulate in float32 and round their result
to ``x.dtype`` (as a bfloat16 PyTorch linear does); routing is computed in float32.

``expert="linear"`` gives every expert the gate-less two-matmul form ``(x @ w_up) @ w_down`` (``w_gate=None``;
``w_down`` may map to any output width): a LoRA expert ``x A_e^T B_e^T`` with ``w_up[e] = A_e^T``,
``w_down[e] = B_e^T`` (down to the rank, then up), with the same routing, grouping, grouped matmuls and combine.

References: Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer" (ICLR 2017); Fedus et al., "Switch Transformers" (JMLR 2022); Jiang et al., "Mixtral of Experts"
(2024); Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (MLSys 2023).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = ["MoEGroups", "group_by_expert", "grouped_matmul", "moe_dense_reference", "moe_dispatch",
           "top_k_routing"]

_IMPLS = ("auto", "ragged", "pallas", "dense")
# What "auto" runs on every backend. The Pallas grouped matmul is opt-in: its first layout (whole lhs per
# grid step) did not compile for an H200 (shared memory, Triton's power-of-two shapes; 2026-11-30); the tiled
# layout ran 1.1-7.4x ragged_dot at 4 of 5 sizes there (scripts/bench_kernels.py, README) but has no VJP,
# and "auto" stays differentiable.
_AUTO = "ragged"
_EXPERTS = ("swiglu", "linear")


def top_k_routing(router_logits: Float[ArrayLike, "tokens experts"], top_k: int, *, normalize: bool = True
                  ) -> tuple[Float[Array, "tokens k"], Int[Array, "tokens k"]]:
    """Softmax over the router logits, then the ``top_k`` experts of each token.

    Args:
      router_logits: ``(tokens, experts)`` router logits (any float dtype; softmax in float32).
      top_k: experts per token (``1 <= top_k <= experts``).
      normalize: divide the kept probabilities by their sum (Mixtral, ``norm_topk_prob``); otherwise keep
        the softmax probabilities (Switch Transformer, Qwen2-MoE without ``norm_topk_prob``).

    Returns:
      ``(weights, expert_ids)``: float32 ``(tokens, top_k)`` weights, largest first, and int32 expert ids
      (distinct per token; ties go to the lower expert id, as ``jax.lax.top_k`` breaks them).

    References: Shazeer et al., "Outrageously Large Neural Networks" (ICLR 2017); Jiang et al.,
    "Mixtral of Experts" (2024).
    """
    logits = jnp.asarray(router_logits)
    if logits.ndim != 2:
        raise ValueError(f"router_logits must be (tokens, experts), got shape {logits.shape}.")
    E = logits.shape[1]
    if not 1 <= int(top_k) <= E:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({E}).")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, int(top_k))
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


class MoEGroups(NamedTuple):
    """Token rows sorted by expert: ``order`` maps a sorted row to its ``(token, slot)`` row ``token*k+slot``.

    Attributes:
      order: ``(tokens*k,)`` int32 permutation; sorted row ``r`` is flat assignment ``order[r]``.
      token_index: ``(tokens*k,)`` int32 token of each sorted row (``order // k``).
      expert_ids: ``(tokens*k,)`` int32 expert of each sorted row (non-decreasing).
      group_sizes: ``(experts,)`` int32 rows per expert (sum ``tokens*k``; each at most ``tokens``).

    References: Gale et al., "MegaBlocks" (MLSys 2023).
    """

    order: Int[Array, " rows"]
    token_index: Int[Array, " rows"]
    expert_ids: Int[Array, " rows"]
    group_sizes: Int[Array, " experts"]


def group_by_expert(expert_ids: Int[ArrayLike, "tokens k"], num_experts: int) -> MoEGroups:
    """Sort the ``tokens*k`` (token, expert) assignments by expert (stable: token order within an expert).

    References: Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (MLSys 2023).
    """
    ids = jnp.asarray(expert_ids, jnp.int32)
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return MoEGroups(order, order // k, flat[order], sizes)


def _swiglu(gate, up):
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _combine(y_sorted, groups: MoEGroups, weights, n_tokens: int, dtype, cast_weights: bool = True):
    """Scatter sorted expert outputs back to (token, slot) order and sum them with the routing weights."""
    k = weights.shape[1]
    y = jnp.zeros_like(y_sorted).at[groups.order].set(y_sorted, unique_indices=True)
    y = y.reshape(n_tokens, k, -1).astype(jnp.float32)
    w = weights.astype(dtype) if cast_weights else weights  # rounded to the hidden dtype (Qwen2-MoE) or not
    w = w.astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", y, w).astype(dtype)


def _check(x, router_logits, w_gate, w_up, w_down):
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}; flatten batch and sequence first.")
    N, H = x.shape
    if w_gate.ndim != 3 or w_gate.shape[1] != H or w_up.shape != w_gate.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must both be (experts, {H}, ffn).")
    E, _, F = w_gate.shape
    if w_down.shape != (E, F, H):
        raise ValueError(f"w_down {w_down.shape} must be (experts, ffn, hidden) = {(E, F, H)}.")
    if router_logits.shape != (N, E):
        raise ValueError(f"router_logits {router_logits.shape} must be (tokens, experts) = {(N, E)}.")


def _check_linear(x, router_logits, w_gate, w_up, w_down):
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {x.shape}; flatten batch and sequence first.")
    N, H = x.shape
    if w_gate is not None:
        raise ValueError("expert='linear' has no gate: pass w_gate=None (each expert is (x @ w_up) @ w_down).")
    if w_up.ndim != 3 or w_up.shape[1] != H:
        raise ValueError(f"w_up {w_up.shape} must be (experts, {H}, rank) for expert='linear'.")
    E, _, F = w_up.shape
    if w_down.ndim != 3 or w_down.shape[:2] != (E, F):
        raise ValueError(f"w_down {w_down.shape} must be (experts, rank, out) = ({E}, {F}, out) for expert='linear'.")
    if router_logits.shape != (N, E):
        raise ValueError(f"router_logits {router_logits.shape} must be (tokens, experts) = {(N, E)}.")


def _prepare(x, router_logits, w_gate, w_up, w_down, expert):
    """Arrays, checked for the expert form; ``w_gate`` stays None for ``expert="linear"``."""
    if expert not in _EXPERTS:
        raise ValueError(f"expert must be one of {', '.join(_EXPERTS)}; got {expert!r}.")
    x, router_logits = jnp.asarray(x), jnp.asarray(router_logits)
    if expert == "linear":
        w_up, w_down = jnp.asarray(w_up), jnp.asarray(w_down)
        _check_linear(x, router_logits, w_gate, w_up, w_down)
        return x, router_logits, None, w_up, w_down
    if w_gate is None:
        raise ValueError("w_gate is None: the SwiGLU expert needs a gate; use expert='linear' for (x @ w_up) @ w_down.")
    w_gate, w_up, w_down = (jnp.asarray(w) for w in (w_gate, w_up, w_down))
    _check(x, router_logits, w_gate, w_up, w_down)
    return x, router_logits, w_gate, w_up, w_down


def _gmm_kernel(owner_ref, lhs_ref, rhs_ref, out_ref, *, tk: int, n_k: int):
    """Grid (row tile i, column block j): ``lhs[tile i] @ rhs[owner[i]][:, block j]``, accumulated over K chunks."""
    e = owner_ref[pl.program_id(0)]

    @pl.when(e < 0)  # a tile in no expert's group: zeros
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    @pl.when(e >= 0)
    def _():
        def body(c, acc):
            k0 = pl.multiple_of(c * tk, tk)
            a = lhs_ref[:, pl.ds(k0, tk)]
            b = rhs_ref[e, pl.ds(k0, tk), :]
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(out_ref.shape, jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def grouped_matmul(lhs: Float[ArrayLike, "rows k"], rhs: Float[ArrayLike, "experts k n"],
                   tile_starts: Int[ArrayLike, " experts"], tile_counts: Int[ArrayLike, " experts"], *,
                   block_rows: int = 128, block_cols: int = 128, block_k: int = 32, interpret: bool | None = None
                   ) -> Float[Array, "rows n"]:
    """Pallas grouped matmul: rows ``[s, s + c*block_rows)`` of ``lhs`` times ``rhs[e]`` for each expert ``e``.

    ``lhs`` holds each expert's rows as whole tiles of ``block_rows`` rows (group padded with zero rows,
    ``tile_starts[e]`` a multiple of ``block_rows``, groups disjoint); rows in no group come out zero. The
    grid is (row tiles, column blocks): each step finds its tile's expert, multiplies the ``(block_rows, k)``
    row tile by that expert's ``(k, block_cols)`` weight block in ``block_k`` chunks (float32 accumulator)
    and writes one output tile (the "grouped GEMM" of MegaBlocks, without a block-sparse layout). The result
    has ``lhs``'s dtype. Written for and measured on a GPU (an H200); not yet compiled for a TPU. Compiled
    for a GPU (Pallas' Triton lowering), the tiles must be powers of two of at least 16: ``block_cols`` and
    ``block_k`` are rounded up to that (``k`` and ``n`` zero-padded), and ``block_rows`` must already be one.

    Args:
      lhs: ``(rows, k)`` expert-sorted, tile-padded rows (``rows`` a multiple of ``block_rows``).
      rhs: ``(experts, k, n)`` per-expert weights.
      tile_starts: ``(experts,)`` int32 first row of each expert's group.
      tile_counts: ``(experts,)`` int32 number of ``block_rows`` tiles of each group (0 for an empty expert).
      block_rows: rows per tile (a multiple of 8; on a GPU a power of two >= 16).
      block_cols: output columns per grid step (``n`` is padded to a multiple of it).
      block_k: contraction chunk per matmul step (``k`` is padded to a multiple of it).
      interpret: run the Pallas interpreter; default True on CPU, False on GPU/TPU.

    Returns:
      ``(rows, n)`` array of ``lhs.dtype``.

    References: Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (MLSys 2023).
    """
    lhs = jnp.asarray(lhs)
    rhs = jnp.asarray(rhs).astype(lhs.dtype)
    M, K = lhs.shape
    E, K2, N = rhs.shape
    tm = int(block_rows)
    if K2 != K or M % tm:
        raise ValueError(f"lhs {lhs.shape} must be (rows, {K2}) with rows a multiple of block_rows={tm}.")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    lo = 1 if interpret else 16
    if not interpret and (tm < 16 or tm & (tm - 1)):
        raise ValueError(f"block_rows={tm}: compiled for a GPU the row tile must be a power of two >= 16.")
    tn = _pow2_at_least(min(int(block_cols), N), lo) if not interpret else min(int(block_cols), N)
    tk = _pow2_at_least(min(int(block_k), K), lo) if not interpret else min(int(block_k), K)
    Np, Kp = -(-N // tn) * tn, -(-K // tk) * tk
    if Kp != K:
        lhs = jnp.pad(lhs, ((0, 0), (0, Kp - K)))
    if Np != N or Kp != K:
        rhs = jnp.pad(rhs, ((0, 0), (0, Kp - K), (0, Np - N)))
    # the expert owning each row tile (-1: in no group)
    starts = jnp.asarray(tile_starts, jnp.int32) // tm
    counts = jnp.asarray(tile_counts, jnp.int32)
    t = jnp.arange(M // tm, dtype=jnp.int32)[:, None]
    inside = (t >= starts[None, :]) & (t < (starts + counts)[None, :])
    owner = jnp.where(jnp.any(inside, axis=1), jnp.argmax(inside, axis=1), -1).astype(jnp.int32)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tk=tk, n_k=Kp // tk),
        out_shape=jax.ShapeDtypeStruct((M, Np), lhs.dtype),
        grid=(M // tm, Np // tn),
        in_specs=[pl.BlockSpec((M // tm,), lambda i, j: (0,)),
                  pl.BlockSpec((tm, Kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((E, Kp, tn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=interpret,
    )(owner, lhs, rhs)
    return out[:, :N] if Np != N else out


def _experts_ragged(xs, sizes, w_gate, w_up, w_down):
    def mm(a, w):
        return jax.lax.ragged_dot(a, w.astype(a.dtype), sizes, preferred_element_type=jnp.float32).astype(a.dtype)

    if w_gate is None:  # expert="linear"
        return mm(mm(xs, w_up), w_down)
    return mm(_swiglu(mm(xs, w_gate), mm(xs, w_up)), w_down)


def _experts_pallas(xs, sizes, w_gate, w_up, w_down, *, block_rows, block_cols, interpret):
    """Expert-sorted rows padded so that each expert's group is whole ``block_rows`` tiles, grouped matmuls."""
    R = xs.shape[0]
    E = sizes.shape[0]
    compiled = not (jax.default_backend() == "cpu" if interpret is None else interpret)
    tm = _pow2_at_least(int(block_rows), 16) if compiled else int(block_rows)  # Triton's tiles: powers of two >= 16
    tiles = (sizes + tm - 1) // tm
    tile_starts = (jnp.cumsum(tiles) - tiles) * tm
    starts = jnp.cumsum(sizes) - sizes
    eid = jnp.repeat(jnp.arange(E, dtype=jnp.int32), sizes, total_repeat_length=R)
    dest = tile_starts[eid] + jnp.arange(R, dtype=jnp.int32) - starts[eid]  # row of each sorted row, padded
    M = -(-(R + E * (tm - 1)) // tm) * tm  # every group padded to whole tiles fits
    xp = jnp.zeros((M, xs.shape[1]), xs.dtype).at[dest].set(xs, unique_indices=True)
    gmm = functools.partial(grouped_matmul, tile_starts=tile_starts, tile_counts=tiles, block_rows=tm,
                            block_cols=block_cols, interpret=interpret)
    if w_gate is None:  # expert="linear"
        return gmm(gmm(xp, w_up), w_down)[dest]
    h = _swiglu(gmm(xp, w_gate), gmm(xp, w_up))
    return gmm(h, w_down)[dest]


def _dense(x, w_gate, w_up, w_down, weights, ids, cast_weights):
    """Every expert on every token (weights already in ``x.dtype``), combined with one-hot routing weights."""
    E = w_up.shape[0]
    w = (weights.astype(x.dtype) if cast_weights else weights).astype(jnp.float32)
    combine = jnp.einsum("nk,nke->ne", w, jax.nn.one_hot(ids, E, dtype=jnp.float32))

    def mm(spec, a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(x.dtype)

    if w_gate is None:  # expert="linear"
        h = mm("nh,ehf->enf", x, w_up)
    else:
        h = _swiglu(mm("nh,ehf->enf", x, w_gate), mm("nh,ehf->enf", x, w_up))
    y = mm("enf,efh->enh", h, w_down)
    return jnp.einsum("ne,enh->nh", combine, y.astype(jnp.float32)).astype(x.dtype)


def moe_dense_reference(x: Float[ArrayLike, "tokens hidden"], router_logits: Float[ArrayLike, "tokens experts"],
                        w_gate: Float[ArrayLike, "experts hidden ffn"] | None,
                        w_up: Float[ArrayLike, "experts hidden ffn"], w_down: Float[ArrayLike, "experts ffn out"],
                        top_k: int, *, normalize: bool = True, cast_weights: bool = True,
                        expert: str = "swiglu") -> Float[Array, "tokens out"]:
    """The MoE layer computed densely: every expert on every token, summed with one-hot routing weights.

    Same arguments, numerics and result as ``moe_dispatch``; ``experts / top_k`` times its FLOPs.

    References: Shazeer et al., "Outrageously Large Neural Networks" (ICLR 2017); Fedus et al.,
    "Switch Transformers" (JMLR 2022).
    """
    x, router_logits, w_gate, w_up, w_down = _prepare(x, router_logits, w_gate, w_up, w_down, expert)
    w_gate, w_up, w_down = (None if w is None else w.astype(x.dtype) for w in (w_gate, w_up, w_down))
    weights, ids = top_k_routing(router_logits, top_k, normalize=normalize)
    return _dense(x, w_gate, w_up, w_down, weights, ids, cast_weights)


def moe_dispatch(x: Float[ArrayLike, "tokens hidden"], router_logits: Float[ArrayLike, "tokens experts"],
                 w_gate: Float[ArrayLike, "experts hidden ffn"] | None, w_up: Float[ArrayLike, "experts hidden ffn"],
                 w_down: Float[ArrayLike, "experts ffn out"], top_k: int, *, normalize: bool = True,
                 impl: str = "auto", block_rows: int = 128, block_cols: int = 128,
                 interpret: bool | None = None, cast_weights: bool = True, expert: str = "swiglu",
                 return_routing: bool = False
                 ) -> Float[Array, "tokens out"] | tuple[Float[Array, "tokens out"],
                                                         tuple[Float[Array, "tokens k"], Int[Array, "tokens k"]]]:
    """A sparse mixture-of-experts SwiGLU (or linear) layer: route, group tokens by expert, grouped matmuls, combine.

    Routing: ``softmax(router_logits)`` in float32, the ``top_k`` experts per token, renormalised to sum
    to 1 when ``normalize`` (Mixtral). The ``tokens*top_k`` assignments are sorted by expert
    (``group_by_expert``), each expert's rows go through ``(silu(x W_gate) * (x W_up)) W_down`` as a
    grouped matmul, and the outputs are summed back per token with the routing weights. With
    ``expert="linear"`` each expert is ``(x W_up) W_down`` instead (no gate, no activation; e.g. a LoRA
    expert: ``W_up = A^T`` down to the rank, ``W_down = B^T`` up to the output). The ``ragged`` and
    ``dense`` paths are differentiable (``jax.grad``); the Pallas path defines no VJP yet (inference).

    Args:
      x: ``(tokens, hidden)`` activations (float32 or bfloat16; the result has this dtype).
      router_logits: ``(tokens, experts)`` router logits.
      w_gate: ``(experts, hidden, ffn)`` gate projections (``x @ w_gate[e]``); None for ``expert="linear"``.
      w_up: ``(experts, hidden, ffn)`` up projections (``expert="linear"``: the first matmul, ffn = rank).
      w_down: ``(experts, ffn, hidden)`` down projections (``expert="linear"``: ``(experts, ffn, out)``, any out).
      top_k: experts per token.
      normalize: renormalise the kept routing weights (Mixtral); False keeps softmax probabilities.
      impl: ``"auto"`` (``"ragged"``; the Pallas path is opt-in), ``"ragged"`` (``jax.lax.ragged_dot``),
        ``"pallas"`` (``grouped_matmul``) or ``"dense"`` (``moe_dense_reference``).
      block_rows: Pallas row tile; each expert's group is padded to a multiple of it.
      block_cols: Pallas output columns per grid step.
      interpret: Pallas interpreter; default True on CPU.
      cast_weights: round the routing weights to ``x.dtype`` before the (float32) combine, as Qwen2-MoE
        does; False keeps them float32 (Mixtral in transformers 5). No effect for float32 ``x``.
      expert: ``"swiglu"`` (``(silu(x W_gate) * (x W_up)) W_down``) or ``"linear"`` (``(x W_up) W_down``,
        ``w_gate=None``); both round each matmul's float32 accumulation to ``x.dtype``.
      return_routing: also return the routing ``(weights, expert_ids)`` of ``top_k_routing``.

    Returns:
      ``(tokens, hidden)`` layer output (``(tokens, out)`` for ``expert="linear"``); with ``return_routing``,
      ``(output, (weights, expert_ids))``.

    References: Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
    Layer" (ICLR 2017); Fedus et al., "Switch Transformers" (JMLR 2022); Gale et al., "MegaBlocks" (MLSys 2023).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}.")
    if impl == "auto":
        impl = _AUTO
    x, router_logits, w_gate, w_up, w_down = _prepare(x, router_logits, w_gate, w_up, w_down, expert)
    weights, ids = top_k_routing(router_logits, top_k, normalize=normalize)
    if impl == "dense":
        out = _dense(x, *(None if w is None else w.astype(x.dtype) for w in (w_gate, w_up, w_down)), weights, ids,
                     cast_weights)
        return (out, (weights, ids)) if return_routing else out
    groups = group_by_expert(ids, w_up.shape[0])
    xs = x[groups.token_index]
    if impl == "ragged":
        ys = _experts_ragged(xs, groups.group_sizes, w_gate, w_up, w_down)
    else:
        ys = _experts_pallas(xs, groups.group_sizes, None if w_gate is None else w_gate.astype(x.dtype),
                             w_up.astype(x.dtype), w_down.astype(x.dtype), block_rows=block_rows,
                             block_cols=block_cols, interpret=interpret)
    out = _combine(ys, groups, weights, x.shape[0], x.dtype, cast_weights)
    return (out, (weights, ids)) if return_routing else out
