"""Files cfgx writes in place (locks, logs): opened without following a symlink, regular and singly linked.

A run dir may come from anywhere (a download, a colleague's copy), so a link planted at one of its
paths must never make cfgx write outside it: ``open_owned`` opens with O_NOFOLLOW (and O_NONBLOCK,
so a planted FIFO cannot hang it) and refuses, in one line naming the path and the fix, a symlink,
anything but a regular file, and a regular file with other hard links. Kept free of torch: the
lock module (and so ``cfgx --help``-time code) uses it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from cfgx.errors import CfgxError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO must not hang the open


def unsafe_path_error(path: Path, what: str) -> CfgxError:
    return CfgxError(f"{path} {what}; cfgx never writes through it (it may point outside the run dir or cache): "
                     "delete it and re-run")


def open_owned(path: Path, flags: int, mode: int = 0o666) -> tuple[int, bool]:
    """``(fd, created)``: ``path`` opened with ``flags`` (plus O_CREAT) without following a symlink.

    Refused with one line (``CfgxError``) when ``path`` is a symlink, not a regular file, or a
    regular file with other hard links (writing it would change a file elsewhere): the only files
    cfgx writes in place are ones that this path alone names. ``created``: this call made the file.
    """
    path = Path(path)
    base = flags | NOFOLLOW | NONBLOCK | os.O_CLOEXEC
    for _ in range(100):  # a file unlinked between the two opens (a lock released meanwhile): try again
        try:
            return _checked(path, os.open(path, base | os.O_CREAT | os.O_EXCL, mode)), True
        except FileExistsError:
            pass
        except OSError as e:
            raise _open_error(path, e) from None
        try:
            return _checked(path, os.open(path, base)), False
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _open_error(path, e) from None
    raise CfgxError(f"{path} keeps appearing and disappearing; check what else writes there and re-run")


def _open_error(path: Path, e: OSError) -> BaseException:
    if os.path.islink(path):  # ELOOP (EMLINK on BSD) from O_NOFOLLOW
        return unsafe_path_error(path, f"is a symlink (to {os.readlink(path)})")
    if e.errno in (errno.EISDIR, errno.ENXIO, errno.ELOOP):
        return unsafe_path_error(path, "is not a regular file")
    return e


def _checked(path: Path, fd: int) -> int:
    st = os.fstat(fd)
    why = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"has {st.st_nlink} hard links" if st.st_nlink > 1 else None)
    if why is not None:
        os.close(fd)
        raise unsafe_path_error(path, why)
    return fd


def probe_lock(path: Path, nbytes: int) -> tuple[bool, str] | None:
    """Whether another process holds the flock at ``path``, and (if so) the first ``nbytes`` of its stamp.

    None when there is no regular file to probe (missing, a link, a FIFO): never opened through a link,
    never blocking. A free lock's file is a leftover of a holder that died (the kernel dropped its lock).
    """
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, os.read(fd, nbytes).decode(errors="replace")
        return False, ""
    finally:
        os.close(fd)
