"""Sharded merges never all-gather a whole leaf (read from the compiled HLO), and equal one device.

On 8 simulated CPU devices (a subprocess: the device count is fixed before JAX starts), each method
below is jitted as ``jmerge.merge(method, base, models)`` on leaves sharded over a ``'model'`` mesh
axis: the usual Dense layout ``P(None, 'model')``, ``P('model', None)``, a 1-D bias, and a leaf whose
per-device columns do not divide into the counting passes' 32-entry blocks. The compiled HLO must hold
no all-gather whose result has a full leaf's element count (or more: the stacked task vectors), and
the merged leaf must equal the single-device merge: bit for bit for the top-k selections (exact
integer counting whatever the sharding) and elementwise methods; within float32 rounding where a
method sums over the whole tensor (the order of a sum split across devices differs).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import re, sys
    import chex
    chex.set_n_cpu_devices(8)  # before JAX starts its backend
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jmerge
    from jmerge.methods import METHODS
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    LAYOUTS = {"col": ((256, 128), (None, "model")), "row": ((256, 128), ("model", None)),
               "bias": ((4096,), ("model",)), "odd": ((129, 136), (None, "model"))}  # 17 columns per device
    COLL = re.compile(r"=\s*(\(?[^=]*?)\s+all-gather(?:-start)?\(")
    SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")

    def full_gathers(hlo, full):
        bad = []
        for line in hlo.splitlines():
            m = COLL.search(line)
            if m:
                sizes = [int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in SHAPE.findall(m.group(1))]
                if sizes and max(sizes) >= full:
                    bad.append(line.strip()[:160])
        return bad

    # method -> (layouts, comparison with one device: True bit for bit, False within float32 rounding)
    CASES = {
        "ties": ("col row bias odd", True), "dare_ties": ("col row bias odd", True),
        "dare_linear": ("col row bias", True), "task_arithmetic": ("col row bias", True),
        "breadcrumbs": ("col row bias odd", True), "breadcrumbs_ties": ("col odd", True),
        "consensus_ties": ("col row odd", True), "consensus_ta": ("col row", True),
        "magmax": ("col row", True), "sce": ("col row odd", False),
        "della": ("col row", True), "della_linear": ("col row", False),
        "slerp": ("col row bias odd", False), "model_stock": ("col row odd", False),
        "nuslerp": ("col row", False), "multislerp": ("col row", False), "arcee_fusion": ("col row", False),
        "karcher": ("col row bias odd", False), "pcb": ("col row bias odd", "near"),
    }
    # The detector finds a gather where there is one (flattening a column-sharded leaf gathers it).
    x = jax.device_put(np.ones((256, 128), np.float32), NamedSharding(mesh, P(None, "model")))
    assert full_gathers(jax.jit(lambda x: jax.numpy.sort(x.reshape(-1))).lower(x).compile().as_text(), x.size)
    only = sys.argv[1:] or sorted(CASES)
    rng = np.random.default_rng(0)
    failures = []
    for name in only:
        layouts, exact = CASES[name]
        method = METHODS[name]()
        T = max(min(3, method.max_models or 3), method.min_models)
        for lay in layouts.split():
            shape, spec = LAYOUTS[lay]
            sh = NamedSharding(mesh, P(*spec))
            path = "layers.0.mlp.w" if len(shape) > 1 else "layers.0.mlp.b"
            b = rng.standard_normal(shape).astype(np.float32)
            ms = [b + 0.1 * rng.standard_normal(shape).astype(np.float32) for _ in range(T)]
            if name in ("ties", "breadcrumbs"):  # ties at the threshold: the tie cut runs too
                ms = [b + np.round(m - b, 1).astype(np.float32) for m in ms]
            args = ({path: jax.device_put(b, sh)}, [{path: jax.device_put(m, sh)} for m in ms])
            f = jax.jit(lambda b, ms: jmerge.merge(method, b, ms, seed=1))
            compiled = f.lower(*args).compile()
            bad = full_gathers(compiled.as_text(), int(np.prod(shape)))
            if bad:
                failures.append(f"{name}/{lay}: {len(bad)} full-leaf all-gathers, e.g. {bad[0]}")
            out = np.asarray(compiled(*args)[path])
            one = jax.devices()[0]
            ref = np.asarray(jmerge.merge(method, {path: jax.device_put(b, one)},
                                          [{path: jax.device_put(m, one)} for m in ms], seed=1)[path])
            if exact == "near":  # PCB: scores agree to float32 rounding; an entry within that rounding of
                # the drop threshold may fall on the other side (a few entries, never many)
                close = np.isclose(out, ref, rtol=1e-5, atol=1e-6)
                ok = int(np.sum(~close)) <= max(4, out.size // 10000)
            elif exact:
                ok = np.array_equal(out, ref)
            else:
                ok = np.allclose(out, ref, rtol=1e-5, atol=1e-6)
            if not ok:
                failures.append(f"{name}/{lay}: differs from one device by {np.max(np.abs(out - ref))}")
            print("ok" if ok and not bad else "FAIL", name, lay, flush=True)
    # DARE with the L1 rescale on a leaf of 2^19 entries or more: its norms sum blocks of the flattened leaf
    # (l1_norms, as the out-of-core chunks do) unless the leaf is known to be sharded, where they reduce it in
    # place: the driver says so for an eager call, a caller's jit inside jmerge.core.select.sharded_leaf()
    from jmerge.core.select import sharded_leaf
    method = jmerge.dare_ties(density=0.5, rescale="l1")
    shape = (1024, 640)
    sh = NamedSharding(mesh, P(None, "model"))
    b = rng.standard_normal(shape).astype(np.float32)
    ms = [b + 0.1 * rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    args = ({"w": jax.device_put(b, sh)}, [{"w": jax.device_put(m, sh)} for m in ms])
    f = jax.jit(lambda b, ms: jmerge.merge(method, b, ms, seed=1))
    assert full_gathers(f.lower(*args).compile().as_text(), b.size)  # flattened: gathered
    with sharded_leaf():
        bad = full_gathers(jax.jit(lambda b, ms: jmerge.merge(method, b, ms, seed=1)).lower(*args).compile().as_text(),
                           b.size)
    if bad:
        failures.append(f"dare_ties l1 in sharded_leaf(): {len(bad)} full-leaf all-gathers, e.g. {bad[0]}")
    one = jax.devices()[0]
    ref = np.asarray(jmerge.merge(method, {"w": jax.device_put(b, one)}, [{"w": jax.device_put(m, one)} for m in ms],
                                  seed=1)["w"])
    eager = np.asarray(jmerge.merge(method, *args, seed=1)["w"])  # the driver sees the sharding
    if not np.allclose(eager, ref, rtol=1e-5, atol=1e-6):
        failures.append(f"dare_ties l1 eager sharded differs from one device by {np.max(np.abs(eager - ref))}")
    print("FAILURES", failures)
    assert not failures, failures
""")


