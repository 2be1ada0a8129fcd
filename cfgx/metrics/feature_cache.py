"""On-disk cache for feature tensors and statistics (e.g. real-data Inception stats).

Entries are keyed by a hash of everything the features depend on (dataset,
split, resolution, extractor, weights hash, pipeline version, ...), so changing
any of them misses the cache instead of silently reusing stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cfgx.errors import CfgxError
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.cached import private_path, writable_path
from cfgx.store.safeload import UnreadableFileError, safe_load


def default_cache_root() -> Path:
    """``$CFGX_CACHE`` if set, else ``~/.cache/cfgx``."""
    env = os.environ.get("CFGX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cfgx"


class FeatureCache:
    """A directory of ``<key>.pt`` files, each a dict of tensors, written atomically."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    @staticmethod
    def key(**parts: Any) -> str:
        """A stable 24-hex-char key for ``parts`` (order-independent; values via ``str`` if not JSON)."""
        blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def lock_path(self, key: str) -> Path:
        """The entry's lock: beside it, or in the private cache when this directory is read-only."""
        return writable_path(self.root / f".{key}.lock")

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None on a miss. An unreadable entry counts as a miss.

        A read-only cache's entry is read as is (no lock needed: entries are replaced by renames);
        a missing one is looked up in the private cache, where ``save`` then puts it.
        """
        p = self.path(key)
        if not p.is_file():
            p = private_path(p)
        if not p.is_file():
            return None
        try:
            # A cache directory is not trusted enough to unpickle code from: a crafted entry
            # (UnsafeFileError) is an error, not a miss to overwrite quietly.
            data = safe_load(p)
        except UnreadableFileError as exc:  # any corruption means "recompute"
            warnings.warn(f"ignoring unreadable feature cache entry {p}: {exc}", stacklevel=2)
            return None
        if not isinstance(data, dict):
            return None
        return data

    def save(self, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Store ``tensors`` under ``key``; a crash mid-write never leaves a partial entry."""
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CfgxError(
                f"feature cache stores tensors only, got non-tensor values for {bad}: convert them"
            )
        target = writable_path(self.path(key))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfgxError(
                f"cannot create feature cache directory {target.parent} ({exc.strerror}): set CFGX_CACHE to a "
                "writable directory"
            ) from exc
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        # Same-directory rename: readers see the old entry or the whole new one, with the umask's mode.
        atomic_torch_save(target, payload)
        return target
