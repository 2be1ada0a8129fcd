"""No stale target, no double start: commands without run= take the newest *finished* run, and a second
identical 'cfgx train' is refused before its minutes of pre-training checks (issue L, item 5)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from conftest import TINY, private_copy

from cfgx.cli import main
from cfgx.config import compose, config_hash
from cfgx.errors import CfgxError
from cfgx.store.locks import FileLock, acquire


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # errors raised inside Hydra's task leave through sys.exit
        return int(e.code or 0)


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cfgx: error: ") and "Traceback" not in err, err
    return lines[0]


def unfinished_copy(run: Path, root: Path, name: str = "29990101-000000") -> Path:
    """A copy of ``run`` under ``root/digits`` marked as a crash leaves it, newer than every run there."""
    dst = root / "digits" / name
    shutil.copytree(run, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["train_finished"] = False
    (dst / "meta.json").write_text(json.dumps(meta))
    later = time.time() + 60
    os.utime(dst / "meta.json", (later, later))
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sweep_without_run_takes_the_newest_finished_run_and_names_it(tiny_run, tmp_path_factory, workdir, capsys):
    finished = private_copy(tiny_run, tmp_path_factory, "targets")
    root = finished.parents[1]
    crashed = unfinished_copy(tiny_run, root)
    before = snapshot(crashed)
    assert run_main(["sweep", "guidance=1", f"paths.runs={root}"]) == 0
    out = capsys.readouterr().out
    assert f"sweeping the newest finished run {finished} (pass run=PATH for another)" in out
    assert "(checkpoint step 12)" in out and str(crashed) not in out.replace("\n", "")
    assert snapshot(crashed) == before
    # run=PATH naming the unfinished run still evaluates it, with the note it always had.
    from cfgx.cli.preflight import training_note

    assert "training of" in training_note(crashed, 12) and "unfinished" in training_note(crashed, 12)


def test_only_unfinished_runs_is_one_line_with_the_fix(tiny_run, workdir, capsys):
    root = workdir / "onlycrashed"
    crashed = unfinished_copy(tiny_run, root)
    before = snapshot(crashed)
    for argv in (["sweep", "guidance=1"], ["export"], ["postprocess"]):
        assert run_main([*argv, f"paths.runs={root}"]) == 2, argv
        line = error_line(capsys.readouterr().err)
        assert f"no finished run under {root}/" in line and f"the newest, {crashed}" in line, line
        assert "re-running the same 'cfgx train'" in line and f"run={crashed}" in line, line
    # Being trained right now: the line names the trainer instead.
    lock = acquire(crashed / ".train.lock", wait=False)
    try:
        assert run_main(["sweep", "guidance=1", f"paths.runs={root}"]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"is still being trained (pid {os.getpid()} on " in line and f"run={crashed}" in line, line
    finally:
        lock.release()
    assert snapshot(crashed) == before


def test_second_identical_train_is_refused_before_the_pre_training_checks(workdir, capsys, monkeypatch):
    import cfgx.cli.train as train_cli

    root = workdir / "runs2"
    h = config_hash(compose([*TINY, f"paths.runs={root}"]))
    other = FileLock(root / "digits" / f".train-{h}.lock")  # as another process's 'cfgx train' holds it
    assert other.acquire(blocking=False)

    def too_late(*a, **k):
        raise AssertionError("the pre-training checks ran although an identical train holds the start lock")

    monkeypatch.setattr(train_cli, "check_before_training", too_late)
    try:
        t0 = time.perf_counter()
        assert run_main(["train", *TINY, f"paths.runs={root}"]) == 2
        seconds = time.perf_counter() - t0
        line = error_line(capsys.readouterr().err)
        assert f"an identical 'cfgx train' is already running (pid {os.getpid()} on " in line, line
        assert "train.resume=false" in line and seconds < 20
        assert [p.name for p in (root / "digits").iterdir()] == [f".train-{h}.lock"]  # no run dir made
        assert other.path.read_text().startswith(f"pid {os.getpid()} on ")  # the holder's stamp untouched
    finally:
        other.release()


def test_a_train_failing_its_checks_leaves_no_lock_and_no_folder(workdir, capsys, monkeypatch):
    import cfgx.cli.train as train_cli

    def refuse(*a, **k):
        raise CfgxError("the checks refused it")

    monkeypatch.setattr(train_cli, "check_before_training", refuse)
    root = workdir / "fresh" / "runs"
    assert run_main(["train", *TINY, f"paths.runs={root}"]) == 2
    assert "the checks refused it" in error_line(capsys.readouterr().err)
    assert not root.exists()


def test_resume_false_asks_for_a_separate_run_and_takes_no_start_lock(workdir):
    import cfgx.cli.train as train_cli

    cfg = compose([*TINY, "train.resume=false", f"paths.runs={workdir / 'r'}"])
    assert train_cli._start_lock(cfg, "digits", config_hash(cfg)) is None and not (workdir / "r").exists()
    cfg = compose([*TINY, f"paths.runs={workdir / 'r'}"])
    h = config_hash(cfg)
    lock = train_cli._start_lock(cfg, "digits", h)
    try:
        assert lock is not None and lock.path == workdir / "r" / "digits" / f".train-{h}.lock"
    finally:
        lock.release()
    assert not lock.path.exists()
