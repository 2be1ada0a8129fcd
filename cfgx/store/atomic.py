"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader (or a crash, or a full disk) never sees a half-written file, and a disk error
is one line naming the file. Every file cfgx keeps goes through here.

No write follows a symlink: a run dir may come from anywhere (a download, a colleague's copy), so
a link planted at one of its paths must never make cfgx write outside it. Atomic writes create
their temporary file with O_CREAT|O_EXCL|O_NOFOLLOW (mkstemp) and ``os.replace`` it over the
destination, which replaces a link there rather than its target; files written in place (locks,
logs: ``open_owned``) are opened with O_NOFOLLOW and must be regular files with one link, else
one line naming the path and the fix (delete it).
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cfgx.errors import DISK_ERRNOS, disk_error
from cfgx.store.owned import open_owned, unsafe_path_error


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
        if isinstance(e, OSError) and e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise unsafe_path_error(path, "is a folder, not a file") from None
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
    """A line log opened for appending whose disk errors name the file (``write``/``flush``/``close``).

    Opened through ``open_owned``: a symlink or a non-regular file at ``path`` is refused in one line.
    ``new``: the file was empty when opened (a header goes first).
    """

    def __init__(self, path: Path, newline: str | None = None) -> None:
        self.path = Path(path)
        try:
            fd, _ = open_owned(self.path, os.O_WRONLY | os.O_APPEND)
            self.new = os.fstat(fd).st_size == 0
            self._f = os.fdopen(fd, "a", newline=newline)
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
