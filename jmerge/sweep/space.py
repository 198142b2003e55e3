"""Search spaces: the settings a sweep evaluates.

A *setting* is a mapping from hyperparameter names to values: public names (``"density"``), qualified
names (``"trim.density"``) or, in config sweeps, mergekit parameter names. A value is a number, or any
hyperparameter spec the method accepts: :class:`~jmerge.core.hparams.PerModel` (one value per merged model,
where the method allows it), :class:`~jmerge.core.hparams.Gradient`, ...

* :func:`grid` -- the Cartesian product of value lists (first name varies slowest).
* :func:`random_search` -- ``n`` settings drawn from :func:`uniform`, :func:`log_uniform` and :func:`choice`
  distributions with a seeded NumPy generator (the same seed gives the same settings, so a resumed sweep
  finds them again).
* :class:`SuccessiveHalving` -- an adaptive strategy over any list of settings: every setting is evaluated
  on a small budget (the first ``min_budget`` evaluation batches), the best ``1/eta`` go on to ``eta`` times
  the budget, until the full data.

References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012); Jamieson and
Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter Optimization" (AISTATS 2016) for
successive halving.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..core import MergeInputError

__all__ = ["Uniform", "LogUniform", "Choice", "uniform", "log_uniform", "choice", "grid", "random_search",
           "SuccessiveHalving"]


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform on ``[low, high]``.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        """One draw."""
        return float(rng.uniform(self.low, self.high))


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """Log-uniform on ``[low, high]`` (both > 0): uniform in ``log``.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        """One draw."""
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``options``, each equally likely (options may be any spec, e.g. ``PerModel``).

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """

    options: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw."""
        return self.options[int(rng.integers(len(self.options)))]


def uniform(low: float, high: float) -> Uniform:
    """A uniform distribution on ``[low, high]`` for :func:`random_search`.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise MergeInputError(f"uniform({low}, {high}): give finite bounds with low <= high.")
    return Uniform(low, high)


def log_uniform(low: float, high: float) -> LogUniform:
    """A log-uniform distribution on ``[low, high]`` (``0 < low <= high``) for :func:`random_search`.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """
    low, high = float(low), float(high)
    if not (0 < low <= high and math.isfinite(high)):
        raise MergeInputError(f"log_uniform({low}, {high}): give finite bounds with 0 < low <= high.")
    return LogUniform(low, high)


def choice(options: Sequence[Any]) -> Choice:
    """A uniform choice among ``options`` for :func:`random_search`.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """
    options = tuple(options)
    if not options:
        raise MergeInputError("choice([]): give at least one option.")
    return Choice(options)


def grid(values: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the given values (the first name varies slowest).

    Args:
      values: hyperparameter name -> the values to try (a non-empty list each).

    Returns:
      The settings, one dict per combination.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012)
    (grid search as the baseline).
    """
    if not values:
        raise MergeInputError("grid({}): give at least one hyperparameter and its values.")
    names = list(values)
    lists = []
    for k in names:
        v = values[k]
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) == 0:
            raise MergeInputError(f"grid: '{k}' needs a non-empty list of values (got {v!r}).")
        lists.append(list(v))
    return [dict(zip(names, combo)) for combo in itertools.product(*lists)]


def random_search(space: Mapping[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` settings drawn at random.

    Args:
      space: name -> :func:`uniform`, :func:`log_uniform`, :func:`choice`, or a fixed value.
      n: number of settings.
      seed: the NumPy generator's seed (same seed, same settings).

    Returns:
      The settings.

    References: Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization" (JMLR 2012).
    """
    if int(n) < 1:
        raise MergeInputError(f"random_search: n={n}; give at least 1 setting.")
    if not space:
        raise MergeInputError("random_search({}): give at least one hyperparameter.")
    rng = np.random.default_rng(int(seed))
    out = []
    for _ in range(int(n)):
        out.append({k: (d.sample(rng) if isinstance(d, (Uniform, LogUniform, Choice)) else d)
                    for k, d in space.items()})
    return out


@dataclasses.dataclass(frozen=True)
class SuccessiveHalving:
    """Successive halving over ``settings``: budgets are numbers of evaluation batches.

    Rung ``k`` evaluates the surviving settings on the first ``min(min_budget * eta**k, total)`` batches; the
    best ``ceil(n / eta)`` survive to the next rung; the last rung uses every batch.

    Attributes:
      settings: the candidate settings (e.g. from :func:`random_search` or :func:`grid`).
      eta: the reduction factor (at least 2).
      min_budget: batches of the first rung (at least 1).

    References: Jamieson and Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter
    Optimization" (AISTATS 2016); Li et al., "Hyperband" (JMLR 2018).
    """

    settings: tuple
    eta: int = 2
    min_budget: int = 1

    def __init__(self, settings: Sequence[Mapping[str, Any]], eta: int = 2, min_budget: int = 1):
        if int(eta) < 2:
            raise MergeInputError(f"SuccessiveHalving: eta={eta}; give an integer of at least 2.")
        if int(min_budget) < 1:
            raise MergeInputError(f"SuccessiveHalving: min_budget={min_budget}; give at least 1 batch.")
        if not settings:
            raise MergeInputError("SuccessiveHalving: no settings.")
        object.__setattr__(self, "settings", tuple(dict(s) for s in settings))
        object.__setattr__(self, "eta", int(eta))
        object.__setattr__(self, "min_budget", int(min_budget))

    def budgets(self, total: int) -> list[int]:
        """The rungs' budgets for ``total`` evaluation batches (increasing, the last one ``total``)."""
        out, b = [], self.min_budget
        while b < total:
            out.append(b)
            b *= self.eta
        return out + [total]

    def survivors(self, n: int) -> int:
        """How many of ``n`` settings go on to the next rung."""
        return max(1, math.ceil(n / self.eta))
