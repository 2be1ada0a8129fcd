"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader (or a crash, or a full disk) never sees a half-written file, and a disk error
is one line naming the file. Every file cfgx keeps goes through here.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cfgx.errors import DISK_ERRNOS, disk_error


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (or a crash) never sees a half-written file.

    The file gets the mode a plain ``open`` would give (0666 minus the umask), not
    mkstemp's 0600, so colleagues sharing a filesystem can read results.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_savefig(fig, path: Path, **kwargs: Any) -> None:
    """``fig.savefig`` through an atomic write: a full disk never leaves a truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(grid: torch.Tensor, path: Path) -> None:
    """``torchvision.utils.save_image`` through an atomic write."""
    import torchvision  # why: torchvision import is slow and only image grids need it

    buf = io.BytesIO()
    torchvision.utils.save_image(grid, buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


class AppendLog:
    """A line log opened for appending whose disk errors name the file (``write``/``flush``/``close``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "a")
        except OSError as e:
            raise disk_error(self.path, e) from None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise disk_error(self.path, e) from None

    def write(self, text: str) -> None:
        self._guard(self._f.write, text)

    def flush(self) -> None:
        self._guard(self._f.flush)

    def close(self) -> None:
        if not self._f.closed:
            self._guard(self._f.close)
