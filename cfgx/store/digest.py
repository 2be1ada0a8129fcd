"""File digests: the sha256 that names weights files in rows, cache keys and run dirs.

One reader for every caller (Inception, DINOv2, torchvision classifiers, imported models, exports,
``cfgx prepare``), so a file hashed in two places always gives the same digest.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO


def sha256_of_file(f: BinaryIO) -> str:
    """Hex sha256 of an open binary file from its current position, read in 1 MiB blocks (any size)."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at ``path``."""
    with open(path, "rb") as f:
        return sha256_of_file(f)
