"""The package version.

References: none.
"""

__version__ = "0.1.0"
