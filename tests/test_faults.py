"""Fault injection: crafted files, bad inputs, full disks, locks and SIGKILLs.

What a lab hits in practice: run dirs shared on group filesystems (so loaded files are
untrusted), typos, disks that fill up, two people starting the same job, and jobs killed
at random moments. Every case must end in one clean line or in a result bit-identical
to an undisturbed run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from cfgx.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


class Payload:
    """A pickle that runs a shell command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, real: dict | None = None) -> None:
    blob = dict(real or {})
    blob["step"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "runs" / "digits" / tiny_run.name
    shutil.copytree(tiny_run, dst)
    return dst


# ---------------------------------------------------------------- crafted pickles


def test_crafted_checkpoint_is_refused_without_running_its_payload(run_copy, workdir, capsys):
    marker = workdir / "PWNED"
    ckpt = run_copy / "checkpoints" / "last.pt"
    plant(ckpt, marker, torch.load(ckpt, weights_only=True))
    before = snapshot(run_copy)
    assert main(["sweep", "guidance=1", f"run={run_copy}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refusing to load" in line and str(ckpt) in line
    assert not marker.exists()
    assert snapshot(run_copy) == before
    # Resuming training from it is refused the same way (train reads the checkpoint too).
    meta = (run_copy / "meta.json").read_text().replace('"train_finished": true', '"train_finished": false')
    (run_copy / "meta.json").write_text(meta)
    with pytest.raises(SystemExit) as ex:
        main(["train", f"run={run_copy}", *overrides_of(run_copy)])
    assert ex.value.code == 2 and not marker.exists()
    assert "refusing to load" in one_error_line(capsys.readouterr().err)


def overrides_of(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(run / "overrides.yaml")]


@pytest.mark.parametrize("which", ["features", "guidance_classifier"])
def test_crafted_cache_files_are_refused(run_copy, workdir, capsys, which):
    marker = workdir / "PWNED"
    if which == "features":
        target = sorted((run_copy / "sweep" / "features").glob("*.pt"))[0]
        args = ["sweep", "guidance=0,1,3", f"run={run_copy}", "eval.overwrite=false"]
        for row in (run_copy / "sweep" / "rows").glob("*.json"):
            row.unlink()  # rows gone, so the sweep reads the cached features
    else:
        target = run_copy / "guidance_classifier.pt"
        args = ["sweep", "guidance.method=classifier", "guidance=1", f"run={run_copy}"]
    plant(target, marker)
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refusing to load" in line and str(target) in line
    assert not marker.exists()


def test_crafted_checkpoint_subprocess_prints_one_line(run_copy, workdir):
    marker = workdir / "PWNED"
    plant(run_copy / "checkpoints" / "last.pt", marker)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cfgx", "sweep", "guidance=1", f"run={run_copy}"], cwd=workdir,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert "refusing to load" in one_error_line(proc.stderr)
    assert not marker.exists()
