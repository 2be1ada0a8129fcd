"""No write follows a symlink, and the cache belongs to whoever runs cfgx (issue 18, items 2 and 3).

A copied or downloaded run dir is untrusted: a symlink planted at any lock, log or output path that
points outside it must leave the outside file byte-identical. Files written in place (locks, logs) are
refused in one line (exit 2) naming the path and the fix; files written atomically replace the link.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import private_copy

from cfgx.cli import main
from cfgx.errors import CfgxError
from cfgx.store.locks import FileLock, holder, run_lock

SECRET = b"precious user data\n"


@pytest.fixture
def outside(tmp_path) -> Path:
    f = tmp_path / "outside" / "precious.txt"
    f.parent.mkdir()
    f.write_bytes(SECRET)
    return f


@pytest.fixture
def copy(tiny_run, tmp_path_factory) -> Path:
    return private_copy(tiny_run, tmp_path_factory, "symlinks")


def plant(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def refused_in_one_line(args: list[str], capsys, needle: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "delete it" in err, err


def test_lock_file_helpers_refuse_links_and_non_regular_files(tmp_path, outside):
    link = tmp_path / ".x.lock"
    link.symlink_to(outside)
    with pytest.raises(CfgxError, match="is a symlink.*delete it"):
        FileLock(link).acquire()
    assert holder(link) is None  # never read through the link either
    fifo = tmp_path / ".fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(CfgxError, match="not a regular file"):
        FileLock(fifo).acquire()  # and never hangs on it
    assert holder(fifo) is None
    hard = tmp_path / ".hard.lock"
    os.link(outside, hard)
    with pytest.raises(CfgxError, match="hard links"):
        FileLock(hard).acquire()
    (tmp_path / ".dir.lock").mkdir()
    with pytest.raises(CfgxError, match="not a regular file"):
        FileLock(tmp_path / ".dir.lock").acquire()
    assert outside.read_bytes() == SECRET
    # A stale lock file cfgx left (a regular file of its own) is still taken over.
    stale = tmp_path / ".stale.lock"
    stale.write_text("pid 1 on gone since then\n")
    lock = FileLock(stale)
    assert lock.acquire(blocking=False)
    lock.release()
    assert not stale.exists()


def test_run_lock_through_a_symlink_is_refused(copy, outside, capsys):
    plant(copy / ".train.lock", outside)
    with pytest.raises(CfgxError, match=r"\.train\.lock is a symlink"):
        run_lock(copy)
    assert main(["sweep", f"run={copy}"]) == 0  # the sweep only asks who holds it: never through the link
    assert outside.read_bytes() == SECRET


def test_tables_lock_symlink(copy, outside, capsys):
    plant(copy / "sweep" / ".tables.lock", outside)
    refused_in_one_line(["sweep", f"run={copy}"], capsys, ".tables.lock is a symlink")
    assert outside.read_bytes() == SECRET


def test_row_lock_symlink(copy, outside, capsys):
    rows = copy / "sweep" / "rows"
    for row in rows.glob("*.json"):  # the lock of a scale is named after its row without the metrics part
        plant(rows / f".{re.sub(r'-m[0-9a-f]+(?=-s)', '', row.stem)}.lock", outside)
    refused_in_one_line(["sweep", f"run={copy}"], capsys, ".lock is a symlink")
    assert outside.read_bytes() == SECRET


def test_cache_lock_symlink(copy, outside, cache_dir, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    entries = list(cache.rglob("*.pt"))
    for entry in entries:
        plant(entry.parent / f".{entry.stem}.lock", outside)
    monkeypatch.setenv("CFGX_CACHE", str(cache))
    # Entries that exist are read without their lock (they are only ever replaced by renames): the links stay untouched.
    assert main(["sweep", f"run={copy}", "guidance=2", "eval.num_samples=20"]) == 0, capsys.readouterr().err
    assert outside.read_bytes() == SECRET
    # An entry that must be built takes its lock: a planted link there is refused.
    for entry in entries:
        entry.unlink()
    refused_in_one_line(["sweep", f"run={copy}", "guidance=2", "eval.num_samples=20", "eval.overwrite=true"], capsys,
                        ".lock is a symlink")
    assert outside.read_bytes() == SECRET


def test_csv_logger_logs_through_a_symlink_are_refused(copy, outside, capsys):
    plant(copy / "logs" / "csv" / "metrics.csv", outside)
    assert main(["sweep", f"run={copy}", "logger=csv"]) == 0  # a failing logger is a warning; the sweep goes on
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "metrics.csv is a symlink" in ln]
    assert len(warned) == 1 and "delete it" in warned[0], warned
    assert outside.read_bytes() == SECRET


def test_train_log_through_a_symlink_is_refused(copy, outside):
    from omegaconf import OmegaConf

    from cfgx.data import build_dataset
    from cfgx.train import train

    plant(copy / "train_log.jsonl", outside)
    cfg = OmegaConf.create(yaml.safe_load((copy / "config.yaml").read_text()))
    with pytest.raises(CfgxError, match=r"train_log\.jsonl is a symlink.*delete it"):
        train(cfg, build_dataset(cfg.dataset), copy, torch.device("cpu"))
    assert outside.read_bytes() == SECRET


def test_outputs_replace_a_symlink_never_write_through_it(copy, outside):
    plant(copy / "metrics.csv", outside)
    # a row of the sweep below (the session run also holds rows other tests added at other sizes)
    row = sorted((copy / "sweep" / "rows").glob("cfg-none-*-n40-*.json"))[0]
    plant(row, outside)
    assert main(["sweep", f"run={copy}"]) == 0
    assert outside.read_bytes() == SECRET
    for p in (copy / "metrics.csv", row):  # rewritten as the run's own regular files
        assert p.is_file() and not p.is_symlink(), p


def test_a_runs_config_does_not_pick_the_cache(copy, cache_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    cfg_path = copy / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["paths"]["cache"] = str(elsewhere)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert os.environ["CFGX_CACHE"] == str(cache_dir)
    before = sorted(p.name for p in cache_dir.rglob("*"))
    assert main(["sweep", f"run={copy}", "guidance=2", "eval.num_samples=20"]) == 0
    assert not elsewhere.exists()
    assert before and sorted(p.name for p in cache_dir.rglob("*")) == before  # every entry read from $CFGX_CACHE
