"""Each XLA:CPU workaround of ``jmerge.core.xla`` guarded by a test on the compiled HLO.

Where a workaround is known to be needed on a JAX version, the test also compiles without it and
checks that the problem it avoids is there: a JAX release that no longer needs one shows as a failure.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
import jmerge.core.select as select_mod
from jmerge.core import LeafProgram, xla

JAX_VERSION = tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:2])
SHAPE = (1024, 2816)  # a Llama-like MLP matrix: big enough for every workaround to matter
N = math.prod(SHAPE)


def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def _entry(txt: str) -> str:
    e = txt[txt.index("\nENTRY"):]
    return e[:e.index("\n}")]


def _full_size_buffers(txt: str, n: int) -> list:
    """Instructions of the entry computation that write an array of >= n elements, except the output
    (parameters, tuple elements and bitcasts alias existing buffers), and conditionals returning one."""
    bad = []
    for line in _entry(txt).splitlines()[1:]:
        m = re.match(r"\s*(ROOT )?%(\S+) = (\w+)\[([0-9,]*)\]\S* (\S+?)\(", line)
        c = re.match(r"\s*%(\S+) = \((.*)\) conditional\(", line)
        if c:  # a conditional's results are buffers of their own (xla.materialized)
            for dt, dims in re.findall(r"(\w+)\[([0-9,]*)\]", c.group(2)):
                if dims and math.prod(int(d) for d in dims.split(",")) >= n:
                    bad.append((c.group(1), dt, dims, "conditional"))
        if not m:
            continue
        root, name, dt, dims, op = m.groups()
        size = math.prod(int(d) for d in dims.split(",")) if dims else 1
        if size >= n and not root and op not in ("parameter", "get-tuple-element", "bitcast"):
            bad.append((name, dt, dims, op))
    return bad


def _ties_leaf_hlo() -> str:
    b = jnp.zeros(SHAPE, jnp.bfloat16)
    ms = tuple(jnp.ones(SHAPE, jnp.bfloat16) for _ in range(3))
    m = jmerge.ties(density=0.2)
    prog = LeafProgram(m)
    hp = {k: jnp.float32(v) for k, v in m.defaults.items()}
    return _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)


def test_model_sum_is_unrolled():
    x = jnp.ones((3, 512, 256))
    assert "reduce(" not in _hlo(xla.model_sum, x)
    assert "reduce(" in _hlo(lambda x: jnp.sum(x, axis=0), x)  # what it avoids
    np.testing.assert_array_equal(np.asarray(xla.model_sum(x)), np.asarray(jnp.sum(x, axis=0)))
    np.testing.assert_array_equal(np.asarray(xla.model_max(x * jnp.arange(3.0)[:, None, None])), 2.0)


def test_materialized_is_a_conditional():
    x = jnp.ones((256, 256))
    txt = _hlo(lambda x: xla.materialized(lambda: x * 2.0 + 1.0, x) * 3.0, x)
    assert "conditional(" in _entry(txt)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: xla.materialized(lambda: x * 2.0, x))(x)), 2.0)


@pytest.fixture(scope="module")
def ties_hlo():
    return _ties_leaf_hlo()


def test_ties_writes_no_full_size_intermediate(ties_hlo):
    """loop_variant + rows + tau rebuilt from the models: TIES reads the models, writes only its output."""
    assert _full_size_buffers(ties_hlo, N) == []


@pytest.mark.parametrize("method", [jmerge.task_arithmetic(scale=0.5),
                                    jmerge.linear(weight=jmerge.PerModel([0.2, 0.3, 0.5]), normalize=True),
                                    jmerge.dare_linear(), jmerge.dare_ties(), jmerge.breadcrumbs_ties(),
                                    jmerge.consensus_ta(), jmerge.consensus_ties(), jmerge.emr_merge(scope="tensor")],
                         ids=["task_arithmetic", "linear", "dare_linear", "dare_ties", "breadcrumbs_ties",
                              "consensus_ta", "consensus_ties", "emr"])
def test_row_wise_steps_write_no_stacked_task_vectors(method):
    """Steps that work row by row (tau's rows rebuilt from the models, results stacked row by row): the
    program writes no float array of the leaf's size besides its output (in memory, the models are separate
    arrays, and XLA:CPU does not fuse their stack into an op on the whole stack). Consensus counts its TALL
    masks row by row: a conversion of their stack wrote the stacked bool masks (9.7 ms per leaf)."""
    b = jnp.zeros(SHAPE, jnp.float32)
    ms = tuple(jnp.ones(SHAPE, jnp.float32) for _ in range(3))
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(getattr(v, "specs", v), jnp.float32) for k, v in method.defaults.items()}  # PerModel
    txt = _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)
    assert _full_size_buffers(txt, N) == []
    # what it avoids: the same sum over the stacked task vectors writes them (models x leaf)
    stacked = _hlo(lambda b, ms: xla.model_sum(0.5 * jnp.stack([m - b for m in ms])), b, ms)
    assert [d for _, _, d, _ in _full_size_buffers(stacked, N)] == [f"3,{SHAPE[0]},{SHAPE[1]}"]


def test_loop_variant_keeps_reads_in_the_loop(ties_hlo, monkeypatch):
    monkeypatch.setattr(select_mod, "loop_variant", lambda a, m: a)
    without = _ties_leaf_hlo()
    assert _full_size_buffers(without, N) == [] or JAX_VERSION < (0, 11)
    if JAX_VERSION >= (0, 11):  # measured: 0.12 makes the loop one single-threaded call (TIES leaf 30% slower)
        assert "xla_cpu_small_call" not in ties_hlo
        assert "xla_cpu_small_call" in without, "XLA no longer needs loop_variant here"


def test_honest_cost_keeps_the_search_multithreaded(ties_hlo, monkeypatch):
    assert "xla_cpu_small_call" not in ties_hlo
    monkeypatch.setattr(select_mod, "HONEST_COST_MIN", 10**12)
    without = _ties_leaf_hlo()
    if JAX_VERSION >= (0, 11):  # measured: 0.12 runs the counting loop as one single-threaded call
        assert "xla_cpu_small_call" in without, "XLA no longer makes the loop a small call: honest_cost may go"


def test_split_blocks_splits_only_the_last_dimension(ties_hlo, monkeypatch):
    blocked = f"{SHAPE[0]},{SHAPE[1] // 32},32"
    flat = f"{N // 32},32"
    assert ties_hlo.count(blocked) > 10 * max(1, ties_hlo.count(flat))
    orig = xla.split_blocks
    monkeypatch.setattr(select_mod, "split_blocks", lambda x, w: orig(x.reshape(x.shape[0], -1), w))
    txt = _ties_leaf_hlo()
    assert txt.count(flat) > 10 and txt.count(blocked) == 0  # what the 2-D split avoids
    a, tail = xla.split_blocks(jnp.arange(2 * 3 * 64).reshape(2, 3, 64), 32)
    assert a.shape == (2, 3, 2, 32) and tail.shape == (2, 0)
    a, tail = xla.split_blocks(jnp.arange(2 * 70).reshape(2, 70), 32)
    assert a.shape == (2, 2, 32) and tail.shape == (2, 6)


def _readers_of_param0(txt: str) -> int:
    """Instructions of the entry computation that read its first parameter (each is a pass over it)."""
    lines = _entry(txt).splitlines()[1:]
    name = next(re.match(r"\s*%(\S+) = ", l).group(1) for l in lines if "parameter(0)" in l)
    return sum(1 for l in lines if "parameter(" not in l and re.search(rf"%{re.escape(name)}[,)]", l)
               and "tuple(" not in l)


def test_totals_reads_its_inputs_once():
    b = jnp.ones(SHAPE)
    ms = tuple(jnp.ones(SHAPE) * (i + 2) for i in range(3))

    def derived(b, ms):
        r = [m - b for m in ms]
        g = jnp.sign(r[0] + r[1] + r[2])
        u = jnp.maximum(jnp.maximum(jnp.abs(r[0]), jnp.abs(r[1])), jnp.abs(r[2]))
        return [jnp.abs(x) for x in r] + [jnp.where(x * g > 0, u, 0.0) for x in r]

    one = _hlo(lambda b, ms: xla.totals(*derived(b, ms)), b, ms)
    many = _hlo(lambda b, ms: [jnp.sum(x) for x in derived(b, ms)], b, ms)
    assert _readers_of_param0(one) == 1
    assert _readers_of_param0(many) > 3  # what it avoids: one pass over the models per sum
    got = jax.jit(lambda b, ms: xla.totals(*derived(b, ms)))(b, ms)
    want = [jnp.sum(x) for x in derived(b, ms)]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_row_totals_reads_its_inputs_once_and_sums_rows():
    x = jax.random.normal(jax.random.key(1), (3,) + SHAPE)
    ops = lambda x: [x[0] * x[0], x[0] * x[1], x[1] * x[2]]
    txt = _hlo(lambda x: xla.row_totals(*ops(x)), x)
    assert _full_size_buffers(txt, N) == []  # the products are never written
    got = jax.jit(lambda x: xla.row_totals(*ops(x)))(x)
    want = [np.sum(np.asarray(p, np.float64), axis=-1) for p in ops(np.asarray(x, np.float64))]
    for g, w in zip(got, want):
        assert g.shape == (SHAPE[0],)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sign_is_selects_bit_for_bit(dtype):
    vals = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf, np.nan, -np.nan], np.float32)
    x = jnp.asarray(vals, dtype)
    assert "sign(" not in _entry(_hlo(xla.sign, x)) and "sign(" not in _hlo(xla.sign, x).split("ENTRY")[0]
    assert "sign(" in _hlo(jnp.sign, x)  # what it replaces
    got, want = np.asarray(xla.sign(x)), np.asarray(jnp.sign(x))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint16 if dtype == jnp.bfloat16 else np.uint32)[:8],
                                  want.view(np.uint16 if dtype == jnp.bfloat16 else np.uint32)[:8])  # ±0 kept
    assert np.isnan(got[8:].astype(np.float32)).all()


def test_uniform_exp_is_exp_to_an_ulp_and_the_same_in_every_lane():
    x = np.concatenate([np.linspace(-87.2, 88.72, 400_001, dtype=np.float32),
                        np.float32([-1.7454545, -1e-8, 1e-8, -0.5 * np.log(2), 0.5 * np.log(2)])])
    got = np.asarray(jax.jit(xla.uniform_exp)(x), np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.abs(got - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulp.max() < 1.25, ulp.max()  # measured 1.19 (products rounded before their adds: no FMA)
    edge = np.float32([0.0, -0.0, -np.inf, -100.0, -87.31, 88.73, 100.0, np.inf, np.nan])
    np.testing.assert_array_equal(np.asarray(jax.jit(xla.uniform_exp)(edge)),
                                  np.float32([1, 1, 0, 0, 0, np.inf, np.inf, np.inf, np.nan]))
    txt = _hlo(xla.uniform_exp, x)
    assert "exponential(" not in txt and "exponential(" in _hlo(jnp.exp, x)
    assert "conditional(" in _entry(txt)  # the opaque zero survives
    # one value in every lane of fusions whose last axis leaves a remainder (scalar code) after the vectors
    vals = np.random.default_rng(0).uniform(-20, 5, 64).astype(np.float32).tolist() + [-1.7454545]
    f = jax.jit(lambda v, z: xla.uniform_exp(v + z))
    for shape in [(3, 4, 5), (4, 5), (7,), (2, 17)]:
        for v in vals:
            out = np.asarray(f(jnp.full(shape, v), jnp.float32(0)))
            assert np.unique(out).size == 1, (shape, v, np.unique(out))
    zero = jax.jit(lambda x: xla.opaque_zero(x))(x)
    assert zero.dtype == jnp.float32 and float(zero) == 0
    np.testing.assert_array_equal(np.asarray(jax.jit(xla.unfused)(x, zero)), x)


@pytest.mark.parametrize("method,T", [(jmerge.model_stock(), 3), (jmerge.model_stock(filter_wise=True), 3),
                                      (jmerge.multislerp(), 3), (jmerge.multislerp(base_relative=True), 3),
                                      (jmerge.karcher(), 3), (jmerge.nuslerp(), 2), (jmerge.nuslerp(base_relative=True), 2)],
                         ids=["model_stock", "model_stock_filter_wise", "multislerp", "multislerp_base_relative",
                              "karcher", "nuslerp", "nuslerp_base_relative"])
def test_geometric_methods_write_nothing_but_their_output(method, T):
    """The statistics (norms, dots: the Gram matrix) in one variadic reduction over the inputs, the result
    in one more pass: no model, task vector or product is written to memory (before: the stacked models
    and each summed product; Karcher and multi-SLERP ran their iterations over full-size arrays)."""
    b = jnp.zeros(SHAPE, jnp.float32)
    ms = tuple(jnp.ones(SHAPE, jnp.float32) * (i + 1) for i in range(T))
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(getattr(v, "specs", v), jnp.float32) for k, v in method.defaults.items()}
    txt = _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)
    assert _full_size_buffers(txt, N) == []


def test_counts_are_exact_and_write_no_mask():
    x = jax.random.normal(jax.random.key(2), (3,) + SHAPE)
    masks = lambda x: [x[0] > 0.5, (x[1] > 0) & (x[2] < 0), jnp.abs(x[0] - x[1]) < 1e-3]
    got = jax.jit(lambda x: xla.counts(*masks(x)))(x)
    want = [int(np.count_nonzero(m)) for m in masks(np.asarray(x))]
    assert [int(g) for g in got] == want and all(g.dtype == jnp.int32 for g in got)
    assert _full_size_buffers(_hlo(lambda x: xla.counts(*masks(x)), x), N) == []
    # what it avoids: the sums of the masks write each as int32 first
    assert len(_full_size_buffers(_hlo(lambda x: [jnp.sum(m, dtype=jnp.int32) for m in masks(x)], x), N)) >= 2


def test_counts_of_one_mask_write_no_mask():
    """A single mask is counted with its complement: alone, its reduction over every axis became a tree of
    reduce-windows over the mask written to memory as int32 (SCE's nonzero count)."""
    x = jax.random.normal(jax.random.key(3), (3,) + SHAPE)
    var = lambda x: jnp.square(x[0] - x[1]) * (x[2] > 0)  # zero where x[2] <= 0
    got = jax.jit(lambda x: xla.counts(var(x) != 0)[0])(x)
    assert int(got) == int(np.count_nonzero(np.asarray(var(x)) != 0))
    assert _full_size_buffers(_hlo(lambda x: xla.counts(var(x) != 0)[0], x), N) == []
    single = lambda x: jax.lax.reduce((var(x) != 0).astype(jnp.int32), np.int32(0), jax.lax.add, (0, 1))
    assert len(_full_size_buffers(_hlo(single, x), N)) >= 1  # what it avoids
    assert [int(c) for c in jax.jit(lambda m: xla.counts(m))(jnp.array([True, False, True]))] == [2]
    assert [int(c) for c in xla.counts(jnp.asarray(True))] == [1]


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_sce_writes_only_its_variance(density):
    """SCE reads tau in three forms of the same bits (variance, energies, result): one leaf-sized buffer,
    the variance its top-k search reads (before: tau's rows, their mean, the count's mask and the selected
    rows, 9 buffers)."""
    method = jmerge.sce(density=density)
    b = jnp.zeros(SHAPE, jnp.float32)
    ms = tuple(jnp.ones(SHAPE, jnp.float32) * (i + 1) for i in range(3))
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in method.defaults.items()}
    txt = _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)
    bad = _full_size_buffers(txt, N)
    assert len(bad) == 1 and bad[0][1:] == ("f32", "1024,2816", "conditional"), bad


