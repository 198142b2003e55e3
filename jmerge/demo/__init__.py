"""``jmerge demo``: an end-to-end merging benchmark on real data (scikit-learn's digits).

Pretrains a small Flax vision transformer on digit identity, gives each of 8 digit tasks a frozen
cosine head from the pretrained features (CLIP's zero-shot heads' role), fine-tunes the backbone per
task, chooses every merging method's hyperparameters on a validation split with :mod:`jmerge.sweep`
and prints a per-task test accuracy table. :func:`load_benchmark` returns the models and data
(``base, finetuned, heads, splits``) and :func:`task_evaluator` the tasks as a JAX evaluation of a
backbone, for one's own sweeps. Imported lazily by the CLI; needs scikit-learn, optax, flax, tqdm (and
matplotlib for the chart).
"""

from .bench import (Benchmark, DemoConfig, FULL, REDUCED, add_arguments, build_models, format_table,
                    load_benchmark, main_from_args, run_benchmark, run_demo, summary_line, write_outputs)
from .evaluate import per_task_accuracy, task_evaluator
from .tasks import TASKS, Task

__all__ = ["run_demo", "add_arguments", "main_from_args", "run_benchmark", "build_models", "load_benchmark",
           "Benchmark", "task_evaluator", "per_task_accuracy", "DemoConfig", "FULL", "REDUCED", "format_table",
           "summary_line", "write_outputs", "TASKS", "Task"]
