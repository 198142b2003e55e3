"""One jitted program per batch of settings: merge + evaluation over the settings axis, sharded over devices.

The settings' hyperparameter specs are split into numbers and a structure (:func:`split_spec`). Numbers that
vary across settings become one array per number with a leading settings axis; they are traced inside the
program, so every batch of settings (and every resumed run with the same batch size) reuses one compile.
Numbers equal in every setting stay Python constants. With more than one device the settings axis is sharded
(``NamedSharding(mesh, P("settings"))``; the batch is padded to a multiple of the device count with copies of
its first setting) while the models and the evaluation data are replicated; each device evaluates its own
settings, vmapped or (on CPU, ``vmap_width``) one after another in a ``lax.map``. The devices may belong to
several processes (``jax.distributed``, :mod:`jmerge.sweep.distributed`); the metrics are then gathered once
per call.

``eval_fn(merged)`` returns a scalar or a dict of scalars; with ``data`` (a pytree whose leaves have a leading
axis of evaluation batches) it is ``eval_fn(merged, batch)`` and the per-batch outputs are summed over the
batches in the program (``lax.map``), so a budget (number of batches) of successive halving is a slice.

References: Bradbury et al., JAX (``jit``, ``vmap``, ``lax.map``, ``shard_map``, ``NamedSharding``); Ilharco et
al., "Editing Models with Task Arithmetic" (ICLR 2023) for merges with traced coefficients.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import (Gradient, MergeInputError, PerModel, Rules, check_ranges, leaves_with_paths, merge,
                    prepare_leaf_hparams)
from ..core.select import whole_sort_limit
from .distributed import allgather, global_array

__all__ = ["split_spec", "stack_settings", "check_settings", "SettingsProgram"]

_NUM = "#"

MERGE_BATCH_BYTES = 1 << 30
"""``vmap_width="auto"`` on CPU vmaps the merges of a device's settings (and loops over the evaluations) when
the merged parameters plus the largest leaf's per-model float32 intermediates, times the device's settings,
stay within this many bytes; above it, settings are merged and evaluated one at a time."""

SORT_LIMIT = 32768
"""Top-k rows of at most this many entries are selected by a whole sort inside a sweep
(:func:`jmerge.core.select.whole_sort_limit`; the same masks as the counting search). A sweep's leaves are
replicated (only the settings axis is sharded), so a sort gathers nothing; it compiles to a small program
that vmaps well, where the counting search is a ``while_loop`` per leaf shape."""


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0


def split_spec(spec: Any) -> tuple[Any, list[float], Callable[[Sequence[Any]], Any]]:
    """``(structure key, numbers, rebuild)`` of a hyperparameter spec.

    ``rebuild(values)`` returns the spec with its numbers replaced by ``values`` (possibly traced); the
    structure key is equal for specs that differ only in their numbers.

    References: none (infrastructure).
    """
    if _is_number(spec):
        return _NUM, [float(spec)], lambda v: v[0]
    if isinstance(spec, PerModel):
        items = list(np.asarray(spec.specs)) if isinstance(spec.specs, (np.ndarray, jax.Array)) else list(spec.specs)
        key, nums, rb = split_spec(items)
        return ("PerModel", key), nums, lambda v: PerModel(rb(v))
    if isinstance(spec, Gradient):
        key, nums, rb = split_spec(list(spec.values))
        return ("Gradient", key), nums, lambda v: Gradient(rb(v))
    if isinstance(spec, Rules):
        filters = [f for f, _ in spec.rules]
        key, nums, rb = split_spec([v for _, v in spec.rules] + [spec.default])

        def rebuild_rules(v):
            vals = rb(v)
            return Rules(list(zip(filters, vals[:-1])), default=vals[-1], allow_unused=spec.allow_unused)
        return ("Rules", tuple(filters), spec.allow_unused, key), nums, rebuild_rules
    if isinstance(spec, Mapping):
        ks = list(spec)
        parts = [split_spec(spec[k]) for k in ks]
        sizes = [len(p[1]) for p in parts]

        def rebuild_map(v):
            out, i = {}, 0
            for k, (_, _, rb), n in zip(ks, parts, sizes):
                out[k] = rb(v[i:i + n])
                i += n
            return type(spec)(out) if type(spec) is not dict else out
        return ("map", tuple((k, p[0]) for k, p in zip(ks, parts))), [x for p in parts for x in p[1]], rebuild_map
    if isinstance(spec, (list, tuple)):
        parts = [split_spec(s) for s in spec]
        sizes = [len(p[1]) for p in parts]
        kind = type(spec)

        def rebuild_seq(v):
            out, i = [], 0
            for (_, _, rb), n in zip(parts, sizes):
                out.append(rb(v[i:i + n]))
                i += n
            return kind(out)
        return ("seq", kind.__name__, tuple(p[0] for p in parts)), [x for p in parts for x in p[1]], rebuild_seq
    return ("const", repr(spec)), [], lambda v: spec


@dataclasses.dataclass
class _Stacked:
    """Hyperparameters of many settings: the rebuilders, the varying numbers (settings x k) and the constants."""

    names: list
    rebuild: list
    sizes: list
    varying: list  # per name: indices of the varying numbers
    consts: list  # per name: the numbers of setting 0
    values: np.ndarray  # (N, total varying numbers) float32

    def hparams(self, row: Any) -> dict[str, Any]:
        """The hparams dict of one setting; ``row`` holds its varying numbers (traced in the program)."""
        out, j = {}, 0
        for name, rb, var, const in zip(self.names, self.rebuild, self.varying, self.consts):
            vals = list(const)
            for i in var:
                vals[i] = row[j]
                j += 1
            out[name] = rb(vals)
        return out


def stack_settings(hparams_list: Sequence[Mapping[str, Any]]) -> _Stacked:
    """Stack the settings' specs: the numbers that differ between settings become a ``(N, k)`` array.

    Raises:
      MergeInputError: two settings give one hyperparameter in different forms (a number and a gradient ...),
        or different hyperparameter names.

    References: none (infrastructure).
    """
    if not hparams_list:
        raise MergeInputError("a sweep needs at least one setting.")
    names = list(hparams_list[0])
    splits = []
    for i, hp in enumerate(hparams_list):
        if sorted(hp) != sorted(names):
            raise MergeInputError(f"setting {i} sets {sorted(hp)} but setting 0 sets {sorted(names)}; every setting "
                                  "of one sweep must set the same hyperparameters.")
        splits.append([split_spec(hp[k]) for k in names])
    rebuild, sizes, varying, consts, cols = [], [], [], [], []
    for j, name in enumerate(names):
        key0, nums0, rb0 = splits[0][j]
        for i, sp in enumerate(splits):
            if sp[j][0] != key0 or len(sp[j][1]) != len(nums0):
                raise MergeInputError(f"hyperparameter '{name}': setting {i} gives it in another form than setting 0 "
                                      f"({hparams_list[i][name]!r} vs {hparams_list[0][name]!r}); one sweep keeps "
                                      "one form (e.g. a number everywhere, or a PerModel everywhere).")
        mat = np.array([sp[j][1] for sp in splits], np.float64).reshape(len(splits), len(nums0))
        var = [c for c in range(mat.shape[1]) if not np.all(mat[:, c] == mat[0, c])]
        rebuild.append(rb0)
        sizes.append(len(nums0))
        varying.append(var)
        consts.append(list(mat[0]))
        cols += [mat[:, c] for c in var]
    values = np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((len(splits), 0), np.float32)
    return _Stacked(names, rebuild, sizes, varying, consts, values)


def check_settings(method: Any, base: Any, num_models: int, hparams_list: Sequence[Mapping[str, Any]],
                   describe: Callable[[int], str] | None = None) -> None:
    """Resolve every setting on the host and check it against the method's ranges, before anything runs.

    ``base`` is the base pytree or its list of leaf paths.

    Raises:
      MergeInputError: naming the setting (``describe(i)``), the hyperparameter and the allowed range.

    References: none (infrastructure).
    """
    if isinstance(base, (list, tuple)) and all(isinstance(p, str) for p in base):
        paths = list(base)
    else:
        paths = leaves_with_paths(base)[0]
    for i, hp in enumerate(hparams_list):
        try:
            check_ranges(method, paths, prepare_leaf_hparams(method, base, num_models, hp))
        except MergeInputError as e:
            what = describe(i) if describe else f"setting {i} ({dict(hp)!r})"
            raise MergeInputError(f"{what}: {e}") from None


def _merge_batch_bytes(base: Any, models: Any, settings: int) -> int:
    """Bytes a vmapped merge of ``settings`` settings holds at once (estimate): the merged parameters plus the
    largest leaf's float32 intermediates for every model, per setting."""
    leaves = jax.tree.leaves(base)
    merged = sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves)
    largest = max((int(np.size(x)) for x in leaves), default=0)
    return settings * (merged + 4 * largest * (len(models) + 2))


