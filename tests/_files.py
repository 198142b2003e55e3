"""File-level helpers shared by the checkpoint tests."""

import hashlib
import os

import numpy as np


def same_bytes(a, b):
    """Same dtype, shape and bytes (bit-exact, NaN payloads included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def hash_dir(d):
    """SHA-256 over every file name and content under ``d`` (to prove inputs are unchanged)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()
