"""The eight digit tasks of the demo benchmark: an input transform and a label function each.

Data: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, pixel values 0..16, shipped
with scikit-learn, no download). Pixels are scaled to [0, 1]. Every task sees the same train/test
split of the images; it differs in how the image is transformed and in what is predicted, so the
fine-tuned backbones learn different (and partly conflicting) features, as the eight vision tasks
of the CLIP merging benchmarks do.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

__all__ = ["Task", "TASKS", "load_images", "split_indices", "split_train_val_test", "task_data", "shift_right"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: ``x -> transform(x)``, ``digit -> label(digit)`` with ``num_classes`` classes.

    Attributes:
      name: short name used in tables.
      description: what is predicted from what.
      num_classes: number of labels.
      transform: ``(N, 8, 8) float32 in [0, 1] -> (N, 8, 8) float32``; deterministic.
      label: ``(N,) int digits -> (N,) int labels``.
    """

    name: str
    description: str
    num_classes: int
    transform: Callable[[np.ndarray], np.ndarray]
    label: Callable[[np.ndarray], np.ndarray]


def shift_right(images: np.ndarray, pixels: int = 2) -> np.ndarray:
    """Translate images right by ``pixels`` columns, filling the left with zeros."""
    out = np.zeros_like(images)
    out[:, :, pixels:] = images[:, :, :-pixels]
    return out


def _noise(images: np.ndarray) -> np.ndarray:
    # A fixed noise pattern per image position in the dataset order (deterministic).
    rng = np.random.default_rng(1234)
    return (images + 0.3 * rng.standard_normal(images.shape)).astype(np.float32)


_PRIMES = np.array([False, False, True, True, False, True, False, True, False, False])

TASKS: tuple[Task, ...] = (
    Task("rot90-digit", "digit (10 classes) of the image rotated 90 degrees", 10,
         lambda x: np.rot90(x, k=1, axes=(1, 2)).copy(), lambda d: d.copy()),
    Task("flip-parity", "parity of the digit, image mirrored left-right", 2,
         lambda x: x[:, :, ::-1].copy(), lambda d: d % 2),
    Task("invert-gt4", "digit > 4, inverted image (1 - x)", 2,
         lambda x: 1.0 - x, lambda d: (d > 4).astype(d.dtype)),
    Task("noise-mod3", "digit mod 3, Gaussian pixel noise (sigma 0.3)", 3,
         _noise, lambda d: d % 3),
    Task("shift-digit", "digit (10 classes), image shifted right by 2 pixels", 10,
         shift_right, lambda d: d.copy()),
    Task("transpose-prime", "digit is prime (2, 3, 5, 7), transposed image", 2,
         lambda x: np.swapaxes(x, 1, 2).copy(), lambda d: _PRIMES[d].astype(d.dtype)),
    Task("rot180-quarter", "digit // 4 (0-3, 4-7, 8-9), image rotated 180 degrees", 3,
         lambda x: x[:, ::-1, ::-1].copy(), lambda d: d // 4),
    Task("dim-mod5", "digit mod 5, low-contrast image (0.25 + 0.5 x)", 5,
         lambda x: 0.25 + 0.5 * x, lambda d: d % 5),
)


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images ``(N, 8, 8)`` float32 in [0, 1] and digits ``(N,)`` int32."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a demo dependency
        raise ImportError("the jmerge demo needs scikit-learn for its digits data: pip install scikit-learn") from e
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def split_indices(n: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of ``range(n)`` shared by all tasks."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_train_val_test(n: int, test_fraction: float = 0.3, val_fraction: float = 0.15,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices of ``range(n)``, shared by all tasks.

    The test set is exactly :func:`split_indices`'s (same ``seed`` and ``test_fraction``); the
    validation set is ``round(n * val_fraction)`` images taken from its training part, so the
    validation images (used to choose hyperparameters) never overlap training or test images.

    References: Hastie, Tibshirani and Friedman, "The Elements of Statistical Learning", 7.2 (2009).
    """
    tr, te = split_indices(n, test_fraction, seed)
    n_val = int(round(n * val_fraction))
    val = np.sort(np.random.default_rng(seed + 1).permutation(tr)[:n_val])
    return np.setdiff1d(tr, val), val, te


def task_data(task: Task, images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transformed images flattened to ``(N, 64)`` float32 and labels ``(N,)`` int32."""
    x = task.transform(images).astype(np.float32).reshape(len(images), 64)
    return x, task.label(digits).astype(np.int32)
