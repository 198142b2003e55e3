"""``jmerge demo``: an end-to-end merging benchmark on real data (scikit-learn's digits).

Trains a small Flax vision transformer, fine-tunes it on 8 digit tasks, merges the fine-tuned
backbones with every available jmerge method and prints a per-task accuracy table. Imported lazily
by the CLI; needs scikit-learn, optax, flax, tqdm (and matplotlib for the chart).
"""

from .bench import (DemoConfig, FULL, REDUCED, add_arguments, build_models, format_table, main_from_args,
                    run_benchmark, run_demo, write_outputs)
from .tasks import TASKS, Task

__all__ = ["run_demo", "add_arguments", "main_from_args", "run_benchmark", "build_models", "DemoConfig",
           "FULL", "REDUCED", "format_table", "write_outputs", "TASKS", "Task"]
