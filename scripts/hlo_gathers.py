"""Count the collectives in the compiled HLO of sharded merges, per registered method.

For every method in ``jmerge.methods.METHODS`` (or those named), jits ``jmerge.merge(method(), base,
models)`` on one leaf sharded over a mesh of 8 simulated CPU devices, compiles it, and counts in
``compiled.as_text()`` the all-gathers whose result holds at least a full leaf's element count
("full-leaf gathers": a whole tensor, or the stacked task vectors, on every device), the other
all-gathers, and the other collectives (all-reduce, reduce-scatter, all-to-all, collective-permute).

Layouts: ``col`` (1024, 512) ``P(None, 'model')`` (the usual Dense kernel), ``row`` (1024, 512)
``P('model', None)``, ``bias`` (4096,) ``P('model')``, ``odd`` (1001, 520) ``P(None, 'model')`` (65 columns
per device: rows and shards that do not divide into the 32-entry blocks of the counting passes).

Also ``ties_global`` (``ties(scope="global")``: the whole-model top-k).

Usage: python scripts/hlo_gathers.py [--methods ties,dare_ties] [--layouts col,row] [--md]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

LAYOUTS = {"col": ((1024, 512), (None, "model")), "row": ((1024, 512), ("model", None)),
           "bias": ((4096,), ("model",)), "odd": ((1001, 520), (None, "model"))}

# Variants measured besides the registered defaults: name -> factory (imports jmerge lazily).
EXTRA = {"ties_global": lambda: __import__("jmerge").ties(scope="global")}

_COLL = re.compile(r"=\s*(\(?[^=]*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                   r"(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str, full: int) -> dict:
    """Counts of collectives in HLO text: ``full_gathers`` (result >= ``full`` elements), ``gathers``
    (other all-gathers), and one count per other collective kind."""
    out = {"full_gathers": 0, "gathers": 0, "all-reduce": 0, "reduce-scatter": 0, "all-to-all": 0,
           "collective-permute": 0}
    for line in hlo.splitlines():
        m = _COLL.search(line)
        if not m:
            continue
        kind = m.group(2)
        if kind == "all-gather":
            sizes = [int(__import__("numpy").prod([int(d) for d in s.split(",") if d] or [1]))
                     for s in _SHAPE.findall(m.group(1))]
            out["full_gathers" if sizes and max(sizes) >= full else "gathers"] += 1
        else:
            out[kind] += 1
    return out


def measure(name: str, layout: str, T: int | None = None, seed: int = 0):
    """``(counts, merged, single_device_merged)`` for method ``name`` on layout ``layout``."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jmerge
    from jmerge.methods import METHODS

    shape, spec = LAYOUTS[layout]
    method = EXTRA[name]() if name in EXTRA else METHODS[name]()
    if T is None:
        T = 3
        if method.max_models is not None:
            T = min(T, method.max_models)
        T = max(T, method.min_models)
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    sh = NamedSharding(mesh, P(*spec))
    rng = np.random.default_rng(seed)
    path = "layers.0.mlp.w" if len(shape) > 1 else "layers.0.mlp.b"
    base_np = rng.standard_normal(shape).astype(np.float32)
    models_np = [base_np + 0.1 * rng.standard_normal(shape).astype(np.float32) for _ in range(T)]
    base = {path: jax.device_put(base_np, sh)}
    models = [{path: jax.device_put(m, sh)} for m in models_np]
    f = jax.jit(lambda b, ms: jmerge.merge(method, b, ms, seed=1))
    compiled = f.lower(base, models).compile()
    counts = collectives(compiled.as_text(), int(np.prod(shape)))
    out = np.asarray(compiled(base, models)[path])
    one = jax.devices()[0]
    ref = np.asarray(jmerge.merge(method, {path: jax.device_put(base_np, one)},
                                  [{path: jax.device_put(m, one)} for m in models_np], seed=1)[path])
    return counts, out, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated method names (default: all registered)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated of {sorted(LAYOUTS)}")
    p.add_argument("--md", action="store_true", help="print a Markdown table")
    a = p.parse_args(argv)
    import jax
    import numpy as np

    from jmerge.methods import METHODS

    assert len(jax.devices()) >= 8, jax.devices()
    names = [n for n in a.methods.split(",") if n] or sorted(METHODS) + sorted(EXTRA)
    layouts = [x for x in a.layouts.split(",") if x]
    if a.md:
        print("| method | " + " | ".join(layouts) + " | equal 1 device |")
        print("|---|" + "---|" * (len(layouts) + 1))
    for name in names:
        cells, eq = [], []
        for lay in layouts:
            try:
                c, out, ref = measure(name, lay)
            except Exception as e:  # noqa: BLE001 - report and go on
                cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            other = {k: v for k, v in c.items() if v and k not in ("full_gathers",)}
            cells.append(f"{c['full_gathers']}" + (f" ({', '.join(f'{k} {v}' for k, v in other.items())})"
                                                   if other else ""))
            same = np.array_equal(out, ref, equal_nan=True)
            eq.append("=" if same else f"{np.max(np.abs(out - ref)):.1e}")
        if a.md:
            print(f"| {name} | " + " | ".join(cells) + f" | {' '.join(eq)} |", flush=True)
        else:
            print(f"{name:18s} " + "  ".join(f"{lay}: {c}" for lay, c in zip(layouts, cells)) + f"  eq: {eq}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