def test_sharded_merges_gather_no_full_leaf():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


GLOBAL = textwrap.dedent(r"""
    import glob, os, re, sys
    import chex
    chex.set_n_cpu_devices(8)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jmerge
    mesh = Mesh(np.array(jax.devices()), ("model",))
    dump = sys.argv[1]
    COLL = re.compile(r"=\s*(\(?[^=]*?)\s+all-gather(?:-start)?\(")
    SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
    rng = np.random.default_rng(0)
    shapes = {"a.w": ((256, 128), (None, "model")), "b.w": ((129, 136), (None, "model")), "c.b": ((4096,), ("model",)),
              "d.w": ((256, 128), ("model", None))}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in shapes.items()}
    models = [{k: v + np.round(0.1 * rng.standard_normal(v.shape), 1).astype(np.float32) for k, v in base.items()}
              for _ in range(3)]  # rounded: ties at the threshold, so the tie quota runs too
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, P(*shapes[k][1]))) for k, v in t.items()}
    before = set(glob.glob(os.path.join(dump, "*after_optimizations.txt")))
    for rounding in ("round", "authors"):
        method = jmerge.ties(density=0.3, scope="global", rounding=rounding)
        out = jmerge.merge(method, put(base), [put(m) for m in models])
        one = jax.devices()[0]
        ref = jmerge.merge(method, {k: jax.device_put(v, one) for k, v in base.items()},
                           [{k: jax.device_put(v, one) for k, v in m.items()} for m in models])
        for k in base:
            assert np.array_equal(np.asarray(out[k]), np.asarray(ref[k])), (rounding, k)
    files = sorted(set(glob.glob(os.path.join(dump, "*after_optimizations.txt"))) - before)
    assert files, "no HLO dumped"
    smallest = min(int(np.prod(s)) for s, _ in shapes.values())
    bad, seen = [], 0
    for f in files:
        txt = open(f).read()
        seen += "all-reduce" in txt
        for line in txt.splitlines():
            m = COLL.search(line)
            if m:
                sizes = [int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in SHAPE.findall(m.group(1))]
                if sizes and max(sizes) >= smallest:
                    bad.append(os.path.basename(f) + ": " + line.strip()[:160])
    assert seen, "no sharded program compiled"  # the detector looked at partitioned programs
    assert not bad, bad
    print("ok", len(files))
""")


def test_global_topk_sharded_gathers_no_leaf(tmp_path):
    """Whole-model (``scope="global"``) TIES on sharded leaves: its histogram phases and mask compile to
    no full-leaf all-gather (read from XLA's dump of every compiled program), and equal one device bit for bit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"
    r = subprocess.run([sys.executable, "-c", GLOBAL, str(tmp_path)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
