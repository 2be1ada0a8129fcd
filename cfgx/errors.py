"""The one exception type the CLI turns into a single clean line, and the disk errors it becomes.

Anything a user can get wrong (a config value, a path, a missing file) raises
``CfgxError`` with a message that names the problem *and* the fix; the CLI
prints it on one line and exits non-zero without a traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class CfgxError(Exception):
    """A user-facing error: message is one line naming the problem and the fix."""

    exit_code = 2


# Errors of the filesystem rather than of cfgx: a full disk, a quota, permissions, a read-only mount.
# EFBIG: the process's file-size limit (ulimit -f; Python ignores SIGXFSZ, so the write fails instead).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def disk_error(path: Path | str | None, e: OSError, verb: str = "write") -> CfgxError:
    """One line naming the path and the cause, for an OSError from writing (``verb``) ``path``."""
    where = path or e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or point paths.runs / CFGX_CACHE at another disk) and re-run to resume"
    elif e.errno == errno.EFBIG:
        fix = "the file outgrew this process's file-size limit; raise it (ulimit -f unlimited) and re-run to resume"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable, or point paths.runs / CFGX_CACHE at a folder you can write"
    else:
        fix = "check the disk and re-run to resume"
    return CfgxError(f"cannot {verb} {where} ({e.strerror or os.strerror(e.errno or 0)}); {fix}")
