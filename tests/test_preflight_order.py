"""A missing Inception file fails before the evaluation classifier trains (issue 18: it trained first)."""

from __future__ import annotations

import time

from cfgx.cli.entry import main


def test_missing_inception_weights_fail_before_any_classifier_training(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CFGX_CACHE", str(cache))
    t0 = time.perf_counter()
    try:  # cfgx train runs under hydra.main, which exits itself
        rc = main(["train", "eval.features=[classifier,inception]", f"eval.inception_weights={tmp_path / 'no.pth'}",
                   f"paths.runs={tmp_path / 'runs'}", "eval.classifier.steps=3000", "train.steps=1"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Inception weights not found" in err, err
    assert not (cache / "eval_classifier").exists()       # no classifier trained or cached
    assert not (tmp_path / "runs").exists()
    assert time.perf_counter() - t0 < 60                  # 3000 classifier steps would take minutes


def test_missing_reference_file_fails_before_any_classifier_training(tmp_path, capsys, monkeypatch):
    """eval.reference=adm:PATH is read before the evaluation classifier trains (it was read after)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CFGX_CACHE", str(cache))
    t0 = time.perf_counter()
    try:
        rc = main(["train", f"eval.reference=adm:{tmp_path / 'VIRTUAL_nothing.npz'}", f"paths.runs={tmp_path / 'runs'}",
                   "eval.classifier.steps=3000", "train.steps=1"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "VIRTUAL_nothing.npz" in err, err
    assert not (cache / "eval_classifier").exists() and not (tmp_path / "runs").exists()
    assert time.perf_counter() - t0 < 60
