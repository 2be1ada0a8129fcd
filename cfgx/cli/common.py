"""What every command shares: the console it prints on, and user errors as one line on stderr."""

from __future__ import annotations

import sys
import time

from cfgx.errors import DISK_ERRNOS, CfgxError, disk_error


def console():
    """The rich console the commands print on."""
    # why: rich.console costs ~50 ms to import and 'cfgx --help' loads this module
    from rich.console import Console

    return Console(highlight=False)


def report(e: CfgxError) -> None:
    """Print the one-line error; under torchrun, once.

    Most errors happen alike on every rank. Rank 0 reports at once; the others wait
    briefly, and torchrun stops them when rank 0 exits, so the line appears once. An
    error only one rank saw (its GPU, its files) still gets printed after the wait.
    """
    # why: cfgx.distributed imports torch, which 'cfgx --help' must not load
    from cfgx.distributed import rank

    r = rank()
    if r and getattr(e, "rank0_only", False):
        return
    if r:
        time.sleep(3)
    print(f"cfgx: error: {f'[rank {r}] ' if r else ''}{e}", file=sys.stderr, flush=True)


def user_error(e: BaseException) -> CfgxError:
    """``e`` as the one line a user sees; errors that are not the user's (bugs) are re-raised."""
    if isinstance(e, CfgxError):
        return e
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return disk_error(None, e, verb="access")
    raise e


def fail(e: CfgxError) -> None:
    report(e)
    sys.exit(e.exit_code)