@pytest.mark.parametrize("precision", [None, "bfloat16", "float16"])
def test_tau_forms_have_the_same_bits(precision):
    """diff_rows' forms: "m+(-b)" is "m-b" bit for bit; "b-m" is its negation but that a zero is +0 (the
    statistics that read it square it). Each against NumPy's float32 difference."""
    from jmerge.core.state import diff_rows, round_to
    rng = np.random.default_rng(4)
    b = rng.normal(size=(64, 33)).astype(np.float32)
    ms = [b + np.float32(0.01) * rng.normal(size=b.shape).astype(np.float32) for _ in range(2)]
    ms[0][:3] = b[:3]  # zeros in tau
    b[0, :4] = -0.0
    ms[1][0, :4] = -0.0
    f = {form: [np.asarray(x) for x in diff_rows(b, ms, precision=precision, form=form)]
         for form in ("m-b", "m+(-b)", "b-m")}
    r = lambda x: np.asarray(round_to(x, precision))
    for t, m in enumerate(ms):
        want = r(r(m) - r(b))
        np.testing.assert_array_equal(f["m-b"][t].view(np.int32), want.view(np.int32))
        np.testing.assert_array_equal(f["m+(-b)"][t].view(np.int32), want.view(np.int32))
        neg = f["b-m"][t]
        np.testing.assert_array_equal(neg.view(np.int32), np.where(want == 0, np.float32(0), -want).view(np.int32))
        np.testing.assert_array_equal(np.square(neg).view(np.int32), np.square(want).view(np.int32))


