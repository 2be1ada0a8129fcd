"""Checks that must pass before the first training step, and the note a sweep gives on unfinished runs.

Training the CIFAR recipe takes days; a wrong Inception path, a reference split the
dataset lacks or an evaluation classifier that cannot learn must fail in seconds,
not after training. So ``cfgx train`` builds the sweep's whole evaluation side
(evaluation classifier trained or loaded, reference features, Inception weights
loaded and hashed) before it creates or resumes a run dir. It is cached, so the
sweep after training loads it again at little cost.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx.console import say
from cfgx.data import DatasetBundle
from cfgx.errors import CfgxError
from cfgx.store.locks import holder
from cfgx.store.reader import try_json
from cfgx.store.rundir import load_run_config, read_meta


def check_before_training(cfg: DictConfig, data: DatasetBundle, device: torch.device, run_dir: Path | None,
                          console=None) -> None:
    """Raise CfgxError for anything the post-training sweep would fail on. ``run_dir``: the run resumed."""
    post = str(cfg.postprocess.name)
    if post != "none" and not _postprocessor_ready(run_dir):
        raise CfgxError(f"postprocess={post} needs a trained run: train without it, then run 'cfgx postprocess "
                        f"run=<run>' and 'cfgx sweep postprocess={post} run=<run>'")
    # why: cfgx.metrics.suite loads the metrics stack (~3 s); cfgx sweep imports this module too
    from cfgx.metrics.inception import resolve_weights_path
    from cfgx.metrics.suite import EvalSuite, resolve_feature_spaces

    # A missing Inception file fails in a second, before the evaluation classifier trains (minutes on MNIST).
    if "inception" in resolve_feature_spaces(OmegaConf.to_container(cfg.eval, resolve=True)["features"], data):
        resolve_weights_path(cfg.eval.get("inception_weights"))
    suite = EvalSuite(cfg, data, device, console)
    bits = [f"reference {suite.info['real_reference']}"]
    if suite.info.get("eval_classifier_acc") is not None:
        bits.append(f"evaluation classifier held-out accuracy {suite.info['eval_classifier_acc']:.3f}")
    if suite.info.get("inception_weights"):
        bits.append(f"Inception weights {suite.info['inception_weights']}")
    say(console, "evaluation ready before training: " + ", ".join(bits))


def _postprocessor_ready(run_dir: Path | None) -> bool:
    if run_dir is None:
        return False
    info = try_json(Path(run_dir) / "postprocess" / "info.json")
    return bool(info and info.get("finished") is True)


def training_note(run_dir: Path, step: int) -> str | None:
    """One line when a sweep evaluates a run whose training is unfinished or still running; else None."""
    total = load_run_config(run_dir).get("train", {}).get("steps")
    who = holder(Path(run_dir) / ".train.lock")
    if who is not None:
        return (f"note: {run_dir} is still being trained ({who}); evaluating its checkpoint at step {step} of "
                f"{total}")
    if not read_meta(run_dir).get("train_finished", False):
        return (f"note: training of {run_dir} is unfinished; evaluating its checkpoint at step {step} of {total} "
                "(re-run the same 'cfgx train' to finish it)")
    return None
