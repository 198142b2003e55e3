"""Errors and warnings of jmerge's core.

Every error names the leaf path (or YAML location) that is wrong and says what to do about it.

References: none (infrastructure).
"""

from __future__ import annotations

__all__ = ["MergeInputError", "NonFloatLeavesWarning", "OptimizerStateWarning"]


class MergeInputError(ValueError):
    """Raised for inputs a merge cannot use; the message names the leaf path and the fix.

    References: none (infrastructure).
    """


class NonFloatLeavesWarning(UserWarning):
    """Integer, boolean or PRNG-key leaves were taken from the base unchanged (not merged).

    References: none (infrastructure).
    """


class OptimizerStateWarning(UserWarning):
    """The parameter tree contains optimizer state (optax or Flax NNX), which is rarely meant to be merged.

    References: none (infrastructure).
    """
