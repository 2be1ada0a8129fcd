"""The side commands: ``cfgx toy``, ``cfgx train-classifier`` and ``cfgx postprocess``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cfgx.backbones.noisy_classifier import get_guidance_classifier
from cfgx.cli.common import console as make_console
from cfgx.cli.sweep import sweep_config
from cfgx.config import compose, normalize_overrides, rule_block, selects, touches
from cfgx.data import build_dataset
from cfgx.diffusion.guidance import get_rule
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.postprocess import train_postprocessor
from cfgx.sample import run_sampler
from cfgx.store.atomic import atomic_write_json, atomic_write_text
from cfgx.store.checkpoints import load_ema_model
from cfgx.store.rundir import new_run_dir, pick_device, provenance
from cfgx.toy.analysis import run_toy

# ---------------------------------------------------------------- toy


def cmd_toy(args: list[str]) -> int:
    """Zhao & Schwing's 1D/2D analysis on analytic mixtures, into a new folder under runs/."""
    overrides = normalize_overrides(args)
    if not touches(overrides, "dataset"):
        overrides = ["dataset=gmm1d", *overrides]
    cfg = compose(overrides)
    if cfg.dataset.name not in ("gmm1d", "gmm2d"):
        raise CfgxError(f"cfgx toy runs on the analytic mixtures; dataset={cfg.dataset.name} is not one: use "
                        "dataset=gmm1d or dataset=gmm2d")
    scales = [float(s) for s in cfg.guidance.scales] if touches(overrides, "guidance") else [1.0, 2.0, 4.0, 8.0]
    steps = int(cfg.sampler.steps) if touches(overrides, "sampler") else 100
    out = new_run_dir(Path(str(cfg.paths.runs)), cfg.dataset.name, "toy")
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(out / "toy_meta.json", {"scales": scales, "sampler": cfg.sampler.name, "steps": steps,
                                              "seed": int(cfg.seed), **provenance(torch.device("cpu"))})
    console = make_console()
    t0 = time.perf_counter()
    run_toy(cfg.dataset.name, out, scales=scales, sampler=str(cfg.sampler.name), steps=steps, seed=int(cfg.seed),
            console=console)
    console.print(f"toy analysis written to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


# ---------------------------------------------------------------- guidance classifier, postprocessor


def _load_run(args: list[str], verb: str, extra: list[str] | None = None):
    cfg, run_dir = sweep_config(args + (extra or []), verb)
    device = pick_device(str(cfg.device))
    data = build_dataset(cfg.dataset)
    return cfg, run_dir, device, data, NoiseSchedule.from_config(cfg.diffusion)


def cmd_train_classifier(args: list[str]) -> int:
    cfg, run_dir, device, data, schedule = _load_run(args, "training the guidance classifier of")
    console = make_console()
    options = get_rule("classifier")(rule_block(cfg, "classifier")).training_options()
    _, info = get_guidance_classifier(run_dir, data, schedule, device, options, console)
    console.print(f"guidance classifier for {run_dir}: noisy held-out accuracy by t "
                  f"{json.dumps(info.get('val_accuracy'))} ({'cached' if info.get('cached') else 'trained'})")
    return 0


def cmd_postprocess(args: list[str]) -> int:
    extra = [] if selects(normalize_overrides(args), "postprocess") else ["postprocess=flow"]
    cfg, run_dir, device, data, schedule = _load_run(args, "postprocessing", extra)
    if cfg.postprocess.name == "none":
        raise CfgxError("postprocess=none trains nothing; use postprocess=flow (the default of this command)")
    console = make_console()
    model, step = load_ema_model(run_dir, cfg, data, schedule, device)
    sampler = run_sampler(cfg, schedule, model, data)  # the sweep's: pairs drawn as its rows are
    post = OmegaConf.to_container(cfg.postprocess, resolve=True)
    feature_fn = None
    if post.get("nn_space") in ("classifier", "inception"):
        # why: cfgx.metrics.suite loads the metrics stack (~3 s), needed only for these feature spaces
        from cfgx.metrics.suite import EvalSuite

        suite = EvalSuite(cfg, data, device, console)
        space = post["nn_space"]
        if space == "inception" and suite.inception is None:
            raise CfgxError("postprocess.nn_space=inception needs Inception features; add "
                            "eval.features=[classifier,inception]")
        if space == "classifier" and suite.no_clf:
            raise CfgxError("postprocess.nn_space=classifier needs an evaluation classifier, and "
                            "eval.classifier.source=none; name one (own, or torchvision:ARCH:PATH) or use "
                            "postprocess.nn_space=inception")
        feature_fn = lambda x: suite.features_in(space, x)  # noqa: E731
    info = train_postprocessor(post, run_dir, data, model, schedule, sampler, device, console, feature_fn)
    console.print(f"postprocessor for {run_dir} (checkpoint step {step}) ready: "
                  f"{info.get('train_seconds', 0):.0f}s training; evaluate with "
                  f"'cfgx sweep postprocess=flow run={run_dir}'")
    return 0
