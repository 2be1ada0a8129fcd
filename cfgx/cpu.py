"""CPU threading: a budget of intra-op threads that holds up when processes share the cores.

OpenMP workers spin-wait for their siblings. Two processes that each size their pool from the
whole machine (torch's default) make each other's workers wait for cores the other holds: on
2 cores the digits training step did 1,022 img/s alone and 108 + 115 side by side. With one
thread each they did 519 + 519, and OMP_WAIT_POLICY=PASSIVE cost a third of the speed alone.
So each cfgx process computing on the CPU takes a share of the CPUs it may use (affinity,
cgroup quota) and re-checks that share every half second:

* every such process holds a *slot*, a file under a private per-user directory
  ($XDG_RUNTIME_DIR/cfgx/threads, else <tmp>/cfgx-<uid>/threads) that it keeps flock'ed while
  it lives; the live holders whose CPUs overlap ours split them (torchrun ranks are holders too),
  and a slot whose lock is free belongs to a dead process and is removed;
* when the process may use every online CPU, runnable tasks of other programs (the kernel's
  ``procs_running``, minus this process's own) take their cores out of the share too.

An explicit choice wins over the budget: ``cpu_threads=N``, ``OMP_NUM_THREADS`` set by the user,
or a ``torch.set_num_threads`` call (a pool that is not the size cfgx last set is left alone).
Float rounding of some CPU kernels depends on the thread count, so bit-exact comparisons between
runs need a fixed count (README, Threads). Short blocks of tiny tensors use ``torch_threads``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import math
import os
import secrets
import stat
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from cfgx.errors import CfgxError
from cfgx.store.owned import open_owned, probe_lock

CGROUP_ROOT = Path("/sys/fs/cgroup")
AUTO_MARK = "CFGX_OMP_AUTO"  # set beside OMP_NUM_THREADS when cfgx itself chose it (torchrun ranks)
CHECK_EVERY_S = 0.5
# torch's own pool size when cfgx was imported: its pick (physical cores) caps the budget, and a pool
# found at another size later was resized by the caller.
AT_IMPORT = torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave as is), restoring the caller's setting."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# ---------------------------------------------------------------- the CPUs this process may use


def affinity_cpus() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the tightest cgroup quota over this process's cgroup and its ancestors; None = none.

    v2: ``cpu.max`` ("max 100000" or "QUOTA PERIOD"); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    under the cpu controller's mount. A cgroup path seen from inside a container may not exist under
    its mount; walking up to the mount's root then finds the container's own limit.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        if hid == "0" and not controllers:
            bases = [root]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for base in bases:
            path = base / rel.lstrip("/")
            while True:
                q = _quota(path, v2=hid == "0" and not controllers)
                if q is not None:
                    limits.append(q)
                if path == base or base not in path.parents:
                    break
                path = path.parent
    return min(limits) if limits else None


def _quota(d: Path, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((d / f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return None if quota in ("max", "-1") or float(period) <= 0 else float(quota) / float(period)
    except (OSError, ValueError):
        return None


def usable_cpus(cpus: frozenset[int] | None = None, quota: float | None = None) -> int:
    """Affinity capped by the cgroup quota, rounded down (a core's fraction only throttles a spinning pool)."""
    n = len(cpus if cpus is not None else affinity_cpus())
    if quota is not None:
        n = min(n, math.floor(quota))
    return max(1, n)


def user_threads(setting: object = "auto") -> int | None:
    """The thread count the user chose (``cpu_threads`` config value, then OMP_NUM_THREADS), or None."""
    if setting not in (None, "auto"):
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise CfgxError(f"cpu_threads={setting!r}; use auto (a share of the usable CPUs) or a whole number >= 1")
        return setting
    env = os.environ.get("OMP_NUM_THREADS")
    if env and not os.environ.get(AUTO_MARK):
        with contextlib.suppress(ValueError):
            return max(1, int(env.split(",")[0]))
    return None


# ---------------------------------------------------------------- slots: cfgx processes see each other


def slot_dir() -> Path | None:
    """The private directory of this user's slots, made if missing; None when none is safe to use."""
    uid = os.getuid()
    candidates = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "cfgx" / "threads")
    candidates.append(Path(tempfile.gettempdir()) / f"cfgx-{uid}" / "threads")
    for d in candidates:
        try:
            for p in (d.parent, d):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(p, 0o700)
                st = os.lstat(p)  # a link or someone else's directory: another user could fake holders
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
                    raise PermissionError(errno.EPERM, "not a private directory", str(p))
            return d
        except OSError:
            continue
    return None


