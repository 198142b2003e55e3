"""``jmerge sweep CONFIG [--out DIR]``: sweep a mergekit config's parameters (a ``sweep:`` block), scoring each
setting by LM loss on a text file; writes results.csv/json, sweep.png and best.yml (resumable).

References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track); Bergstra and Bengio (JMLR 2012).
"""

from __future__ import annotations

import argparse
import os

from .common import fail


def add_parser(sub) -> None:
    """Register ``jmerge sweep``.

    References: none (infrastructure).
    """
    p = sub.add_parser("sweep", help="sweep a merge config's parameters (grid, random, halving) by LM loss",
                       description="Sweep the parameters of a mergekit config's 'sweep:' block: every batch of "
                                   "settings is one compiled program (vmapped, sharded over devices). Writes "
                                   "results.csv, results.json, sweep.png and best.yml in --out; a rerun resumes.")
    p.add_argument("config", help="a mergekit merge config with a 'sweep:' block")
    p.add_argument("--out", default=None, help="sweep directory (default: CONFIG without .yml + '.sweep')")
    p.add_argument("--batch", type=int, default=None, help="settings per compiled program call (default: all)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process sweep (jax.distributed): process 0's address; run the same command in every "
                        "process with its --process-id; each evaluates its share, process 0 writes --out")
    p.add_argument("--num-processes", type=int, default=None, help="processes of a multi-process sweep")
    p.add_argument("--process-id", type=int, default=None, help="this process's index (0 writes the outputs)")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    """Run ``jmerge sweep``.

    References: none (infrastructure).
    """
    from ..core import MergeInputError  # noqa: PLC0415
    from ..io import CheckpointError  # noqa: PLC0415
    from ..mergekit import ConfigError  # noqa: PLC0415
    from ..demo.sweep_plot import plot  # noqa: PLC0415 - matplotlib only inside, when installed
    from ..sweep.config import run_config_sweep  # noqa: PLC0415
    from .common import enable_compile_cache  # noqa: PLC0415
    out = a.out or os.path.splitext(a.config)[0] + ".sweep"
    if a.batch is not None and a.batch < 1:
        return fail("--batch must be at least 1", 2)
    if a.coordinator or a.num_processes or a.process_id is not None:
        if not (a.coordinator and a.num_processes and a.process_id is not None):
            return fail("a multi-process sweep needs --coordinator, --num-processes and --process-id together", 2)
        from ..sweep.distributed import init_distributed  # noqa: PLC0415
        init_distributed(a.coordinator, a.num_processes, a.process_id)
    enable_compile_cache()
    try:
        res = run_config_sweep(a.config, out, batch=a.batch, plot=plot)
    except ConfigError as e:
        return fail(str(e), 2)
    except (MergeInputError, CheckpointError, ValueError) as e:
        return fail(str(e), 1)
    if res.best is None:
        return fail(f"every setting failed; see {os.path.join(out, 'results.csv')}", 1)
    print(f"best: setting {res.best['index']} {res.best['params']} {res.metric}={res.best['metrics'][res.metric]:.6g}"
          f" -> {os.path.join(out, 'best.yml')}")
    return 0
