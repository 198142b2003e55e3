"""On 8 simulated CPU devices, merging sharded leaves equals merging on one device, for every method."""

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
    import jmerge
    from tests._invariants_lib import flat, num_models_for
    from tests._trees import random_trees
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("x",))
    shapes = {"embed": (16, 8), "layers.0.attn.w": (16, 24), "layers.0.norm": (8,), "layers.1.attn.w": (32, 12),
              "layers.1.norm": (7,), "head": (8, 5)}
    base, models = random_trees(T=3, seed=2, shapes=shapes)
    def shard(t):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.shape[0] % 8 == 0 else P())), t)
    one = jax.devices()[0]
    failures = []
    for name, factory in sorted(jmerge.available_methods().items()):
        m = factory()
        T = num_models_for(m)
        ms = models[:T]
        ref = flat(jmerge.merge(m, jax.device_put(base, one), jax.device_put(ms, one), seed=1))
        out_tree = jmerge.merge(m, shard(base), [shard(x) for x in ms], seed=1)
        out = flat(out_tree)
        for p in ref:
            if not np.allclose(ref[p], out[p], rtol=1e-5, atol=1e-6):
                failures.append(f"{name}:{p} max diff {np.max(np.abs(ref[p]-out[p]))}")
        print("ok", name, flush=True)
    print("FAILURES", failures)
    assert not failures, failures
""")


def test_sharded_equals_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
