"""Errors of checkpoint reading and writing; every message names the file (and tensor) and the fix.

References: none (infrastructure).
"""

from __future__ import annotations

from ..core.errors import MergeInputError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointFormatError", "OutputExistsError"]


class CheckpointError(MergeInputError):
    """A checkpoint cannot be read or written; the message names the file and the tensor.

    References: none (infrastructure).
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint (file, directory, index or tensor) does not exist.

    References: none (infrastructure).
    """


class CheckpointFormatError(CheckpointError):
    """The checkpoint exists but is not readable as that format (corrupt header, unsupported dtype ...).

    References: none (infrastructure).
    """


class OutputExistsError(CheckpointError, FileExistsError):
    """The output path already exists and ``overwrite`` was not given.

    References: none (infrastructure).
    """
