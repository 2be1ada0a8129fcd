"""CLI wiring of classifier guidance, the flow postprocessor, report and the toys, on the tiny run."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import private_copy, table_rows

from cfgx.cli import main


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A private copy, so these tests' rows do not leak into other tests' assertions."""
    return private_copy(tiny_run, tmp_path_factory, "extras")


_rows = table_rows


def test_classifier_guidance_rows_beside_cfg(run_copy, workdir, capsys):
    args = ["sweep", "guidance.method=classifier", "guidance=0,1,3", f"run={run_copy}",
            "guidance.classifier.steps=30", "guidance.classifier.width=8"]
    assert main(args) == 0, capsys.readouterr().err
    rows = _rows(run_copy)
    cg = sorted(r["s"] for r in rows if r["method"] == "classifier")
    cfg = sorted(r["s"] for r in rows if r["method"] == "cfg" and r["num_samples"] == 40)
    assert cg == [0.0, 1.0, 3.0] and cfg == [0.0, 1.0, 3.0]
    for r in rows:
        for col in ("margin", "near_boundary", "confidence", "entropy"):
            assert r[col] is not None
    assert (run_copy / "guidance_classifier.pt").is_file()
    # The CG classifier is the run's own, never the evaluation classifier.
    r = next(r for r in rows if r["method"] == "classifier")
    assert r["guidance_classifier"] and r["extractor_classifier"].startswith("eval_classifier:")
    # s = 0 ignores the classifier: identical to CFG's unconditional samples.
    r0 = {r["method"]: r for r in rows if r["s"] == 0.0 and r["num_samples"] == 40}
    assert r0["classifier"]["fd_classifier"] == pytest.approx(r0["cfg"]["fd_classifier"], rel=1e-6)


def test_postprocess_then_sweep_before_and_after(run_copy, workdir, capsys):
    post = ["postprocess.steps=6", "postprocess.samples_per_scale=20", "postprocess.train_scales=[1,3]",
            "postprocess.batch_size=8", "postprocess.apply_steps=2", "postprocess.ckpt_every=3", "postprocess.k=3"]
    assert main(["postprocess", f"run={run_copy}", *post]) == 0, capsys.readouterr().err
    assert (run_copy / "postprocess" / "info.json").is_file()
    assert main(["sweep", "postprocess=flow", "guidance=1,3", f"run={run_copy}", *post]) == 0, \
        capsys.readouterr().err
    rows = [r for r in _rows(run_copy) if r["method"] == "cfg" and r["s"] in (1.0, 3.0)
            and r["num_samples"] == 40]
    kinds = sorted((r["s"], r["postprocess"]) for r in rows)
    assert kinds == [(1.0, "flow"), (1.0, "none"), (3.0, "flow"), (3.0, "none")]
    flow = next(r for r in rows if r["postprocess"] == "flow")
    assert flow["postprocess_nfe"] == 2 and flow["nfe"] > flow["postprocess_nfe"]
    for r in rows:
        assert r["recall"] is not None and r["coverage"] is not None


def test_report_merges_runs(run_copy, tiny_run, workdir, capsys):
    out = workdir / "merged"
    assert main(["report", str(tiny_run), str(run_copy), f"out={out}"]) == 0, capsys.readouterr().err
    rows = json.loads((out / "report.json").read_text())
    assert {r["run"] for r in rows} == {str(tiny_run), str(run_copy)}
    assert (out / "report.csv").is_file() and (out / "plot_tradeoff.png").is_file()
    assert main(["report", str(workdir / "nope")]) == 2


def test_toy_command_writes_figures(workdir, capsys):
    assert main(["toy", "dataset=gmm2d", "guidance=1,4", "sampler.steps=20"]) == 0, capsys.readouterr().err
    out = next((workdir / "runs" / "gmm2d").iterdir())
    assert (out / "toy_summary.json").is_file() and list(out.glob("*.png"))
    assert main(["toy", "dataset=digits"]) == 2


def test_postprocess_pairs_in_classifier_feature_space(tiny_run, tmp_path, workdir, capsys):
    import torch

    from cfgx.cli.sweep import sweep_config
    from cfgx.data import build_dataset, stack_dataset
    from cfgx.metrics.suite import EvalSuite
    from cfgx.postprocess.pairs import dequantize, knn_indices

    run = tmp_path / "digits" / tiny_run.name
    shutil.copytree(tiny_run, run)
    post = ["postprocess.steps=2", "postprocess.samples_per_scale=20", "postprocess.train_scales=[1]",
            "postprocess.batch_size=8", "postprocess.k=1", "postprocess.nn_space=classifier"]
    assert main(["postprocess", f"run={run}", *post]) == 0, capsys.readouterr().err
    assert json.loads((run / "postprocess" / "info.json").read_text())["settings"]["nn_space"] == "classifier"
    # With k = 1 each target is the same-class real digit nearest in the evaluation classifier's features.
    cfg, _ = sweep_config([f"run={run}"])
    data = build_dataset(cfg.dataset)
    suite = EvalSuite(cfg, data, torch.device("cpu"))
    pairs = torch.load(run / "postprocess" / "pairs.pt", weights_only=False)
    real_x, real_y = stack_dataset(data.train)
    _, nearest = knn_indices(suite.extract(dequantize(pairs["x_hat"]))["clf_feats"], pairs["labels"],
                             suite.extract(real_x)["clf_feats"], real_y, 1)
    assert torch.equal(pairs["target_idx"], nearest[:, 0])