def test_arcee_fusion_writes_no_leaf_sized_buffer():
    """Arcee Fusion's row KLs run a block of rows at a time, its quartile searches and their values recompute
    the importances from the inputs, and the values' pass reads ``|b - m|`` (not tau, which the result reads):
    no leaf-sized buffer (before: tau, |tau|, the softmax and its terms, the importances broadcast to three
    rows twice, 11 buffers)."""
    method = jmerge.arcee_fusion()
    b = jnp.zeros(SHAPE, jnp.float32)
    ms = (jnp.ones(SHAPE, jnp.float32),)
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in method.defaults.items()}
    txt = _hlo(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True), b, ms, hp)
    assert _full_size_buffers(txt, N) == []


@pytest.mark.xfail(tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:3]) >= (0, 12, 1), strict=True,
                   reason="JAX 0.12.1's XLA:CPU keeps 10 leaf sizes of temporaries for this program (0.10.2-0.12.0: 7); "
                          "the leaf-sized buffers outside the conditional are the same, the growth is inside its "
                          "branches: not yet worked around")
def test_pcb_exponentials_rebuild_tau_inside_their_conditional():
    """PCB's six exponentials are written inside a conditional (xla.materialized) that rebuilds tau's rows
    from the inputs: captured from outside, the rows were the conditional's operands, three more leaf-sized
    buffers (temporaries 9 -> 7 leaf sizes: the exponentials and one; whole-tree PCB 2.3-2.5 vs 3.1-3.9 s)."""
    method = jmerge.pcb()
    b = jnp.zeros(SHAPE, jnp.float32)
    ms = tuple(jnp.ones(SHAPE, jnp.float32) * (i + 1) for i in range(3))
    prog = LeafProgram(method)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in method.defaults.items()}
    compiled = jax.jit(lambda b, ms, hp: prog(b, ms, hp, jax.random.key(0), {}, None, traced=True)).lower(
        b, ms, hp).compile()
    leaf = N * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 7.5 * leaf
