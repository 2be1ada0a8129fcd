"""Cluster sweeps through hydra-submitit-launcher, for real: its local executor runs each job as a subprocess.

Skipped when the plugin (the ``[cluster]`` extra) is not installed; CI installs it.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, TINY

from cfgx.cli import main
from cfgx.sweep.loop import load_rows

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TIMING = {"seconds", "samples_per_s", "device"}
JOBS = [a for a in TINY if not a.startswith("guidance")] + ["guidance=1"]


def _runs(root):
    """{job tag: run dir} of a multirun (run dirs are <stamp>-job<N>)."""
    return {p.parent.name.split("-", 2)[-1]: p.parent for p in root.glob("digits/*/meta.json")}


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_submitit_local_multirun_makes_the_same_runs_and_rows_as_the_basic_launcher(tmp_path, monkeypatch,
                                                                                      cache_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job subprocesses import this checkout's cfgx
    # One thread everywhere: submitit's jobs run side by side, so the automatic budget would give them fewer
    # threads than the basic launcher's one-at-a-time jobs, and CPU kernels round differently by pool size.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["train", "-m", "cond_drop=0.1,0.2", *JOBS]
    assert main([*args, f"paths.runs={tmp_path / 'basic'}"]) == 0
    assert main([*args, f"paths.runs={tmp_path / 'local'}", "hydra/launcher=submitit_local",
                 "hydra.launcher.timeout_min=10"]) == 0

    basic, local = _runs(tmp_path / "basic"), _runs(tmp_path / "local")
    assert sorted(basic) == sorted(local) == ["job0", "job1"]
    logs = list((tmp_path / "local" / "multirun").glob("*/.submitit/*/*_log.out"))
    assert len(logs) == 2  # two real submitit jobs ran
    for tag in basic:
        b, s = basic[tag], local[tag]
        assert _files(b) == _files(s)
        assert (b / "config.yaml").read_text().replace("/basic", "/local") == (s / "config.yaml").read_text()
        assert (b / "overrides.yaml").read_text().replace("/basic", "/local") == (s / "overrides.yaml").read_text()
        mb, ms = json.loads((b / "meta.json").read_text()), json.loads((s / "meta.json").read_text())
        assert mb["config_hash"] == ms["config_hash"] and mb["checkpoint_step"] == ms["checkpoint_step"] == 12
        (rb,), (rs,) = load_rows(b), load_rows(s)
        diff = {k: (rb.get(k), rs.get(k)) for k in set(rb) | set(rs) if k not in TIMING and rb.get(k) != rs.get(k)}
        assert not diff, f"{tag}: {diff}"
    cds = {json.loads((r / "meta.json").read_text())["config_hash"] for r in local.values()}
    assert len(cds) == 2  # the two jobs are two configs (cond_drop 0.1, 0.2)


def test_a_two_task_submitit_job_trains_as_one_process_group(tmp_path, monkeypatch, cache_dir):
    """What the slurm preset relies on: tasks of one job join one torch.distributed group (gloo here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert main(["train", "-m", "cond_drop=0.1", *JOBS, f"paths.runs={tmp_path}", "hydra/launcher=submitit_local",
                 "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]) == 0
    (run,) = _runs(tmp_path).values()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["train_processes"] == 2 and meta["checkpoint_step"] == 12 and len(load_rows(run)) == 1