def _mesh_shardings():
    devs = jax.devices()
    if len(devs) == 1:
        return 1, None, None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415
    mesh = Mesh(np.array(devs), ("settings",))
    return len(devs), NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())


class SettingsProgram:
    """The jitted merge + evaluation of a batch of settings (see the module docstring).

    Args:
      method: the merge method (a :class:`~jmerge.Transform`).
      eval_fn: ``eval_fn(merged)`` or, with data, ``eval_fn(merged, batch)``: a scalar or a dict of scalars.
      merge_kwargs: extra keyword arguments of :func:`jmerge.merge` (``seed``, ``compute_dtype``, ``out_dtype``
        ...).
      metric: the name of a scalar output.
      vmap_width: settings merged at once on each device. ``None``: all of the device's settings in one ``vmap``;
        ``w``: the device's settings in a loop (``lax.map``) over groups of ``w`` vmapped settings (``1``: one
        setting at a time, the unbatched merge body: half the trace time and less to compile for methods whose
        top-k searches are loops (a vmapped ``while_loop`` runs every setting until the slowest converges, its
        branches as selects), and no settings-wide copy of every intermediate). ``"merge"``: the merges of all
        of the device's settings in one ``vmap`` and the evaluations one setting at a time (``lax.map``): work
        that no setting changes (task vectors, the sorts of their magnitudes that top-k thresholds index) is
        done once per call instead of once per setting, and the evaluation, usually the larger cost, runs
        unbatched, as fast on CPU as a single call. ``"auto"`` (default): on CPU ``"merge"`` when the merges
        of a device's settings fit in :data:`MERGE_BATCH_BYTES` (the merged parameters and the largest leaf's
        per-model intermediates, times the settings), else 1; on accelerators None (where a batch of settings
        fills the device). With several devices the settings axis is split over them (``shard_map`` when
        looping: each device loops over its own settings).

    Attributes:
      timings: seconds spent tracing + lowering (``trace_s``), compiling (``compile_s``) and running
        (``run_s``: the calls, gather included) by this program.

    References: Bradbury et al., JAX (``jit``, ``vmap``, ``lax.map``, ``shard_map``, ``NamedSharding``).
    """

    def __init__(self, method: Any, eval_fn: Callable[..., Any], *, merge_kwargs: Mapping[str, Any] | None = None,
                 metric: str = "metric", vmap_width: int | str | None = "auto"):
        self.auto = vmap_width == "auto"
        if self.auto:
            vmap_width = "merge" if jax.devices()[0].platform == "cpu" else None
        if vmap_width is not None and vmap_width != "merge" and (isinstance(vmap_width, str) or int(vmap_width) < 1):
            raise MergeInputError(f"vmap_width={vmap_width!r}: give a positive number of settings, 'merge', 'auto' "
                                  "or None.")
        self.method, self.eval_fn, self.metric = method, eval_fn, metric
        self.merge_kwargs = {"group_leaves": True, **dict(merge_kwargs or {})}
        self.vmap_width = vmap_width if vmap_width in (None, "merge") else int(vmap_width)
        self.num_devices, self.shard, self.replicate = _mesh_shardings()
        self._jitted: dict = {}
        self._compiled: dict = {}
        self._placed: tuple | None = None
        self.shares: dict = {}
        self.local: dict = {}
        self.timings = {"trace_s": 0.0, "compile_s": 0.0, "run_s": 0.0}

    def _as_dict(self, out: Any) -> dict:
        if isinstance(out, Mapping):
            return {str(k): jnp.asarray(v, jnp.float32) for k, v in out.items()}
        return {self.metric: jnp.asarray(out, jnp.float32)}

    def _fn(self, stacked: _Stacked, with_data: bool):
        key = (id(stacked), with_data)
        if key not in self._jitted:
            method, kw, width, auto = self.method, self.merge_kwargs, self.vmap_width, self.auto

            def merge_one(row, base, models):
                with whole_sort_limit(SORT_LIMIT):
                    return merge(method, base, models, hparams=stacked.hparams(row), traced_range_checks=False, **kw)

            def evaluate(merged, data):
                if not with_data:
                    return self._as_dict(self.eval_fn(merged))
                outs = lax.map(lambda b: self._as_dict(self.eval_fn(merged, b)), data)
                return jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)

            def one(row, base, models, data):
                return evaluate(merge_one(row, base, models), data)

            def settings(vals, base, models, data):  # the (local) settings axis
                w = width
                if w == "merge" and auto and _merge_batch_bytes(base, models, vals.shape[0]) > MERGE_BATCH_BYTES:
                    w = 1
                if w == "merge":
                    merged = jax.vmap(merge_one, in_axes=(0, None, None))(vals, base, models)
                    return lax.map(lambda m: evaluate(m, data), merged)
                if w is None or w >= vals.shape[0]:
                    return jax.vmap(one, in_axes=(0, None, None, None))(vals, base, models, data)
                return lax.map(lambda r: one(r, base, models, data), vals, batch_size=None if w == 1 else w)

            if self.shard is not None and width is not None:
                from jax.sharding import PartitionSpec as P  # noqa: PLC0415
                settings = jax.shard_map(settings, mesh=self.shard.mesh, in_specs=(P("settings"), P(), P(), P()),
                                         out_specs=P("settings"), check_vma=False)
            self._jitted[key] = jax.jit(settings)
        return self._jitted[key]

    def _executable(self, stacked: _Stacked, args: tuple):
        """The compiled program for these arguments' shapes (traced, lowered and compiled once, timed)."""
        with_data = args[3] is not None
        sig = (id(stacked), with_data, jax.tree.structure(args),
               tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)))
        if sig not in self._compiled:
            t0 = time.perf_counter()
            lowered = self._fn(stacked, with_data).lower(*args)
            t1 = time.perf_counter()
            self._compiled[sig] = lowered.compile()
            self.timings["trace_s"] += t1 - t0
            self.timings["compile_s"] += time.perf_counter() - t1
        return self._compiled[sig]

    def batch_size(self, n: int, requested: int | None = None) -> int:
        """Settings per program call: ``requested`` (default ``n``) rounded up to a multiple of the devices (times
        ``vmap_width`` when each device loops over groups of settings, so every group is full: one traced body)."""
        b = max(1, int(requested or n))
        vw = self.vmap_width if isinstance(self.vmap_width, int) else 1
        d = self.num_devices * vw if -(-b // self.num_devices) > vw else self.num_devices
        return -(-b // d) * d

    def __call__(self, stacked: _Stacked, rows: Sequence[int], base: Any, models: Any, data: Any = None,
                 batch_size: int | None = None) -> list[dict[str, float]]:
        """Metrics (summed over the data's batches) of the settings ``rows`` of ``stacked``, one dict each.

        ``batch_size`` (a multiple of the device count) pads the call to a fixed size, so calls share a compile.
        """
        rows = list(rows)
        bs = self.batch_size(len(rows), batch_size)
        if bs < len(rows):
            raise MergeInputError(f"{len(rows)} settings exceed the batch size {bs}.")
        idx = rows + [rows[0]] * (bs - len(rows))
        multi = jax.process_count() > 1
        if self.shard is None:
            vals = jnp.asarray(stacked.values[idx])
        elif multi:  # global arrays over every process's devices, built from the same host values everywhere
            vals = global_array(stacked.values[idx], self.shard)
            base, models, data = self._placed_global(base, models, data)
        else:
            vals = jax.device_put(jnp.asarray(stacked.values[idx]), self.shard)
            base, models, data = jax.device_put((base, models, data), self.replicate)
        exe = self._executable(stacked, (vals, base, models, data))
        t0 = time.perf_counter()
        out = exe(vals, base, models, data)
        self._record_shares(out, rows)
        out = allgather(out) if multi else out  # the one collective of the batch: a few floats per setting
        out = {k: np.asarray(v, np.float64) for k, v in out.items()}
        self.timings["run_s"] += time.perf_counter() - t0
        return [{k: float(v[i]) for k, v in out.items()} for i in range(len(rows))]

    def _placed_global(self, base: Any, models: Any, data: Any) -> tuple:
        key = (id(base), id(models), id(data))
        if self._placed is None or self._placed[0] != key:
            placed = jax.tree.map(lambda x: global_array(x, self.replicate), (base, models, data))
            self._placed = (key, placed, (base, models, data))  # the originals kept alive: ids stay unique
        return self._placed[1]

    def _record_shares(self, out: Mapping[str, jax.Array], rows: list) -> None:
        """``shares``: process -> settings (``rows``' values) its devices computed in the last call; ``local``:
        the metrics this process computed itself, before any gather (what a test of disjoint shares reads)."""
        if not out:
            return
        leaf = next(iter(out.values()))
        n = len(rows)
        shares: dict = {}
        for dev, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            pos = range(leaf.shape[0])[index[0]] if index else range(leaf.shape[0])
            shares.setdefault(dev.process_index, set()).update(rows[p] for p in pos if p < n)
        self.shares = {p: sorted(s) for p, s in shares.items()}
        local: dict = {}
        for name, arr in out.items():
            for sh in arr.addressable_shards:
                pos = range(arr.shape[0])[sh.index[0]] if sh.index else range(arr.shape[0])
                vals = np.asarray(sh.data, np.float64).reshape(-1)
                for p, v in zip(pos, vals):
                    if p < n:
                        local.setdefault(rows[p], {})[name] = float(v)
        self.local = local
