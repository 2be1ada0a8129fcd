"""Advisory locks on run dirs and cache entries: ``fcntl.flock`` on a PID-stamped lock file.

flock is released by the kernel when its holder dies, SIGKILL included, so a lock
file left behind by a killed process is stale by construction: the next process
locks it and takes over (stale-lock recovery needs no guessing about whether a PID
is alive, which a PID on another host would not even allow). The file's content,
"pid N on HOST since TIME", is only for messages. Holders unlink the file on release;
an acquirer that finds its inode unlinked meanwhile retries on the new file.

A lock file is opened without following a symlink and must be a regular file with one link
(``open_owned``); the stamp is written only once the lock is held. A link planted at a lock path
(a downloaded run dir) is refused in one line, never written through.

Locks are held per process and re-entrant: asking again for a lock this process
already holds returns the same handle, so an error path that skipped a release can
never deadlock the process against itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cfgx.console import say
from cfgx.errors import CfgxError, disk_error
from cfgx.store.owned import open_owned, probe_lock

_HELD: dict[str, FileLock] = {}


class FileLock:
    """One lock file; ``acquire`` returns False (non-blocking) when another process holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, _ = open_owned(self.path, os.O_RDWR)  # a symlink or non-regular file there: one line
            except OSError as e:
                raise disk_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                st = os.fstat(fd)
                same = os.lstat(self.path).st_ino == st.st_ino and st.st_nlink == 1
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it between our open and flock (or it was swapped,
                # or hard-linked meanwhile): lock the new one, which open_owned checks again
                os.close(fd)
                continue
            stamp = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            try:
                os.ftruncate(fd, 0)
                os.write(fd, stamp.encode())
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # the stamp is informative; the lock holds
                    os.close(fd)
                    raise disk_error(self.path, e) from None
            self.fd = fd
            return True

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # before unlocking, so a waiter re-checks the inode and never holds a ghost
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        _HELD.pop(str(self.path), None)


def holder(path: Path) -> str | None:
    """Who holds the lock at ``path`` ("pid N on HOST since T"), or None when nobody does (or it is stale)."""
    probe = probe_lock(path, 200)
    if probe is None or not probe[0]:
        return None  # no lock file, or a stale one left by a killed holder
    return probe[1].strip() or "another process"


def acquire(path: Path, wait: bool = True, what: str = "", console=None) -> FileLock | None:
    """The lock at ``path``; waits (saying so) when ``wait``, else returns None if another process holds it."""
    key = str(Path(path))
    if key in _HELD:
        return _HELD[key]
    lock = FileLock(Path(path))
    if not lock.acquire(blocking=False):
        if not wait:
            return None
        say(console, f"waiting for {what or path}: locked by {holder(Path(path)) or 'another process'}")
        lock.acquire(blocking=True)
    _HELD[key] = lock
    return lock


@contextmanager
def locked(path: Path, what: str = "", console=None) -> Iterator[FileLock]:
    """Hold the lock at ``path`` for the block, waiting for another holder first."""
    lock = acquire(path, True, what, console)
    assert lock is not None
    try:
        yield lock
    finally:
        lock.release()


def release_all(under: Path) -> None:
    """Release every lock this process holds below ``under`` (after an error cut a loop short)."""
    root = str(Path(under)) + os.sep
    for key in [k for k in _HELD if k.startswith(root)]:
        _HELD[key].release()


def run_lock(run_dir: Path) -> FileLock:
    """The training lock of a run dir; a one-line error naming the holder when another process trains it."""
    path = Path(run_dir) / ".train.lock"
    lock = acquire(path, wait=False)
    if lock is None:
        raise CfgxError(f"{run_dir} is being trained by {holder(path) or 'another process'}; wait for it to "
                        "finish (its sweep follows), or pass train.resume=false to train a separate run")
    return lock
