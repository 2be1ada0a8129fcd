"""Load a cached result, or make it once and cache it: the one shape of every cfgx cache file.

``load_or_make(path, load, make, lock=...)``: under the lock, ``path`` is read weights-only and
handed to ``load``; a missing file, or one that ``load`` turns down (returns None: made with other
options), is made by ``make`` and written atomically, so a second process waiting on the lock then
loads instead of making it again. An unreadable file is rebuilt with a warning when ``unreadable``
is given, else its error propagates; a crafted file (``UnsafeFileError``) always propagates:
refused, never rebuilt over silently.

Used by the evaluation classifier, the guidance classifier and the flow postprocessor's pairs.

A shared cache its user cannot write (``chmod a-w``, a read-only mount) still serves: entries are
replaced only by atomic renames, so reading one needs no lock; whatever must be written (a missing
entry, its lock) goes to the same place under this user's private cache (``private_path``), said
once.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cfgx.console import say
from cfgx.errors import CfgxError
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.locks import locked
from cfgx.store.safeload import UnreadableFileError, safe_load

T = TypeVar("T")
_SAID: set[Path] = set()
# What makes a cached file "unreadable" by default: broken torch files and blobs of the wrong shape.
UNREADABLE = (UnreadableFileError, KeyError, TypeError, RuntimeError)


def load_or_make(path: Path, load: Callable[[Any], T | None], make: Callable[[], tuple[T, Any]], *,
                 lock: Path | None = None, what: str = "", console=None, unreadable: str | None = None,
                 errors: tuple[type[BaseException], ...] = UNREADABLE,
                 fix: str = "delete it and re-run to rebuild it", private_if_readonly: bool = False) -> T:
    """``load(blob)`` of the cached ``path``, or the value of ``make()`` whose blob is then cached.

    ``make`` returns ``(value, blob)``: ``blob`` is what ``torch.save`` writes to ``path``.
    ``lock`` (a lock-file path; ``what`` names it in the waiting message) is held throughout;
    None when the caller already holds one. ``unreadable``: the message said before rebuilding
    a file whose loading raised one of ``errors``; None lets those errors propagate
    (``safe_load``'s message then ends with ``fix``). ``private_if_readonly`` (a cache): an entry
    is first read without the lock, and one to make in a directory this user cannot write is made
    in their private cache instead.
    """
    if lock is not None and private_if_readonly:
        for p in (Path(path), private_path(Path(path))):
            value = _load_quietly(p, load, errors)
            if value is not None:
                return value
        path, lock = writable_path(Path(path)), writable_path(Path(lock))
    if lock is not None:
        with locked(lock, what, console):
            return load_or_make(path, load, make, console=console, unreadable=unreadable, errors=errors, fix=fix)
    path = Path(path)
    if path.is_file():
        value: T | None
        if unreadable is None:
            value = load(safe_load(path, fix=fix))
        else:
            try:
                value = load(safe_load(path, fix=fix))
            except errors:
                say(console, unreadable)
                value = None
        if value is not None:
            return value
    value, blob = make()
    atomic_torch_save(path, blob)
    return value


def _load_quietly(path: Path, load: Callable[[Any], T | None], errors: tuple[type[BaseException], ...]) -> T | None:
    """``load`` of ``path`` without a lock, or None (missing, or damaged: the locked pass reports it)."""
    if not path.is_file():
        return None
    try:
        return load(safe_load(path))
    except errors:
        return None


def writable(path: Path) -> bool:
    """Whether this user can create ``path`` (its nearest existing directory is writable)."""
    d = Path(path).parent
    while not d.exists() and d != d.parent:
        d = d.parent
    return os.access(d, os.W_OK | os.X_OK)


def private_root() -> Path:
    """This user's own cache for what a read-only cache cannot take: ~/.cache/cfgx, else <tmp>/cfgx-<uid>."""
    home = Path.home() / ".cache" / "cfgx" / "private"
    return home if writable(home / "x") else Path(tempfile.gettempdir()) / f"cfgx-{os.getuid()}" / "cache"


def private_path(path: Path) -> Path:
    """Where ``path`` of a read-only cache lives in the private cache: its absolute path mirrored."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return private_root() / path.relative_to(path.anchor)


def writable_path(path: Path) -> Path:
    """``path``, or its ``private_path`` (said once per process) when this user cannot write there."""
    path = Path(path).expanduser()
    if writable(path):
        return path
    target = private_path(path)
    if not writable(target):
        raise CfgxError(f"cannot write {path} (read-only) nor {target}; set CFGX_CACHE to a writable directory")
    if private_root() not in _SAID:
        _SAID.add(private_root())
        print(f"cfgx: {path.parent} is read-only; what cfgx must cache goes to {private_root()}", file=sys.stderr)
    return target
