"""The CLI as a user runs it: train, sweep, multirun, help, and every bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY
from omegaconf import OmegaConf

from cfgx.cli import main
from cfgx.cli.sweep import sweep_config


def run_cli(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cfgx", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(proc, needle: str):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


def test_help_lists_subcommands_and_groups(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("train", "sweep", "dataset", "backbone", "cond_drop", "guidance", "sampler", "digits",
                 "ddpm_cifar"):
        assert word in out


def test_tiny_run_writes_a_self_describing_run_dir(tiny_run):
    for name in ("config.yaml", "overrides.yaml", "meta.json", "metrics.csv", "metrics.json", "metrics.md",
                 "samples.png", "train_log.jsonl", "checkpoints/last.pt"):
        assert (tiny_run / name).is_file(), name
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["train_finished"] and meta["checkpoint_step"] == 12 and meta["seed"] == 0
    assert meta["versions"]["torch"] and meta["config_hash"]
    rows = list(csv.DictReader(open(tiny_run / "metrics.csv")))
    assert [float(r["s"]) for r in rows] == [0.0, 1.0, 3.0]
    for r in rows:
        assert float(r["w_ho"]) == float(r["s"]) - 1
        for col in ("accuracy", "fd_classifier", "diversity_within_class", "sampler", "steps", "nfe",
                    "num_samples", "seconds", "samples_per_s", "checkpoint_step", "extractor_classifier",
                    "eval_classifier_acc", "config_hash", "device", "precision", "recall", "vendi"):
            assert r[col] != "", col
    assert [int(r["nfe"]) for r in rows] == [4, 4, 8]
    assert len(list((tiny_run / "sweep" / "grids").glob("*.png"))) == 3


def test_sweep_cli_evaluates_exactly_the_given_scales_and_skips_finished(tiny_run, workdir, capsys):
    assert main(["sweep", "guidance=0,2", f"run={tiny_run}", "eval.num_samples=20"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tiny_run / "metrics.json").read_text())
    n20 = sorted(r["s"] for r in rows if r["num_samples"] == 20)
    assert n20 == [0.0, 2.0]
    # Re-running skips finished scales; list syntax works too.
    assert main(["sweep", "guidance.scales=[0,2]", f"run={tiny_run}", "eval.num_samples=20"]) == 0
    out = capsys.readouterr().out
    assert out.count("already in the table") == 2


def test_sweep_keeps_the_runs_training_config(tiny_run):
    cfg, run_dir = sweep_config(["guidance=5", f"run={tiny_run}", "sampler=ddpm", "sampler.steps=3"])
    assert run_dir == tiny_run
    assert cfg.backbone.ch == 8 and cfg.train.steps == 12       # from the run
    assert list(cfg.guidance.scales) == [5.0] and cfg.sampler.name == "ddpm" and cfg.sampler.steps == 3
    assert cfg.eval.num_samples == 40                           # untouched: the run's own
    # A dotted eval override changes that key only; the rest of the run's eval block stays.
    cfg, _ = sweep_config(["guidance=5", f"run={tiny_run}", "eval.num_samples=7"])
    assert cfg.eval.num_samples == 7 and cfg.eval.classifier.steps == 150 and cfg.eval.batch_size == 20


def test_train_cli_end_to_end_and_rerun_resumes(workdir):
    args = ["train", *TINY, "train.steps=6", "train.ckpt_every=3"]
    proc = run_cli(args, workdir)
    assert proc.returncode == 0, proc.stderr
    runs = list((workdir / "runs" / "digits").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.csv").is_file()
    assert "accuracy" in (runs[0] / "metrics.csv").read_text()
    # The same command again finds the finished run and starts a new one (nothing overwritten).
    before = snapshot(runs[0])
    proc = run_cli(args + ["train.steps=8"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(runs[0]) == before
    assert len(list((workdir / "runs" / "digits").iterdir())) == 2


def test_multirun_over_cond_drop(workdir):
    proc = run_cli(["train", "-m", "cond_drop=0,0.2", *TINY, "train.steps=3", "guidance=1"], workdir)
    assert proc.returncode == 0, proc.stderr
    runs = sorted((workdir / "runs" / "digits").iterdir())
    assert len(runs) == 2
    drops = sorted(OmegaConf.load(r / "config.yaml").cond_drop.p for r in runs)
    assert drops == [0.0, 0.2]
    # Hydra's record of the sweep lands under runs/multirun/, not in the user's working directory.
    assert not (workdir / "multirun.yaml").exists()
    assert len(list((workdir / "runs" / "multirun").glob("*/multirun.yaml"))) == 1


BAD_TRAIN = [
    (["dataset=cifar11"], "valid: cifar10"),
    (["backbone=huge"], "valid: ddpm_cifar"),
    (["cond_drop=1.5"], "outside [0, 1)"),
    (["guidance=0,x"], "not a number"),
    (["guidance=0,inf"], "not finite"),
    (["train.steps=0"], "train.steps"),
    (["train.batch_size=-1"], "train.batch_size"),
    (["-m", "cond_drop=0.1,2"], "outside [0, 1)"),
]


@pytest.mark.parametrize("args,needle", BAD_TRAIN)
def test_bad_train_input_is_one_line_and_writes_nothing(tiny_run, workdir, args, needle, capsys):
    before = snapshot(tiny_run.parent)
    code = main(["train", *args, f"paths.runs={tiny_run.parent.parent}"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0], err
    assert snapshot(tiny_run.parent) == before


@pytest.mark.parametrize("args,needle", [
    (["run=/nonexistent/run"], "not a cfgx run dir"),
    (["guidance=1,abc"], "not a number"),
    (["guidance=abc"], "valid: default"),
    (["backbone=tiny"], "changes training"),
])
def test_bad_sweep_input(tiny_run, workdir, args, needle, capsys):
    before = snapshot(tiny_run)
    code = main(["sweep", *args] + ([] if any(a.startswith("run=") for a in args) else [f"run={tiny_run}"]))
    err = capsys.readouterr().err
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tiny_run) == before


def test_corrupt_checkpoint_in_sweep_is_one_line_no_traceback(tiny_run, workdir):
    import shutil

    broken = workdir / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    before = snapshot(broken)
    proc = run_cli(["sweep", "guidance=1", f"run={broken}"], workdir)
    assert_one_line_error(proc, "corrupt")
    assert snapshot(broken) == before


def test_subprocess_errors_have_no_traceback(workdir):
    assert_one_line_error(run_cli(["train", "dataset=nope"], workdir), "unknown dataset")
    assert_one_line_error(run_cli(["frobnicate"], workdir), "unknown command")
    assert not (workdir / "runs").exists()


def test_other_reference_set_makes_new_rows_without_resampling(tiny_run, workdir, capsys):
    import shutil

    run = workdir / "refrun"
    shutil.copytree(tiny_run, run)
    feats_before = sorted(p.name for p in (run / "sweep" / "features").glob("*.pt"))
    assert main(["sweep", "guidance=0,1,3", f"run={run}", "eval.real_split=test"]) == 0
    out = capsys.readouterr().out
    assert "already in the table" not in out
    rows = json.loads((run / "metrics.json").read_text())
    refs = sorted({r["real_reference"].split(" ")[0] for r in rows})
    assert refs == ["digits:test", "digits:train"]
    # Same samples, so the cached features were reused: no new feature files.
    assert sorted(p.name for p in (run / "sweep" / "features").glob("*.pt")) == feats_before
    assert main(["sweep", "guidance=1", f"run={run}", "eval.real_split=validation"]) == 2


def test_seed_blocks_report_mean_and_interval(tiny_run, workdir, capsys):
    import shutil

    from cfgx.sweep.rows import mean_ci

    run = workdir / "blocks"
    shutil.copytree(tiny_run, run)
    assert main(["sweep", "guidance=1", f"run={run}", "eval.seed_blocks=3", "eval.num_samples=20"]) == 0
    row = next(r for r in json.loads((run / "metrics.json").read_text()) if r["seed_blocks"] == 3)
    assert row["accuracy_ci95"] is not None and row["fd_classifier_ci95"] > 0
    assert len(list((run / "sweep" / "features").glob("*-b3-*block*.pt"))) == 3  # three disjoint blocks
    # The interval is the t-interval of the block values.
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(ci - 4.302653 * 1.0 / 3 ** 0.5) < 1e-5
