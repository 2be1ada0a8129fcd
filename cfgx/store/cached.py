"""Load a cached result, or make it once and cache it: the one shape of every cfgx cache file.

``load_or_make(path, load, make, lock=...)``: under the lock, ``path`` is read weights-only and
handed to ``load``; a missing file, or one that ``load`` turns down (returns None: made with other
options), is made by ``make`` and written atomically, so a second process waiting on the lock then
loads instead of making it again. An unreadable file is rebuilt with a warning when ``unreadable``
is given, else its error propagates; a crafted file (``UnsafeFileError``) always propagates:
refused, never rebuilt over silently.

Used by the evaluation classifier, the guidance classifier and the flow postprocessor's pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cfgx.console import say
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.locks import locked
from cfgx.store.safeload import UnreadableFileError, safe_load

T = TypeVar("T")
# What makes a cached file "unreadable" by default: broken torch files and blobs of the wrong shape.
UNREADABLE = (UnreadableFileError, KeyError, TypeError, RuntimeError)


def load_or_make(path: Path, load: Callable[[Any], T | None], make: Callable[[], tuple[T, Any]], *,
                 lock: Path | None = None, what: str = "", console=None, unreadable: str | None = None,
                 errors: tuple[type[BaseException], ...] = UNREADABLE,
                 fix: str = "delete it and re-run to rebuild it") -> T:
    """``load(blob)`` of the cached ``path``, or the value of ``make()`` whose blob is then cached.

    ``make`` returns ``(value, blob)``: ``blob`` is what ``torch.save`` writes to ``path``.
    ``lock`` (a lock-file path; ``what`` names it in the waiting message) is held throughout;
    None when the caller already holds one. ``unreadable``: the message said before rebuilding
    a file whose loading raised one of ``errors``; None lets those errors propagate
    (``safe_load``'s message then ends with ``fix``).
    """
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
