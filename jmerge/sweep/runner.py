"""Run a sweep: settings -> batched programs -> records, with a resumable sweep directory.

The sweep directory holds ``sweep.json`` (the config hash), ``results.jsonl`` (one line per finished
evaluation, appended and flushed as each batch of settings finishes) and, at the end, ``results.csv``,
``results.json``, ``sweep.png``, ``best.json`` (and ``best.yml`` for config sweeps). A rerun with the same
config skips every recorded ``(setting, budget)``; a directory of another config is refused.

Under ``jax.distributed`` (see :mod:`jmerge.sweep.distributed`) every process runs the same call: each batch's
settings are sharded over the devices of all processes, the metrics are gathered once per batch, and only
process 0 reads and writes the sweep directory (its finished records are broadcast on resume).

References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012); Jamieson and
Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter Optimization" (AISTATS 2016).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax

from ..core import MergeInputError
from .distributed import barrier, broadcast_json, is_lead, process_count
from .execute import SettingsProgram, check_settings, stack_settings
from .report import atomic_write, jsonable, write_tables
from .space import SuccessiveHalving

__all__ = ["SweepDirError", "SweepResult", "run_sweep", "config_hash"]


class SweepDirError(MergeInputError):
    """A sweep directory that belongs to another config (or is not a sweep directory).

    References: none (infrastructure).
    """


@dataclasses.dataclass
class SweepResult:
    """What a sweep found.

    Attributes:
      records: one record per setting (its last, largest-budget evaluation): ``index``, ``params``, ``budget``,
        ``metrics``, ``status`` (``"ok"`` / ``"failed"``), ``error``.
      best: the best ``ok`` record at the full budget (None when every setting failed).
      all_records: every evaluation (successive halving evaluates settings on several budgets).
      metric, mode: what was optimised.
      out_dir: the sweep directory (or None).
      evaluated: evaluations run by this call (the rest came from the directory).
      seconds: wall time of this call's evaluations.
      timings: of those seconds, tracing + lowering (``trace_s``), XLA compiling (``compile_s``) and running
        (``run_s``) the batched programs.

    References: none (infrastructure).
    """

    records: list
    best: dict | None
    all_records: list
    metric: str
    mode: str
    out_dir: str | None
    evaluated: int
    seconds: float
    timings: dict = dataclasses.field(default_factory=dict)


def config_hash(obj: Any) -> str:
    """SHA-256 of a canonical JSON form of ``obj`` (what identifies a sweep's directory).

    References: none (infrastructure).
    """
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode("utf-8")).hexdigest()


def _open_dir(out_dir: str, h: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "sweep.json")
    lines_path = os.path.join(out_dir, "results.jsonl")
    if os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                old = json.load(f).get("config_hash")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != h:
            raise SweepDirError(f"{out_dir} holds a sweep of another config (hash {str(old)[:12]} != {h[:12]}); "
                                "give another --out directory, or delete it to start over.")
    elif os.path.exists(lines_path) or any(not n.startswith(".") for n in os.listdir(out_dir)):
        raise SweepDirError(f"{out_dir} is not empty and is not a sweep directory (no sweep.json); give an empty "
                            "or new directory.")
    else:
        atomic_write(meta_path, json.dumps({"config_hash": h}) + "\n")
    done: dict = {}
    if os.path.exists(lines_path):
        with open(lines_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill: that setting runs again
                done[(r["index"], r.get("budget"))] = r
        # drop what a killed run left half-written, so appended lines stay whole
        atomic_write(lines_path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in done.values()))
    return done


def _append(out_dir: str | None, records: Sequence[dict]) -> None:
    if out_dir is None or not records:
        return
    with open(os.path.join(out_dir, "results.jsonl"), "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:500]


def run_sweep(method: Any, base: Any, models: Sequence[Any], settings: Any, eval_fn: Callable[..., Any], *,
              data: Any = None, metric: str | None = None, mode: str = "min", reduce: str = "mean",
              finalize: Callable[[dict], dict] | None = None, out_dir: str | None = None,
              batch_size: int | None = None, merge_kwargs: Mapping[str, Any] | None = None,
              hparams: Sequence[Mapping[str, Any]] | None = None, describe: Callable[[int], str] | None = None,
              fingerprint: Any = None, progress: bool = True,
              write_best: Callable[[dict, str], None] | None = None,
              plot: Callable[[str, list, str], str | None] | None = None,
              vmap_width: int | str | None = "auto") -> SweepResult:
    """Merge and evaluate every setting, batched: one jitted program vmapped over settings (sharded over the
    devices when there are several).

    Args:
      method: the merge method, e.g. ``jmerge.ties()``.
      base: base params (any pytree).
      models: the fine-tuned params.
      settings: a list of settings (:func:`grid`, :func:`random_search`) or a :class:`SuccessiveHalving`.
      eval_fn: ``eval_fn(merged) -> scalar | dict`` or, with ``data``, ``eval_fn(merged, batch)`` (JAX, traced).
      data: evaluation data: a pytree whose leaves have a leading axis of batches (the budget unit of
        successive halving). Each batch's outputs are summed over the batches; ``reduce="mean"`` then divides by
        the number of batches.
      metric: the output to optimise (default: the only or first output).
      mode: ``"min"`` or ``"max"``.
      reduce: ``"mean"`` or ``"sum"`` over evaluation batches.
      finalize: host function of the reduced outputs returning the metrics (e.g. loss = nll / tokens).
      out_dir: the sweep directory (resumable); None keeps results in memory only.
      batch_size: settings per program call (default: all pending, rounded up to a multiple of the devices);
        every call of one sweep has this size, so the program compiles once per evaluation budget.
      merge_kwargs: keyword arguments of :func:`jmerge.merge` (``seed``, ``compute_dtype``, ``out_dtype`` ...).
      hparams: the merge hyperparameters of each setting (default: the settings themselves; config sweeps map
        mergekit parameters to jmerge specs).
      describe: how errors name setting ``i``.
      fingerprint: extra identity of the sweep for the directory hash (e.g. the config text).
      progress: print a progress line per batch on stderr.
      write_best: called as ``write_best(best_record, out_dir)`` to write extra outputs (``best.yml``).
      plot: ``plot(records, metric) -> PNG bytes or a note (str)``, written as ``sweep.png`` (e.g.
        :func:`jmerge.demo.sweep_plot.plot`, which needs matplotlib); None: no plot.
      vmap_width: how a device runs its settings (see :class:`SettingsProgram`): ``"auto"`` (on CPU the merges
        vmapped and the evaluations one at a time, within a memory budget; the whole batch vmapped on
        accelerators), ``"merge"``, a number of settings per vmapped group, or None (the whole batch).

    Returns:
      A :class:`SweepResult`.

    Raises:
      MergeInputError: a setting out of range (before anything runs, naming it), bad arguments.
      SweepDirError: ``out_dir`` belongs to another sweep.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012); Jamieson and
    Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter Optimization" (AISTATS 2016).
    """
    if mode not in ("min", "max"):
        raise MergeInputError(f"mode={mode!r}: use 'min' or 'max'.")
    if reduce not in ("mean", "sum"):
        raise MergeInputError(f"reduce={reduce!r}: use 'mean' or 'sum'.")
    halving = settings if isinstance(settings, SuccessiveHalving) else None
    settings = list(halving.settings if halving else settings)
    if not settings:
        raise MergeInputError("a sweep needs at least one setting.")
    hps = list(hparams) if hparams is not None else [dict(s) for s in settings]
    if len(hps) != len(settings):
        raise MergeInputError(f"{len(hps)} hparams for {len(settings)} settings.")
    models = list(models)
    describe = describe or (lambda i: f"sweep setting {i} ({json.dumps(jsonable(settings[i]))})")
    check_settings(method, base, len(models), hps, describe)
    stacked = stack_settings(hps)
    n_batches = None
    if data is not None:
        lead = {int(x.shape[0]) for x in jax.tree.leaves(data)}
        if len(lead) != 1 or 0 in lead:
            raise MergeInputError(f"data: every leaf needs the same leading (batches) axis; got {sorted(lead)}.")
        n_batches = lead.pop()
    if halving and data is None:
        raise MergeInputError("successive halving needs `data` (its budget is a number of evaluation batches).")
    params = [jsonable(s) for s in settings]
    h = config_hash({"method": repr(method), "settings": params, "hparams": [jsonable(x) for x in hps],
                     "metric": metric, "mode": mode, "reduce": reduce, "data": n_batches,
                     "halving": None if halving is None else [halving.eta, halving.min_budget],
                     "fingerprint": fingerprint})
    lead = is_lead()
    done = _open_dir_shared(out_dir, h, lead) if out_dir else {}
    program = SettingsProgram(method, eval_fn, merge_kwargs=merge_kwargs, metric=metric or "metric",
                              vmap_width=vmap_width)
    bs = program.batch_size(len(settings), batch_size)
    state = {"evaluated": 0, "seconds": 0.0, "metric": metric}
    all_recs: dict = dict(done)

    def evaluate(indices: list[int], budget: int | None) -> None:
        todo = [i for i in indices if (i, budget) not in all_recs]
        d = None if budget is None else jax.tree.map(lambda x: x[:budget], data)
        for s in range(0, len(todo), bs):
            chunk = todo[s:s + bs]
            t0 = time.perf_counter()
            try:
                outs = program(stacked, chunk, base, models, d, batch_size=bs)
                err = None
            except Exception as e:  # noqa: BLE001 - one failed batch marks its settings failed; the sweep goes on
                outs, err = [None] * len(chunk), _first_line(e)
            dt = time.perf_counter() - t0
            recs = []
            for i, o in zip(chunk, outs):
                r = {"index": i, "params": params[i], "budget": budget, "metrics": {}, "status": "failed",
                     "error": err, "seconds": dt / len(chunk)}
                if o is not None:
                    m = {k: (v / budget if reduce == "mean" and budget else v) for k, v in o.items()}
                    try:
                        m = {k: float(v) for k, v in (finalize(m) if finalize else m).items()}
                    except Exception as e:  # noqa: BLE001
                        m, r["error"] = {}, _first_line(e)
                    r["metrics"] = m
                    bad = [k for k, v in m.items() if not math.isfinite(v)]
                    if m and not bad:
                        r["status"], r["error"] = "ok", None
                    elif bad:
                        r["error"] = f"non-finite {', '.join(bad)}"
                recs.append(r)
                all_recs[(i, budget)] = r
            _append(out_dir if lead else None, recs)
            state["evaluated"] += len(chunk)
            state["seconds"] += dt
            if progress and lead:
                _progress(all_recs, len(settings), budget, state, mode)

    def key(r):
        v = r["metrics"].get(state["metric"])
        return v if mode == "min" else -v

    def resolve_metric():
        if state["metric"] is None:
            for r in all_recs.values():
                if r["metrics"]:
                    state["metric"] = next(iter(r["metrics"]))
                    break
        if state["metric"] is not None:
            for r in all_recs.values():
                if r["status"] == "ok" and state["metric"] not in r["metrics"]:
                    raise MergeInputError(f"metric '{state['metric']}' is not among the evaluation's outputs "
                                          f"{sorted(r['metrics'])}.")

    if halving is None:
        evaluate(list(range(len(settings))), n_batches)
        resolve_metric()
        final = [all_recs[(i, n_batches)] for i in range(len(settings))]
        full = final
    else:
        alive = list(range(len(settings)))
        final_map: dict = {}
        budgets = halving.budgets(n_batches)
        for k, b in enumerate(budgets):
            evaluate(alive, b)
            resolve_metric()
            for i in alive:
                final_map[i] = all_recs[(i, b)]
            ok = sorted((i for i in alive if all_recs[(i, b)]["status"] == "ok"), key=lambda i: key(all_recs[(i, b)]))
            if k + 1 < len(budgets):
                alive = ok[:halving.survivors(len(alive))]
                if not alive:
                    break
        final = [final_map[i] for i in range(len(settings))]
        full = [r for r in final if r["budget"] == n_batches]
    ok = [r for r in full if r["status"] == "ok"]
    best = min(ok, key=key) if ok else None
    result = SweepResult(final, best, sorted(all_recs.values(), key=lambda r: (r["index"], r["budget"] or 0)),
                         state["metric"] or (metric or "metric"), mode, out_dir, state["evaluated"], state["seconds"],
                         dict(program.timings))
    if out_dir and lead:
        _write_outputs(result, h, write_best, plot)
    barrier("jmerge-sweep-written")  # with several processes: every process returns once the directory is complete
    return result


def _open_dir_shared(out_dir: str, h: str, lead: bool) -> dict:
    """:func:`_open_dir` on process 0; with several processes its finished records (or its error) are
    broadcast, so every process skips the same settings."""
    if process_count() == 1:
        return _open_dir(out_dir, h)
    msg, err = {"records": [], "error": None}, None
    if lead:
        try:
            msg["records"] = list(_open_dir(out_dir, h).values())
        except (SweepDirError, OSError) as e:  # every process stops with process 0's error (none waits forever)
            msg["error"], err = str(e), e
    msg = broadcast_json(msg)
    if err is not None:
        raise err
    if msg["error"] is not None:
        raise SweepDirError(f"process 0: {msg['error']}")
    return {(r["index"], r.get("budget")): r for r in msg["records"]}


def _progress(recs: Mapping, n: int, budget: int | None, state: Mapping, mode: str) -> None:
    at = [r for (i, b), r in recs.items() if b == budget]
    failed = sum(r["status"] != "ok" for r in at)
    metric = state["metric"]
    vals = [r["metrics"].get(metric) for r in at if r["status"] == "ok" and metric in r["metrics"]]
    if metric is None and at and at[0]["metrics"]:
        metric = next(iter(at[0]["metrics"]))
        vals = [r["metrics"].get(metric) for r in at if r["status"] == "ok" and metric in r["metrics"]]
    best = (min(vals) if mode == "min" else max(vals)) if vals else None
    rung = "" if budget is None else f" (budget {budget})"
    b = f", best {metric}={best:.6g}" if best is not None else ""
    print(f"sweep: {len(at)}/{n} settings{rung}, {failed} failed{b}, {state['seconds']:.1f} s", file=sys.stderr,
          flush=True)


def _write_outputs(result: SweepResult, h: str, write_best: Callable[[dict, str], None] | None,
                   plot: Callable[[list, str], bytes | str] | None) -> None:
    out = result.out_dir
    meta = {"config_hash": h, "metric": result.metric, "mode": result.mode,
            "best": None if result.best is None else result.best["index"]}
    write_tables(out, result.all_records, meta)
    png = plot(result.records, result.metric) if plot else None
    if isinstance(png, bytes):
        atomic_write(os.path.join(out, "sweep.png"), png)
    elif png:
        print(f"sweep: {png}", file=sys.stderr)
    if result.best is not None:
        atomic_write(os.path.join(out, "best.json"), json.dumps(result.best, indent=1) + "\n")
        if write_best is not None:
            write_best(result.best, out)