class Slot:
    """This process's flock'ed slot file; ``holders`` counts the live slots whose CPUs overlap ours."""

    def __init__(self, directory: Path, cpus: frozenset[int]) -> None:
        self.dir, self.cpus = Path(directory), cpus
        # Made under a dot name and renamed once locked: a counter never sees it unlocked and removes it.
        tmp = self.dir / f".new-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd, _ = open_owned(tmp, os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self.fd, (",".join(map(str, sorted(cpus))) + "\n").encode())
        self.path = self.dir / f"slot-{tmp.name[5:]}"
        os.rename(tmp, self.path)

    def holders(self) -> int:
        n = 1
        for name in os.listdir(self.dir):
            if name.startswith("slot-") and name != self.path.name and self._live_overlap(self.dir / name):
                n += 1
        return n

    def _live_overlap(self, path: Path) -> bool:
        probe = probe_lock(path, 65536)
        if probe is None:
            return False
        held, text = probe
        if held:  # a live process: does it share our CPUs?
            theirs = {int(c) for c in text.split(",") if c.strip().isdigit()}
            return not theirs or bool(theirs & self.cpus)
        with contextlib.suppress(OSError):  # free: its holder died
            os.unlink(path)
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---------------------------------------------------------------- other programs' load


def others_running(pool: int = 1, stat_file: Path = Path("/proc/stat"),
                   own_tasks: Path = Path("/proc/self/task")) -> int | None:
    """Runnable tasks on the machine that are not this process's threads (None where unreadable).

    Our whole ``pool`` counts as ours even when a worker was asleep at the moment of reading (the
    two files are not read at one instant): mistaking our own worker for a stranger would halve us.
    """
    try:
        running = next(int(line.split()[1]) for line in stat_file.read_text().splitlines()
                       if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    own = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(own_tasks):
            with contextlib.suppress(OSError, IndexError):
                own += (own_tasks / tid / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    return max(0, running - max(own, pool, 1))


class ThreadBudget:
    """Sizes torch's intra-op pool: ``fixed`` if the user chose, else a share of ``usable`` CPUs."""

    def __init__(self, usable: int, cpus: frozenset[int], fixed: int | None = None,
                 directory: Path | None = None, watch_load: bool = True, every_s: float = CHECK_EVERY_S) -> None:
        self.usable, self.fixed, self.every_s = usable, fixed, every_s
        self.watch_load = watch_load
        self.slot = None
        if directory is not None:
            with contextlib.suppress(OSError, CfgxError):  # no slot: this process just does not cooperate
                self.slot = Slot(directory, cpus)
        self.load = deque(maxlen=4)  # the last 2 s: shrink when others keep running, grow back once they stop
        self.prev = torch.get_num_threads()
        self.threads, self.checked = 0, 0.0

    def share(self) -> int:
        if self.fixed is not None:
            return self.fixed
        n = self.usable // (self.slot.holders() if self.slot is not None else 1)
        if self.watch_load:
            others = others_running(max(self.threads, 1))
            if others is not None:
                self.load.append(others)
                seen = sorted(self.load)  # the second highest: a task seen once (a shell, a kworker) is a blip
                n = min(n, self.usable - seen[-2 if len(seen) > 1 else -1])
        return max(1, n)

    def apply(self) -> int:
        self.checked = time.monotonic()
        n = self.share()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads = n
        return n

    def tick(self) -> None:
        """Cheap between checks; leaves alone a pool someone else has resized since."""
        if self.fixed is not None or time.monotonic() - self.checked < self.every_s:
            return
        if torch.get_num_threads() != self.threads:
            self.checked = time.monotonic()
            return
        self.apply()

    def close(self, restore: bool = True) -> None:
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        if restore and torch.get_num_threads() == self.threads:
            torch.set_num_threads(self.prev)


_active: ThreadBudget | None = None


def start_budget(setting: object = "auto") -> ThreadBudget:
    """Start (or re-apply) this process's budget; ``setting``: the ``cpu_threads`` config value."""
    global _active
    fixed = user_threads(setting)
    if fixed is None and torch.get_num_threads() not in (AT_IMPORT, _active and _active.threads):
        fixed = torch.get_num_threads()  # resized in-process by the caller: theirs to choose
    if _active is None:
        cpus = affinity_cpus()
        quota = cgroup_cpu_limit()
        every_cpu = len(cpus) >= (os.cpu_count() or len(cpus))
        usable = usable_cpus(cpus, quota)
        if "OMP_NUM_THREADS" not in os.environ:  # torch picked physical cores, not hyperthreads
            usable = min(usable, AT_IMPORT)
        _active = ThreadBudget(usable, cpus, fixed, slot_dir(), watch_load=every_cpu)
        atexit.register(stop_budget)
    _active.fixed = fixed
    _active.apply()
    return _active


def stop_budget() -> None:
    """Release the slot and give the pool back the size it had before ``start_budget``."""
    global _active
    if _active is not None:
        _active.close()
        _active = None


def tick() -> None:
    """Called in the training and sampling loops: re-checks the budget at most every half second."""
    if _active is not None:
        _active.tick()
