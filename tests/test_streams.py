"""jmerge.core.streams: eager leaf programs dispatched on execution streams in turn run at once, with the
results of one stream."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge.core import streams


def _tree(rng):
    shapes = {"attn": (64, 96), "mlp": (96, 200), "norm": (96,), "emb": (300, 64), "head": (64, 333)}
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _np_ties(base, models, density):
    """TIES from the paper's formula in NumPy: per task vector keep its top ``round(density * n)`` entries
    by magnitude, elect the sign of the kept sum per entry, average the kept entries that agree with it."""
    out = {}
    for k, b in base.items():
        b = np.asarray(b, np.float32)
        taus = np.stack([np.asarray(m[k], np.float32) - b for m in models]).reshape(len(models), -1)
        n = taus.shape[1]
        keep = int(round(density * n))
        trimmed = np.zeros_like(taus)
        for t in range(len(taus)):
            order = np.argsort(-np.abs(taus[t]), kind="stable")[:keep]
            trimmed[t, order] = taus[t, order]
        sign = np.sign(trimmed.sum(0))
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        num = np.where(agree, trimmed, 0).sum(0)
        cnt = agree.sum(0)
        out[k] = b + (num / np.maximum(cnt, 1)).reshape(b.shape)
    return out


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "arcee_fusion", "della", "dare_ties", "ties_global",
                                    "pcb", "task_arithmetic", "tsv_m"])
def test_results_do_not_depend_on_the_streams(method, monkeypatch):
    """Every leaf's output with two streams equals its output with one, bit for bit."""
    rng = np.random.default_rng(4)
    base = _tree(rng)
    models = [jax.tree.map(lambda x: x + 0.01 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base)
              for _ in range(3)]
    m = jmerge.ties(scope="global") if method == "ties_global" else getattr(jmerge, method)()
    models = models[:m.max_models] if m.max_models else models
    monkeypatch.setattr(streams, "MIN_ENTRIES", 0)  # these small leaves take streams too
    monkeypatch.setattr(streams, "LEAF_STREAMS", 1)
    one = jmerge.merge(m, base, models, seed=3)
    monkeypatch.setattr(streams, "LEAF_STREAMS", 2)
    two = jmerge.merge(m, base, models, seed=3)
    for k in base:
        np.testing.assert_array_equal(np.asarray(two[k]), np.asarray(one[k]), err_msg=f"{method}: leaf {k}")


def test_ties_on_two_streams_against_numpy(monkeypatch):
    """TIES with the default two streams against the formula in NumPy (no ties among the magnitudes)."""
    monkeypatch.setattr(streams, "MIN_ENTRIES", 0)
    rng = np.random.default_rng(8)
    base = _tree(rng)
    models = [jax.tree.map(lambda x: x + 0.01 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base)
              for _ in range(3)]
    assert streams.LEAF_STREAMS == 2
    got = jmerge.merge(jmerge.ties(density=0.3), base, models)
    ref = _np_ties(base, models, 0.3)
    for k in base:
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-6, atol=1e-6, err_msg=k)


def _double(tag, a):
    return a * 2


def test_leaf_streams_alternate(monkeypatch):
    """Successive eager programs that may run at once take the streams after the caller's in turn; nothing is
    set inside a trace (a tracer), with one stream, or for programs holding a LAPACK decomposition or a host
    callback, which keep the caller's stream."""
    seen = []
    real = streams._execution_stream_id
    if real is None:
        pytest.skip("this jaxlib has no execution streams")

    def record(i):
        seen.append(i)
        return real(i)

    monkeypatch.setattr(streams, "_execution_stream_id", record)
    fn = jax.jit(_double, static_argnums=0)
    x = jnp.ones((4, 5))
    small = streams.leaf_stream(fn, ("double", x), {}, (x,))  # fewer than MIN_ENTRIES entries
    monkeypatch.setattr(streams, "MIN_ENTRIES", 20)
    for _ in range(4):
        with streams.leaf_stream(fn, ("double", x), {}, (x, [np.ones((4, 5))])):
            pass
    assert [s - streams._get_stream() for s in seen] in ([1, 2, 1, 2], [2, 1, 2, 1])
    seen.clear()
    kinds = []

    def traced(a):
        kinds.append(type(streams.leaf_stream(fn, ("double", a), {}, (a,))))
        return a

    jax.jit(traced)(x)  # a tracer: no stream
    svd = jax.jit(lambda tag, a: jnp.linalg.svd(a, compute_uv=False), static_argnums=0)
    host = jax.jit(lambda tag, a: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(a.shape, a.dtype), a),
                   static_argnums=0)
    nested = jax.jit(lambda tag, a: jax.lax.cond(a[0, 0] > 0, lambda: jnp.linalg.qr(a)[0].sum(), lambda: a.sum()),
                     static_argnums=0)
    for f in (svd, host, nested):
        kinds.append(type(streams.leaf_stream(f, ("f", x), {}, (x,))))
    monkeypatch.setattr(streams, "LEAF_STREAMS", 1)
    kinds.append(type(streams.leaf_stream(fn, ("double", x), {}, (x,))))
    assert seen == [] and kinds == [contextlib.nullcontext] * 5 and isinstance(small, contextlib.nullcontext)


