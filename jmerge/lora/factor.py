"""Low-rank factors of a weight update by truncated SVD, in PEFT's LoRA orientation.

For an update ``D`` (``out x in``) with SVD ``D = U diag(s) Vh``, the rank-``r`` factors are the
balanced ones (mergekit-extract-lora's default ``--distribute-scale``)::

    A = diag(sqrt(s[:r])) @ Vh[:r]      (r, in)      B = U[:, :r] @ diag(sqrt(s[:r]))    (out, r)

so ``B @ A`` is the best rank-``r`` approximation of ``D`` in Frobenius (and spectral) norm, with
``||D - B @ A||_F^2 = sum(s[r:]**2)`` (Eckart-Young). The SVD runs in float32 with NumPy's LAPACK.

References: Eckart & Young, "The approximation of one matrix by another of lower rank" (Psychometrika 1936);
Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022).
"""

from __future__ import annotations

from typing import Union

import numpy as np

from ..core.errors import MergeInputError

__all__ = ["low_rank_factors", "resolve_rank", "check_rank", "Rank"]

Rank = Union[int, str]
"""A LoRA rank: a positive int, or ``"full"`` (``min(out, in)`` of each matrix)."""


def resolve_rank(rank: Rank, shape: tuple[int, ...], tensor: str, *, clamp: bool = False) -> int:
    """The rank used for one matrix of ``shape`` (``out, in``): ``rank``, checked against ``min(out, in)``.

    Args:
      rank: a positive int, or ``"full"``.
      shape: the matrix's shape.
      tensor: its name, for messages.
      clamp: use ``min(rank, min(out, in))`` instead of refusing a larger rank (mergekit's behaviour).

    Raises:
      MergeInputError: ``rank`` is not a positive int or ``"full"``, or exceeds ``min(out, in)`` (unless ``clamp``).

    References: Hu et al., "LoRA" (ICLR 2022): the rank of ``B @ A`` is at most ``min(out, in)``.
    """
    return check_rank(rank, int(min(shape)), f"tensor {tensor!r} {tuple(shape)}",
                      fix="rank='full', or clamp the rank", clamp=clamp)


def check_rank(rank: object, full: int, where: str, *, fix: str, dims: str = "min(out, in)",
               clamp: bool = False) -> int:
    """``rank`` checked against the largest rank ``full`` of one matrix, for messages located by ``where``.

    The one rank rule of jmerge's low-rank code (LoRA extraction and merging, Twin-Merging, SMILE):
    ``"full"`` means ``full``; otherwise a positive int, at most ``full`` unless ``clamp`` lowers it.

    Args:
      rank: a positive int, or ``"full"``.
      full: ``min(rows, cols)`` of the matrix.
      where: the start of an error message naming the matrix (tensor or leaf, its shape).
      fix: the other remedies listed after ``pass a rank <= full``.
      dims: how the message names ``full`` (``min(out, in)`` for PyTorch layouts).
      clamp: use ``min(rank, full)`` instead of refusing a larger rank.

    Raises:
      MergeInputError: ``rank`` is not a positive int or ``"full"``, or exceeds ``full`` (unless ``clamp``).

    References: Eckart & Young (Psychometrika 1936): a matrix has at most ``min(m, n)`` singular values.
    """
    if isinstance(rank, str):
        if rank != "full":
            raise MergeInputError(f"{where}: rank must be a positive integer or 'full', got {rank!r}")
        return full
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise MergeInputError(f"{where}: rank must be a positive integer or 'full', got {rank!r}")
    if rank > full:
        if clamp:
            return full
        raise MergeInputError(f"{where}: rank {rank} is larger than the matrix allows ({dims} = {full}); "
                              f"pass a rank <= {full}, {fix}")
    return int(rank)


def low_rank_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced rank-``rank`` factors ``(A, B)`` of ``delta`` (``out x in``) and the squared residual.

    Returns:
      ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` in float32, and ``sum(s[rank:]**2)``: the squared
      Frobenius norm of ``delta - B @ A`` in exact arithmetic.

    References: Eckart & Young (Psychometrika 1936); mergekit-extract-lora (``--distribute-scale``).
    """
    d = np.asarray(delta, dtype=np.float32)
    if d.ndim != 2:
        raise MergeInputError(f"low_rank_factors: expected a matrix, got shape {d.shape}")
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    k = int(rank)
    sq = np.sqrt(s[:k])
    a = (sq[:, None] * vh[:k]).astype(np.float32, copy=False)
    b = (u[:, :k] * sq[None, :]).astype(np.float32, copy=False)
    dropped = float(np.sum(np.square(s[k:].astype(np.float64))))
    return np.ascontiguousarray(a), np.ascontiguousarray(b), dropped
