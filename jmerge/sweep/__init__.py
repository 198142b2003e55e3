"""Hyperparameter sweeps of merges: search spaces, one vmapped (and sharded) program per batch of settings,
resumable sweep directories, and sweeps of mergekit configs (``jmerge sweep CONFIG``).

    import jmerge, jmerge.sweep as sw
    res = sw.run_sweep(jmerge.ties(), base, models, sw.grid({"density": [0.2, 0.5], "scale": [0.5, 1.0]}),
                       eval_fn=lambda merged, batch: loss(merged, batch), data=batches, out_dir="sweep")

References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012); Jamieson and
Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter Optimization" (AISTATS 2016).
"""

from .distributed import init_distributed
from .execute import SettingsProgram, check_settings, split_spec, stack_settings
from .runner import SweepDirError, SweepResult, config_hash, run_sweep
from .space import (Choice, LogUniform, SuccessiveHalving, Uniform, choice, grid, log_uniform, random_search,
                    uniform)

__all__ = ["grid", "random_search", "uniform", "log_uniform", "choice", "Uniform", "LogUniform", "Choice",
           "SuccessiveHalving", "run_sweep", "SweepResult", "SweepDirError", "config_hash", "SettingsProgram",
           "check_settings", "split_spec", "stack_settings", "init_distributed"]