_SHARDED = """
import contextlib, jax, jax.numpy as jnp, numpy as np, jmerge
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jmerge.core import streams
streams.MIN_ENTRIES = 0
assert len(jax.devices()) == 8
mesh = Mesh(np.array(jax.devices()), ("d",))
fn = jax.jit(lambda tag, a: a * 2, static_argnums=0)
x = jax.device_put(jnp.ones((8, 6)), NamedSharding(mesh, P("d")))
r = jax.device_put(jnp.ones((8, 6)), NamedSharding(mesh, P()))
y = jnp.ones(3)
assert isinstance(streams.leaf_stream(fn, ("f", x), {}, (x,)), contextlib.nullcontext)  # sharded
assert isinstance(streams.leaf_stream(fn, ("f", r), {}, (r,)), contextlib.nullcontext)  # replicated
assert not isinstance(streams.leaf_stream(fn, ("f", y), {}, (y,)), contextlib.nullcontext)
rng = np.random.default_rng(2)
base = {"a": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), "b": jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)}
models = [jax.tree.map(lambda v: v + 0.01 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32), base) for _ in range(3)]
shard = lambda t: {"a": jax.device_put(t["a"], NamedSharding(mesh, P("d"))), "b": t["b"]}  # one leaf sharded
for name in ("ties", "breadcrumbs"):
    m = getattr(jmerge, name)()
    streams.LEAF_STREAMS = 1
    one = jmerge.merge(m, base, models)
    streams.LEAF_STREAMS = 2
    two = jmerge.merge(m, shard(base), [shard(t) for t in models])
    for k in base:
        assert np.array_equal(np.asarray(one[k]), np.asarray(two[k])), (name, k)
print("ok")
"""


def _run_child(script: str, devices: int = 1) -> None:
    import os
    import subprocess
    import sys
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]


def test_sharded_leaves_keep_the_callers_stream():
    """On 8 devices a sharded or replicated leaf (a program over several devices) is not given a stream, a leaf
    on one device is; a merge of a tree with one leaf sharded over the 8 devices equals the one-stream merge."""
    _run_child(_SHARDED, devices=8)


_SVD_MERGES = """
import jax, jax.numpy as jnp, numpy as np, jmerge
from jmerge.core import streams
streams.MIN_ENTRIES = 0
rng = np.random.default_rng(0)
base = {f"w{i}": jnp.asarray(rng.standard_normal((48, 40 + i)), jnp.float32) for i in range(6)}
models = [jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base)
          for _ in range(3)]
for name in ("tsv_m", "iso_c", "iso_cts"):
    m = getattr(jmerge, name)()
    streams.LEAF_STREAMS = 1
    one = jmerge.merge(m, base, models)
    streams.LEAF_STREAMS = 2
    for _ in range(3):
        two = jmerge.merge(m, base, models)
        for k in base:
            assert np.array_equal(np.asarray(one[k]), np.asarray(two[k])), (name, k)
print("ok")
"""


def test_svd_merges_on_two_streams_finish():
    """Merges whose leaf programs hold batched SVDs keep one stream (two such programs at once deadlock
    jaxlib's LAPACK kernels on a two-thread pool): they finish, with the one-stream results. Run in a child
    process with a time limit, so that a deadlock fails the test instead of hanging the suite."""
    _run_child(_SVD_MERGES)
