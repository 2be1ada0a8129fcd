"""``cfgx import`` of a tiny diffusers DiT + AutoencoderKL, then the ordinary ``cfgx sweep`` with three
guidance rules: the usual table, grids and figures, and a 2-process torchrun sweep equal to the 1-process one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, random_fidelity_inception

from cfgx.cli import main
from cfgx.sweep.rows import load_rows

pytest.importorskip("diffusers")
from test_pretrained_dit import save_tiny_pipeline  # noqa: E402

SWEEP = ["guidance.method=[cfg,interval,apg]", "guidance=1,1.5,4", "eval.num_samples=20", "eval.batch_size=10",
         "sampler.steps=4", "eval.features=classifier"]  # the classifier: the torchvision one named at import
TIMING = {"seconds", "samples_per_s", "device"}


def _reference_folder(root: Path, classes: int = 10, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.array([25 * c, 255 - 25 * c, (70 * c) % 255])
            img = np.clip(base + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def _key(r: dict) -> tuple:
    return r["method"], r["s"]


def test_import_then_sweep_every_rule_and_torchrun_matches(workdir, cache_dir, capsys, monkeypatch) -> None:
    # Both sides on one thread: CPU kernels round differently with another pool size (README, Threads), and the
    # automatic budget would size this process's pool by whatever else runs.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save_tiny_pipeline(workdir / "dit")
    ref = _reference_folder(workdir / "ref")
    # A torchvision classifier named at import (random weights, 10 classes): the ImageNet-judge path, also under
    # torchrun, where every rank loads it and rank 0 alone computes the reference features.
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).eval().state_dict(), workdir / "mnv3.pth")
    assert main(["import", "model=dit", f"dataset.root={ref}",
                 f"eval.classifier.source=torchvision:mobilenet_v3_small:{workdir / 'mnv3.pth'}"]) == 0
    (run,) = [p.parent for p in (workdir / "runs").glob("imagefolder/*/meta.json")]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["train_finished"] and meta["imported"]["conventions"]["null_index"] == 10
    assert set(meta["imported"]["weights_sha256"]) == {"transformer/diffusion_pytorch_model.safetensors",
                                                        "vae/diffusion_pytorch_model.safetensors"}
    assert not (run / "checkpoints").exists()

    assert main(["sweep", *SWEEP]) == 0  # the import is the newest finished run
    rows = load_rows(run)
    assert sorted(_key(r) for r in rows) == sorted((m, s) for m in ("apg", "cfg", "interval") for s in (1.0, 1.5, 4.0))
    for r in rows:
        assert r["sampler"] == "ddim-leading" and r["model"] == str(workdir / "dit")
        assert r["model_prediction"] == "eps" and r["guidance_space"].startswith("cfgx VP eps")
        assert r["accuracy"] is not None and r["fd_classifier"] is not None
        assert r["extractor_classifier"].startswith("torchvision:mobilenet_v3_small:")
    for name in ("metrics.md", "metrics.csv", "samples.png", "samples_apg.png", "samples_interval.png",
                 "plot_tradeoff.png"):
        assert (run / name).is_file(), name
    assert len(list((run / "sweep" / "grids").glob("*.png"))) == 9

    copy = workdir / "two" / "imagefolder" / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("sweep"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"PYTHONPATH": str(REPO), "CFGX_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cfgx",
                           "sweep", f"run={copy}", *SWEEP], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = sorted(rows, key=_key), sorted(load_rows(copy), key=_key)
    assert [_key(r) for r in one] == [_key(r) for r in two]
    for a, b in zip(one, two):
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if k not in TIMING and a.get(k) != b.get(k)}
        assert not diff, f"{_key(a)}: {diff}"


def test_import_errors_are_one_line(workdir, capsys) -> None:
    save_tiny_pipeline(workdir / "dit")
    assert main(["import", "model=dit"]) == 2
    assert "needs dataset.root=PATH" in capsys.readouterr().err
    assert main(["import", f"model={workdir / 'nowhere'}", "dataset.root=ref"]) == 2
    assert "is neither a folder, a .safetensors" in capsys.readouterr().err
    ref = _reference_folder(workdir / "ref3", classes=3, per_class=2)
    assert main(["import", "model=dit", f"dataset.root={ref}"]) == 2
    err = capsys.readouterr().err
    assert "the model has 10 classes" in err and err.count("\n") == 1
    assert not (workdir / "runs").exists()


def test_imported_run_without_classifier_shows_why(workdir, capsys, monkeypatch) -> None:
    """cfgx import's default (no evaluation classifier): classifier columns empty, the reason in every row, in
    metrics.md and under the console table; precision/recall from Inception; guidance=auto minimises FID."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save_tiny_pipeline(workdir / "dit", num_classes=3)
    ref = _reference_folder(workdir / "ref", classes=3, per_class=4)
    weights = workdir / "inception.pth"
    torch.save({k: v.clone() for k, v in random_fidelity_inception().state_dict().items()}, weights)
    assert main(["import", "model=dit", f"dataset.root={ref}"]) == 0
    capsys.readouterr()
    assert main(["sweep", "guidance=auto:0:4", "guidance.auto_tol=1.5", "eval.num_samples=12", "eval.batch_size=12",
                 "sampler.steps=3", f"eval.inception_weights={weights}", "eval.pr_k=2", "eval.dc_k=2"]) == 0
    out = capsys.readouterr().out
    (run,) = [p.parent for p in (workdir / "runs").glob("imagefolder/*/meta.json")]
    rows = load_rows(run)
    assert len(rows) >= 3 and all(r["searched"] for r in rows)
    for r in rows:
        assert all(r[k] is None for k in ("accuracy", "fd_classifier", "margin", "eval_classifier_acc"))
        assert r["extractor_classifier"] == "none" and "eval.classifier.source=none" in r["classifier_note"]
        assert r["feature_space"] == "inception" and r["fid"] is not None and r["precision"] is not None
    md = (run / "metrics.md").read_text()
    assert "Note: no evaluation classifier (eval.classifier.source=none)" in md and "| accuracy" not in md
    assert "name one with eval.classifier.source=torchvision:" in " ".join(out.split())
    assert (run / "plot_tradeoff.png").is_file()
