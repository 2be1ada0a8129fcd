"""Run ``cfgx`` commands in forked children that a test can SIGKILL at any moment or give a full disk.

A forkserver with cfgx and torch preloaded forks each child in milliseconds, so a
kill lands in the command's work, not in Python's start-up, and many kills fit in a
test's time budget. The forkserver has never run a torch thread pool, so its forks
are safe (forking the test process itself, after torch ran, is not).
"""

from __future__ import annotations

import builtins
import errno
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

_CTX = None


def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "cfgx.cli", "cfgx.cli.train", "cfgx.cli.sweep", "cfgx.train",
                                     "cfgx.sweep.loop", "cfgx.postprocess"])
    return _CTX


class _FullDisk:
    """A file whose writes fail with ENOSPC once a shared byte budget is spent (what a full disk does)."""

    def __init__(self, f, budget: list[int]) -> None:
        self._f, self._budget = f, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk_after(nbytes: int, under: Path) -> None:
    """From now on, in this process, writes to files under ``under`` fail with ENOSPC after ``nbytes``."""
    budget, root = [nbytes], str(Path(under).resolve())
    real_open, real_fdopen = builtins.open, os.fdopen

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        return _FullDisk(f, budget) if os.readlink(f"/proc/self/fd/{fd}").startswith(root) else f

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        hit = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(root)
        return _FullDisk(f, budget) if hit and any(c in mode for c in "wax+") else f

    os.fdopen, builtins.open = fdopen, open_


def _child(argv: list[str], cwd: str, cache: str, full_after: int | None = None, fsize: int | None = None) -> None:
    os.chdir(cwd)
    os.environ["CFGX_CACHE"] = cache
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(os.open(os.path.join(cwd, "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    if full_after is not None:
        fill_disk_after(full_after, Path(cwd) / "runs")
    if fsize is not None:  # what 'ulimit -f' does: a write past fsize bytes fails with EFBIG (Python ignores SIGXFSZ)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    import torch

    torch.set_num_threads(1)  # every run of a comparison uses the same reduction order
    from cfgx.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    os._exit(code)


def run(argv: list[str], cwd: Path, cache: Path, kill_after: float | None = None,
        full_after: int | None = None, fsize: int | None = None) -> tuple[int | None, float]:
    """Run ``cfgx argv`` in ``cwd`` (stderr to ``cwd/stderr.txt``); with ``kill_after`` SIGKILL it then, with
    ``full_after`` the disk under ``cwd/runs`` fills after that many bytes, with ``fsize`` no file may grow past
    that many bytes (``ulimit -f``). Returns (exit code, -9 if
    killed; seconds)."""
    p = context().Process(target=_child, args=(argv, str(cwd), str(cache), full_after, fsize))
    t0 = time.perf_counter()
    p.start()
    p.join(kill_after)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode, time.perf_counter() - t0


def kill_until_done(argv: list[str], cwd: Path, cache: Path, seconds: float, seed: int, kills: int = 5,
                    rerun: list[str] | None = None, after_kill=None) -> int:
    """SIGKILL ``argv`` ``kills`` times at seeded random moments (each re-run resumes), then run it to the end.

    ``seconds`` is an undisturbed run's duration; ``after_kill()`` may return another argv
    to re-run with (e.g. a sweep once training is done). Returns how many kills landed.
    """
    rng = random.Random(seed)
    landed, attempts = 0, 0
    while landed < kills and attempts < 4 * kills:
        attempts += 1
        code, _ = run(argv, cwd, cache, kill_after=rng.uniform(0.02, 0.15) * seconds)
        if code == -9:
            landed += 1
        elif code != 0:
            raise AssertionError(f"cfgx {' '.join(argv)} exited {code} after a kill")
        else:
            break  # finished before the kill: nothing left to interrupt
        argv = (after_kill() if after_kill else None) or argv
    code, _ = run(argv, cwd, cache)
    assert code == 0, f"re-run of cfgx {' '.join(argv)} exited {code}"
    return landed
