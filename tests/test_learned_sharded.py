"""Learned merges data-parallel on 8 simulated CPU devices equal the single-device run.

The device count must be fixed before JAX's backend starts, and pytest imports many test files into
one process, so the check runs in a fresh subprocess.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import chex
    chex.set_n_cpu_devices(8)  # before JAX starts its backend
    import jax
    import numpy as np
    import optax
    import jmerge
    from jmerge.learned.common import Batcher

    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    d, h, c = 6, 5, 3
    def params():
        return {"l1": {"w": rng.normal(size=(d, h)).astype(np.float32), "b": rng.normal(size=(h,)).astype(np.float32)},
                "l2": {"w": rng.normal(size=(h, c)).astype(np.float32)}}
    def apply(p, x):
        return jax.numpy.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]
    base = params()
    models = [params() for _ in range(3)]
    xs = [rng.normal(size=(64, d)).astype(np.float32) for _ in range(3)]
    ys = [rng.integers(0, c, size=64).astype(np.int32) for _ in range(3)]

    # the batch really is split over the 8 devices
    b = Batcher(xs, None, [64] * 3, 16, 0, mesh).get(0)[0][0]
    assert len(b.sharding.device_set) == 8 and b.addressable_shards[0].data.shape == (2, d), b.sharding

    kw = dict(steps=12, batch_size=16, optimizer=optax.adam(5e-2), seed=1)
    one = jmerge.adamerging(apply, base, models, batches=xs, **kw)
    dp = jmerge.adamerging(apply, base, models, batches=xs, mesh=mesh, **kw)
    np.testing.assert_allclose(dp.losses, one.losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), dp.coefficients, one.coefficients)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 dp.params, one.params)
    assert one.losses[-1] < one.losses[0]

    # supervised, whole batches, task-wise
    kw = dict(steps=8, loss="ce", labels=ys, granularity="task", optimizer=optax.adam(5e-2))
    one = jmerge.adamerging(apply, base, models, batches=xs, **kw)
    dp = jmerge.adamerging(apply, base, models, batches=xs, mesh=mesh, **kw)
    np.testing.assert_allclose(dp.coefficients, one.coefficients, rtol=1e-5, atol=1e-7)

    # concrete masks (random keys do not depend on the sharding)
    kw = dict(steps=6, batch_size=16, optimizer=optax.adam(5e-2))
    one = jmerge.concrete_merge(apply, base, models, batches=xs, **kw)
    dp = jmerge.concrete_merge(apply, base, models, batches=xs, mesh=mesh, **kw)
    np.testing.assert_allclose(dp.losses, one.losses, rtol=1e-5)

    # a batch that does not split over the mesh is rejected
    try:
        jmerge.adamerging(apply, base, models, batches=xs, mesh=mesh, batch_size=12, steps=1)
    except jmerge.MergeInputError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("expected MergeInputError")
    print("SHARDED_OK")
''')


def test_learned_merges_on_8_devices_equal_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=root)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
