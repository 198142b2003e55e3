"""Sweep outputs: JSON-safe values, ``results.csv`` / ``results.json``, atomic writes (the plot is
:func:`jmerge.demo.sweep_plot.plot`, where matplotlib may be imported).

References: none (file formats: RFC 4180 CSV, JSON).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from ..core import Gradient, PerModel, Rules

__all__ = ["jsonable", "atomic_write", "write_tables"]


def jsonable(v: Any) -> Any:
    """A JSON-safe form of a hyperparameter value (``PerModel`` -> ``{"per_model": [...]}`` ...).

    References: none (infrastructure).
    """
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return float(v)
    if isinstance(v, PerModel):
        return {"per_model": jsonable(list(np.asarray(v.specs)) if isinstance(v.specs, np.ndarray) else list(v.specs))}
    if isinstance(v, Gradient):
        return {"gradient": jsonable(list(v.values))}
    if isinstance(v, Rules):
        return {"rules": [[f, jsonable(x)] for f, x in v.rules], "default": jsonable(v.default)}
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return jsonable(v.tolist())
    return repr(v)


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``path`` through a temporary file in its directory and a rename (never half-written).

    References: none (POSIX ``rename`` atomicity).
    """
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else str(v)


def write_tables(out_dir: str, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    """``results.json`` (meta + every record) and ``results.csv`` (one row per record: index, budget, status,
    each parameter, each metric, error).

    References: RFC 4180 (CSV).
    """
    params = sorted({k for r in records for k in r["params"]})
    metrics = sorted({k for r in records for k in r["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "budget", "status"] + params + metrics + ["error"])
    for r in records:
        w.writerow([r["index"], _cell(r.get("budget")), r["status"]] + [_cell(r["params"].get(p)) for p in params]
                   + [_cell(r["metrics"].get(m)) for m in metrics] + [_cell(r.get("error"))])
    atomic_write(os.path.join(out_dir, "results.csv"), buf.getvalue())
    body = {**meta, "results": list(records)}
    atomic_write(os.path.join(out_dir, "results.json"),
                 json.dumps(body, indent=1, allow_nan=True, default=str) + "\n")
