"""Compatibility alias: the Pallas kernels live in :mod:`jmerge.kernels`.

References: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
"""

from jmerge.kernels import *  # noqa: F401,F403
from jmerge.kernels import __all__  # noqa: F401
