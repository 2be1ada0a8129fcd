"""Issue B acceptance on real data: an MNIST run swept with the full Inception suite.

Uses ../shared/data (MNIST and the FID Inception weights); skips when absent. Sizes
are tiny because Inception runs at a few images/s on a 2-core CPU; the point is
every column and the resume behaviour, not the values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

# 80 s on 2 cores: an end-to-end run, so it sits behind `slow` (make test-all runs it).
pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

COLUMNS = ["s", "w_ho", "accuracy", "fd_classifier", "diversity_within_class", "fid", "fid_comparable", "kid_mean",
           "kid_std", "is_mean", "is_available", "precision", "recall", "density", "coverage", "vendi",
           "diversity_within_class_inception", "confidence", "entropy", "margin", "near_boundary", "sampler",
           "steps", "nfe", "num_samples", "seconds", "samples_per_s", "checkpoint_step", "extractor_classifier",
           "extractor_inception", "inception_weights", "config_hash", "device", "cfgx", "torch", "torchmetrics"]


def _cli(args, cwd, env):
    return subprocess.Popen([sys.executable, "-m", "cfgx", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_mnist_sweep_every_column_and_resume_after_kill(shared_data, tmp_path):
    weights = shared_data / "inception" / "weights-inception-2015-12-05-6726825d.pth"
    if not (shared_data / "MNIST" / "raw").is_dir() or not weights.is_file():
        pytest.skip("shared MNIST or Inception weights absent")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CFGX_CACHE": str(tmp_path / "cache")}
    common = [f"eval.inception_weights={weights}", "eval.num_samples=10", "eval.batch_size=10",
              "eval.real_samples=40", "sampler.steps=3", "eval.kid_subset_size=10", "eval.kid_subsets=5"]
    train = _cli(["train", "dataset=mnist", f"dataset.root={shared_data}", "backbone.ch=8",
                  "backbone.ch_mult=[1,2,2]", "backbone.num_res_blocks=1", "backbone.attn_resolutions=[]",
                  "train.steps=3", "train.batch_size=8", "eval.classifier.steps=60", "eval.classifier.width=8",
                  "guidance=1", *common], tmp_path, env)
    out, err = train.communicate(timeout=900)
    assert train.returncode == 0, err
    run = next((tmp_path / "runs" / "mnist").iterdir())
    rows_dir = run / "sweep" / "rows"

    sweep_args = ["sweep", "guidance=0,1,3,7", f"run={run}", *common]
    proc = _cli(sweep_args, tmp_path, env)
    # Kill the sweep as soon as its first new scale is written.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in rows_dir.glob("*.json") if "-s1.json" not in p.name]
        if done:
            break
        time.sleep(0.2)
    proc.kill()
    proc.communicate()
    first = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.json")}
    assert 2 <= len(first) < 5, sorted(first)  # s=1 from training plus at least one new scale, not all

    proc = _cli(sweep_args, tmp_path, env)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert out.count("already in the table") == len(first)
    after = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.json")}
    assert all(after[k] == v for k, v in first.items())  # finished scales were not recomputed
    rows = [r for r in json.loads((run / "metrics.json").read_text()) if r["num_samples"] == 10]
    assert sorted(r["s"] for r in rows) == [0.0, 1.0, 3.0, 7.0]
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        assert not missing, missing
        assert r["fid"] is not None and r["fid_comparable"] is False
        assert r["is_available"] is False and r["is_mean"] is None  # FID-only weights: no IS, never 1.0
        assert r["feature_space"] == "inception"
