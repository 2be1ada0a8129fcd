"""The guidance lab from the command line: several rules in one sweep, snapshots, checkpoint
sweeps, autoguidance guides, and one line for every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import private_copy, table_rows
from omegaconf import OmegaConf

from cfgx.cli import main


@pytest.fixture(scope="module")
def lab_run(tiny_run, tmp_path_factory):
    """A private copy of the tiny run (it keeps EMA snapshots at steps 6 and 12)."""
    return private_copy(tiny_run, tmp_path_factory, "lab")


_rows = table_rows


def test_snapshots_are_plain_ema_tensors(lab_run):
    snaps = sorted((lab_run / "checkpoints" / "snapshots").glob("ema_*.pt"))
    assert [p.name for p in snaps] == ["ema_00000006.pt", "ema_00000012.pt"]
    blob = torch.load(snaps[0], weights_only=True)
    assert set(blob) == {"ema", "step"} and int(blob["step"]) == 6
    assert all(isinstance(v, torch.Tensor) for v in blob["ema"].values())
    # The last snapshot is the EMA of last.pt; snapshots are far smaller than the full checkpoint.
    last = torch.load(lab_run / "checkpoints" / "last.pt", weights_only=False)
    final = torch.load(snaps[1], weights_only=True)["ema"]
    assert all(torch.equal(final[k], v.cpu()) for k, v in last["ema"].items())
    assert snaps[0].stat().st_size < 0.6 * (lab_run / "checkpoints" / "last.pt").stat().st_size


def test_one_sweep_gives_one_row_per_method_and_scale(lab_run, workdir, capsys):
    args = ["sweep", "guidance.method=[cfg,interval,apg,cfg@cosine]", "guidance=1,2", f"run={lab_run}",
            "eval.num_samples=20", "sampler=ddim", "sampler.steps=4", "guidance.interval.sigma=[0.5,10]"]
    assert main(args) == 0, capsys.readouterr().err
    # (the shared tiny run may already hold n=20 CFG rows from other tests, with the recipe's sampler)
    rows = [r for r in _rows(lab_run) if r["num_samples"] == 20 and r["s"] in (1.0, 2.0) and r["sampler"] == "ddim"]
    got = sorted((r["method"], r["s"]) for r in rows)
    assert got == sorted((m, s) for m in ("cfg", "interval", "apg", "cfg@cosine") for s in (1.0, 2.0))
    by = {(r["method"], r["s"]): r for r in rows}
    # s = 1 is the conditional model under every rule here: identical samples, identical metrics.
    for m in ("interval", "apg", "cfg@cosine"):
        assert by[(m, 1.0)]["fd_classifier"] == pytest.approx(by[("cfg", 1.0)]["fd_classifier"], abs=1e-6)
    # nfe counts what was evaluated: the 4-step DDIM has sigma in [0.5, 10] at 2 of its 4 steps.
    assert by[("cfg", 2.0)]["nfe"] == 8 and by[("interval", 2.0)]["nfe"] == 6
    assert by[("cfg@cosine", 2.0)]["guidance_schedule"] == "cosine"
    assert json.loads(by[("interval", 2.0)]["guidance_options"]) == {"sigma": [0.5, 10]}
    assert by[("apg", 2.0)]["fd_classifier"] != by[("cfg", 2.0)]["fd_classifier"]
    # Each rule (with its options) has its own row file; another interval is another row.
    names = [p.name for p in (lab_run / "sweep" / "rows").glob("*.json")]
    assert sum(n.startswith("interval-") for n in names) == 2 and sum(n.startswith("apg-") for n in names) == 2
    assert main(args[:-1] + ["guidance.interval.sigma=[0.1,10]", "guidance.method=interval"]) == 0
    assert sum(p.name.startswith("interval-") for p in (lab_run / "sweep" / "rows").glob("*.json")) == 4
    assert (lab_run / "samples_apg.png").is_file() and (lab_run / "samples_cfg_cosine.png").is_file()


def test_autoguidance_with_a_snapshot_and_checkpoint_sweep(lab_run, workdir, capsys):
    assert main(["sweep", "guidance.method=autoguidance", "guidance.autoguidance.guide=step:6", "guidance=2",
                 f"run={lab_run}", "eval.num_samples=20"]) == 0, capsys.readouterr().err
    row = next(r for r in _rows(lab_run) if r["method"] == "autoguidance")
    assert row["guide"] == "step:6" and row["guide_step"] == 6 and row["nfe"] == 8
    assert main(["sweep", "checkpoint=all", "guidance=1,3", f"run={lab_run}", "eval.num_samples=20"]) == 0
    steps = sorted({(r["checkpoint_step"], r["s"]) for r in _rows(lab_run)
                    if r["method"] == "cfg" and r["num_samples"] == 20 and r["s"] in (1.0, 3.0)})
    assert steps == [(6, 1.0), (6, 3.0), (12, 1.0), (12, 3.0)]
    assert (lab_run / "plot_checkpoints.png").is_file()


def _other_dataset_run(lab_run, tmp_path):
    other = tmp_path / "mnist" / "other"
    other.mkdir(parents=True)
    cfg = OmegaConf.load(lab_run / "config.yaml")
    cfg.dataset.name = "mnist"
    OmegaConf.save(cfg, other / "config.yaml")
    shutil.copy(lab_run / "meta.json", other / "meta.json")
    return other


BAD = [
    (["guidance.method=frobnicate"], "unknown guidance.method 'frobnicate'"),
    (["guidance.method=[cfg,nope]"], "unknown guidance.method 'nope'"),
    (["guidance.method=interval", "guidance.interval.sigma=[2,1]"], "lo must be below hi"),
    (["guidance.method=interval", "guidance.interval.sigma=[1,1]"], "lo must be below hi"),
    (["guidance.method=rescale", "guidance.rescale.phi=1.5"], "outside [0, 1]"),
    (["guidance.method=rescale", "guidance.rescale.phi=-0.1"], "outside [0, 1]"),
    (["guidance.method=cfgpp", "sampler=ddpm"], "defined for ddim only"),
    (["guidance.method=autoguidance", "guidance.autoguidance.guide=step:7"], "no snapshot at step 7"),
    (["guidance.method=autoguidance"], "give step:N"),
    (["guidance.method=cfgpp", "sampler=ddim", "guidance=20"], "lambda"),
    (["guidance.method=cfgpp"], "defined for ddim only"),  # the digits recipe samples with DPM-Solver++
    (["guidance.method=classifier@linear"], "takes no weight schedule"),
    (["checkpoint=7"], "no snapshot at step 7"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_lab_input_is_one_line(lab_run, workdir, args, needle, capsys):
    from test_cli import snapshot

    before = snapshot(lab_run)
    code = main(["sweep", "guidance=2", *args, f"run={lab_run}", "eval.num_samples=20"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert snapshot(lab_run) == before


def test_guide_run_of_another_dataset_is_one_line(lab_run, workdir, tmp_path, capsys):
    other = _other_dataset_run(lab_run, tmp_path)
    code = main(["sweep", "guidance=2", "guidance.method=autoguidance", f"guidance.autoguidance.guide=run:{other}",
                 f"run={lab_run}", "eval.num_samples=20"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dataset mnist" in err, err
