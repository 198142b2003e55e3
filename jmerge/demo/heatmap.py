"""A heatmap of MoE expert load per layer (``jmerge experts stats --png``); matplotlib is the ``demo`` extra.

References: Hunter (2007), "Matplotlib: A 2D Graphics Environment".
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

__all__ = ["expert_heatmap"]


def expert_heatmap(loads: Mapping[str, np.ndarray], path: str) -> str:
    """Write one panel per task of the ``[MoE layers, experts]`` load fractions to a PNG, atomically.

    Args:
      loads: ``{task: [layers, experts] counts}`` (task ``""``: no task); each row is shown as fractions.
      path: the PNG to write.

    Returns:
      A one-line message: where the heatmap went, or that matplotlib is missing (nothing written).

    References: Hunter (2007), "Matplotlib: A 2D Graphics Environment".
    """
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no heatmap: matplotlib is not installed (pip install 'jmerge[demo]')"
    fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3), squeeze=False)
    for ax, (task, load) in zip(axes[0], loads.items()):
        load = np.asarray(load, np.float64)
        rows = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"task {task}" if task else "expert load")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return f"heatmap written to {path}"
