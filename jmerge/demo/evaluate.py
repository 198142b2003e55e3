"""The digit tasks as a JAX evaluation of backbones: what sweeps of the quality benchmark optimise.

:func:`task_evaluator` returns ``eval_fn(backbone) -> {"accuracy": mean over tasks, "acc_<task>": ...}``,
a traceable JAX function usable as the ``eval_fn`` of :func:`jmerge.sweep.run_sweep` (which vmaps it
over settings), and the same function reports test accuracy after the sweep chose a setting.

References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) (8-task evaluation with
frozen per-task heads); Yadav et al., "TIES-Merging" (NeurIPS 2023) (hyperparameters chosen on validation).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from . import model as M

__all__ = ["task_evaluator", "per_task_accuracy"]


def per_task_accuracy(model_config: M.ModelConfig, backbone: Any, heads: Any, x: Any, y: Any, masks: Any, *,
                      per_task_models: bool = False) -> jax.Array:
    """Accuracy ``(T,)`` of each task's frozen head on ``backbone`` (traceable).

    Args:
      model_config: the backbone's :class:`~jmerge.demo.model.ModelConfig`.
      backbone: one backbone's params (read by every task), or with ``per_task_models`` a pytree whose
        leaves have a leading task axis ``T`` (task ``t`` is read with backbone ``t``: TALL masks, EMR).
      heads: ``{"w": (T, width, MAX_CLASSES), "b": (T, MAX_CLASSES)}``.
      x: ``(T, N, 64)`` inputs; y: ``(T, N)`` int labels; masks: ``(T, MAX_CLASSES)`` logit masks.
      per_task_models: see ``backbone``.

    Returns:
      float32 ``(T,)``: the fraction of inputs whose arg-max logit is the label.

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
    """
    def one(bb, h, xt, yt, m):
        pred = jnp.argmax(M.logits(model_config, bb, h, xt, m), axis=-1)
        return jnp.mean((pred == yt).astype(jnp.float32))

    return jax.vmap(one, in_axes=(0 if per_task_models else None, 0, 0, 0, 0))(
        backbone, heads, jnp.asarray(x), jnp.asarray(y), jnp.asarray(masks))


def task_evaluator(heads: Any, splits: Mapping[str, Any], split: str = "val", *,
                   per_task_models: bool = False) -> Callable[[Any], dict]:
    """The benchmark's tasks as an evaluation function of merged backbone params.

    Args:
      heads: the frozen task heads (from :func:`jmerge.demo.load_benchmark`).
      splits: the task data of :func:`jmerge.demo.load_benchmark`: ``splits[split] = (x, y)`` with
        ``x`` ``(T, N, 64)`` and ``y`` ``(T, N)``, ``splits["masks"]`` ``(T, MAX_CLASSES)``,
        ``splits["tasks"]`` the task names and ``splits["model_config"]`` the backbone config.
      split: ``"train"``, ``"val"`` (hyperparameter choice) or ``"test"`` (reporting).
      per_task_models: the function takes per-task backbones (leaves with a leading task axis).

    Returns:
      ``eval_fn(backbone) -> {"accuracy": mean over tasks, "acc_<task>": task accuracy}`` (float32 JAX
      scalars; traceable, so ``jmerge.sweep.run_sweep(method, base, models, settings, eval_fn,
      metric="accuracy", mode="max")`` merges and evaluates a batch of settings in one program).

    Example:
      >>> base, finetuned, heads, splits = load_benchmark()
      >>> res = jmerge.sweep.run_sweep(jmerge.ties(), base, finetuned, jmerge.sweep.grid(
      ...     {"density": [0.1, 0.2], "scale": [0.5, 1.0]}), task_evaluator(heads, splits),
      ...     metric="accuracy", mode="max")

    References: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); Yadav et al.,
    "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023) (validation-tuned λ).
    """
    if split not in splits:
        have = sorted(k for k in splits if k in ("train", "val", "test"))
        raise KeyError(f"task_evaluator: no split {split!r}; have {have}")
    x, y = splits[split]
    mc, names = splits["model_config"], list(splits["tasks"])
    heads = jax.tree.map(jnp.asarray, heads)
    x, y, masks = jnp.asarray(x), jnp.asarray(y), jnp.asarray(splits["masks"])

    def eval_fn(backbone):
        acc = per_task_accuracy(mc, backbone, heads, x, y, masks, per_task_models=per_task_models)
        out = {"accuracy": jnp.mean(acc)}
        out.update({f"acc_{n}": acc[i] for i, n in enumerate(names)})
        return out

    return eval_fn
