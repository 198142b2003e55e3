"""``sweep.png`` of a sweep (``jmerge sweep``): lines for one varying parameter, a heatmap for two; matplotlib is
the ``demo`` extra (without it no PNG is written and a note says so).

References: matplotlib (``imshow``, ``scatter``).
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["plot"]


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(records: Sequence[Mapping[str, Any]], metric: str) -> bytes | str:
    """``sweep.png``'s bytes: lines of ``metric`` over one varying numeric parameter, a heatmap over two (a
    scatter coloured by the metric when the two do not form a grid); a note (str) when there is no plot.

    References: matplotlib (``imshow``, ``scatter``).
    """
    ok = [r for r in records if r["status"] == "ok" and _numeric(r["metrics"].get(metric))]
    if not ok:
        return "no successful setting to plot"
    names = sorted({k for r in records for k in r["params"]})
    varying = [k for k in names if all(_numeric(r["params"].get(k)) for r in ok)
               and len({r["params"].get(k) for r in ok}) > 1]
    if len(varying) not in (1, 2):
        return f"sweep.png skipped: {len(varying)} numeric parameters vary (a plot needs one or two)"
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "sweep.png skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(varying) == 1:
        k = varying[0]
        pts = sorted((r["params"][k], r["metrics"][metric]) for r in ok)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
    else:
        kx, ky = varying
        xs = sorted({r["params"][kx] for r in ok})
        ys = sorted({r["params"][ky] for r in ok})
        z = np.full((len(ys), len(xs)), np.nan)
        for r in ok:
            z[ys.index(r["params"][ky]), xs.index(r["params"][kx])] = r["metrics"][metric]
        if len(ok) == len(xs) * len(ys) and not np.isnan(z).any() or len(xs) * len(ys) <= 4 * len(ok):
            im = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            for (i, j), v in np.ndenumerate(z):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.4g}", ha="center", va="center", color="w", fontsize=8)
        else:
            im = ax.scatter([r["params"][kx] for r in ok], [r["params"][ky] for r in ok],
                            c=[r["metrics"][metric] for r in ok], cmap="viridis")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
    ax.set_title(f"sweep: {metric}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
