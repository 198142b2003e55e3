"""The floors of ``scripts/bench_methods.py --floors`` time the work the methods need: DELLA's sort keys, sorted,
give jmerge's own DELLA ranks (ties by position included), so the sort timed there is the one exact ranks need."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.core.rank import difference_ranks

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_methods.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_methods", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_della_sort_floor_sorts_the_keys_of_dellas_ranks():
    bench = _bench()
    k = jax.random.key(3)
    base = {"w": jax.random.normal(k, (70, 1000)), "b": jax.random.normal(jax.random.fold_in(k, 1), (9,))}
    # ties at equal magnitudes (a bfloat16-like lattice), opposite signs, exact zeros and a NaN
    models = []
    for t in range(2):
        m = jax.tree.map(lambda x: jnp.round((x + 0.05 * jax.random.normal(jax.random.fold_in(k, 10 + t), x.shape))
                                             * 64) / 64, base)
        models.append(m)
    models[1]["w"] = models[1]["w"].at[3, 5].set(jnp.nan).at[4].set(base["w"][4])
    blocks = bench.packed_blocks(base, models)
    got = []
    for b in blocks:
        s = np.sort(b, axis=-1)
        pos = (s & 0xFFFFFFFF).astype(np.int64)
        r = np.empty_like(pos)
        np.put_along_axis(r, pos, np.arange(b.shape[1])[None], axis=1)
        got.append(r)
    # blocks are ordered leaf by leaf (the tree's leaf order), model by model, rows in order
    want = []
    for name in sorted(base):  # jax.tree.leaves order of a dict: sorted keys
        ranks = np.asarray(difference_ranks(base[name], [m[name] for m in models], impl="xla"))
        want += [ranks[t].reshape(ranks.shape[1], -1) for t in range(len(models))]
    assert np.array_equal(np.concatenate([g.reshape(-1) for g in got]),
                          np.concatenate([w.reshape(-1) for w in want]))
    assert bench.sort_floor(base, models, 1) > 0


def test_arcee_fusion_floor_leaf_is_the_merge_at_its_fence():
    """The Arcee Fusion floor's pass, given the fence that NumPy's sort of jmerge's importances gives, is jmerge's
    Arcee Fusion merge entry for entry: the floor computes the merge's KLs and output, only not its quartiles."""
    import jmerge
    from jmerge.methods.fusion import fusion_importance

    bench = _bench()
    k = jax.random.key(5)
    for shape in [(300, 700), (64,), (256, 1024)]:
        b = jax.random.normal(jax.random.fold_in(k, shape[0]), shape)
        m = b + 0.01 * jax.random.normal(jax.random.fold_in(k, shape[-1]), shape)
        raw = np.asarray(fusion_importance(m, b))
        imp = np.sort(raw.ravel())
        n = imp.size
        q1, med, q3 = (imp[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
        fence = np.float32(med + np.float32(np.float32(1.5) * np.float32(q3 - q1)))
        got = np.asarray(bench.kl_floor_leaf(b, m, fence))
        want = np.asarray(jmerge.merge(jmerge.arcee_fusion(), {"w": b}, [{"w": m}])["w"])
        kept = raw >= fence
        assert 0 < kept.sum() < n
        assert np.array_equal(got, want)
        assert np.array_equal(got, np.where(kept, np.asarray(m), np.asarray(b)))
    assert bench.kl_floor({"w": b}, [{"w": m}], 1) > 0


def test_compare_streams_alternates_the_settings_and_restores_them():
    """``--compare-streams`` times each method with one stream and with two in turn (after one warm call each) and
    leaves ``streams.LEAF_STREAMS`` as it found it, also when the timed function raises."""
    import pytest

    from jmerge.core import streams

    bench = _bench()
    seen = []
    before = streams.LEAF_STREAMS
    best = bench.timed_streams(lambda: seen.append(streams.LEAF_STREAMS), 3)
    assert seen == [1, 2] + [1, 2] * 3
    assert sorted(best) == [1, 2] and all(0 <= t < 1 for t in best.values())
    assert streams.LEAF_STREAMS == before

    def fails():
        if streams.LEAF_STREAMS == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bench.timed_streams(fails, 1)
    assert streams.LEAF_STREAMS == before


def test_copy_floor_writes_the_base_as_read(tiny_base, tiny_fts, tmp_path, monkeypatch):
    """``scripts/bench_floor.py``'s floor runs the executor with a program that does no arithmetic: its output is the
    base checkpoint's tensors, byte for byte, whole or in blocks of rows (as task arithmetic's large tensors go)."""
    import sys

    from jmerge.io.safetensors import open_checkpoint
    from jmerge.pipeline import executor

    sys.path.insert(0, str(_SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_floor", _SCRIPT.parent / "bench_floor.py")
        floor = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(floor)
    finally:
        sys.path.remove(str(_SCRIPT.parent))
    for part_bytes in (executor.PART_BYTES, 2000):
        monkeypatch.setattr(executor, "PART_BYTES", part_bytes)
        out = tmp_path / f"floor-{part_bytes}"
        floor.copy_floor([tiny_base, *tiny_fts], str(out))
        with open_checkpoint(tiny_base) as want, open_checkpoint(out) as got:
            assert sorted(got.keys()) == sorted(want.keys())
            for k in want.keys():
                assert got.get(k).dtype == want.get(k).dtype
                np.testing.assert_array_equal(got.get(k).view(np.uint8), want.get(k).view(np.uint8), err_msg=k)
