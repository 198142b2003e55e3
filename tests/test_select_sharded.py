"""Top-k masks do not depend on sharding: 8 simulated CPU devices vs one device vs NumPy."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import chex
    chex.set_n_cpu_devices(8)  # before JAX starts its backend
    import jax
    import numpy as np, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jmerge.core import select as S
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(0)

    def ref(x, k):
        f = np.asarray(x, np.float32).ravel()
        o = np.argsort(-f, kind="stable")
        m = np.zeros(f.size, bool); m[o[:max(min(k, f.size), 0)]] = True
        return m.reshape(x.shape)

    cases = {
        "normal": np.abs(rng.normal(size=(64, 1000))).astype(np.float32),
        "ties": (rng.integers(0, 3, size=(64, 1000))).astype(np.float32),
        "sorted": np.arange(64 * 1000, dtype=np.float32).reshape(64, 1000),
    }
    f = jax.jit(S.topk_mask)
    rows = jax.jit(S.topk_mask_rows)
    for name, x in cases.items():
        xs = jax.device_put(x, NamedSharding(mesh, P("x")))
        x1 = jax.device_put(x, jax.devices()[0])
        for k in (0, 1, 6400, 32000, 63999, 64000):
            a, b = np.asarray(f(xs, k)), np.asarray(f(x1, k))
            assert np.array_equal(a, b), (name, k)
            assert np.array_equal(a, ref(x, k)), (name, k)
        x3 = x.reshape(8, 8000)
        x3s = jax.device_put(x3, NamedSharding(mesh, P(None, "x")))
        ks = jnp.array([0, 1, 800, 4000, 4001, 7999, 8000, 3], jnp.int32)
        a = np.asarray(rows(x3s, ks))
        assert np.array_equal(a, np.asarray(rows(x3, ks))), name
        assert np.array_equal(a, np.stack([ref(x3[t], int(ks[t])) for t in range(8)])), name
    # Outside jit, merge sorts rows only of leaves that are not sharded (a sort of a sharded row gathers it);
    # an eager TIES merge of a leaf sharded on its last axis equals the one-device merge.
    import jmerge
    from jmerge.core import driver as D
    w = rng.normal(size=(8, 8000)).astype(np.float32)
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "x")))
    assert D._eager_sort_limit(ws, (w,)) is None
    assert D._eager_sort_limit(jax.device_put(w, NamedSharding(mesh, P())), (w,)) == D.EAGER_SORT_LIMIT
    assert D._eager_sort_limit(w, (jax.device_put(w, jax.devices()[1]),)) == D.EAGER_SORT_LIMIT
    ms = [w + rng.normal(size=w.shape).astype(np.float32) for _ in range(3)]
    hp = {"density": 0.2}
    one = np.asarray(jmerge.merge(jmerge.ties(), {"w": w}, [{"w": m} for m in ms], hparams=hp)["w"])
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "x")))
    sh = jmerge.merge(jmerge.ties(), {"w": shard(w)}, [{"w": shard(m)} for m in ms], hparams=hp)["w"]
    assert np.array_equal(np.asarray(sh), one)
    print("OK")
""")


def test_topk_mask_independent_of_sharding():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
