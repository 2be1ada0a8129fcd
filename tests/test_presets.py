"""``experiment=`` presets: each composes, pins its protocol's values, and the command line still beats it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cfgx.config import check_eval_overrides, compose, group_options, validate
from cfgx.errors import CfgxError

PRESETS = ("ddpm_cifar10_cfg", "zhao_schwing_cifar10", "digits_laptop")
DDPM_UNET = {"name": "unet", "ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
             "dropout": 0.1}


def _pinned(cfg) -> dict:
    return {"dataset": cfg.dataset.name, "sampler": cfg.sampler.name, "steps": cfg.sampler.steps,
            "scales": list(cfg.guidance.scales), "method": cfg.guidance.method, "num_samples": cfg.eval.num_samples,
            "postprocess": cfg.postprocess.name, "cond_drop": cfg.cond_drop.p, "train_steps": cfg.train.steps,
            "seed": cfg.seed}


def test_every_preset_file_is_tested():
    assert set(group_options("experiment")) == set(PRESETS)


def test_ddpm_cifar10_cfg_pins_ddpm_recipe_and_protocol():
    cfg = compose(["experiment=ddpm_cifar10_cfg"])
    assert _pinned(cfg) == {"dataset": "cifar10", "sampler": "ddpm", "steps": 1000,
                            "scales": [0, 0.5, 1, 1.5, 2, 3, 4, 5, 7], "method": "cfg", "num_samples": 50000,
                            "postprocess": "none", "cond_drop": 0.1, "train_steps": 800000, "seed": 0}
    assert {k: cfg.backbone[k] for k in DDPM_UNET} == DDPM_UNET
    train = cfg.train
    assert (train.batch_size, train.lr, train.warmup_steps, train.ema_decay) == (128, 2e-4, 5000, 0.9999)
    assert (cfg.diffusion.schedule, cfg.diffusion.num_steps, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == \
        ("linear", 1000, 1e-4, 0.02)
    assert (cfg.eval.real_split, cfg.eval.real_samples, list(cfg.eval.features)) == \
        ("train", 50000, ["classifier", "inception"])
    assert cfg.dataset.hflip is True
    validate(cfg)


def test_zhao_schwing_cifar10_pins_s_2_25_and_the_flow():
    cfg = compose(["experiment=zhao_schwing_cifar10"])
    assert _pinned(cfg) == {"dataset": "cifar10", "sampler": "ddim", "steps": 50, "scales": [1, 2.25, 2.5, 2.75],
                            "method": "cfg", "num_samples": 50000, "postprocess": "flow", "cond_drop": 0.1,
                            "train_steps": 800000, "seed": 0}
    assert 2.25 in cfg.guidance.scales
    assert {k: cfg.backbone[k] for k in DDPM_UNET} == DDPM_UNET
    post = cfg.postprocess
    assert (post.k, post.nn_space, list(post.train_scales), post.apply_steps, post.apply_method) == \
        (20, "pixels", [1, 2, 3, 5, 7], 10, "euler")
    assert min(post.train_scales) <= 2.25 <= max(post.train_scales)
    validate(cfg)


def test_digits_laptop_pins_the_demo():
    cfg = compose(["experiment=digits_laptop"])
    assert _pinned(cfg) == {"dataset": "digits", "sampler": "dpmpp2m", "steps": 10, "scales": [0, 1, 3, 7],
                            "method": "cfg", "num_samples": 500, "postprocess": "none", "cond_drop": 0.1,
                            "train_steps": 1000, "seed": 0}
    assert (cfg.backbone.ch, list(cfg.backbone.ch_mult), cfg.eval.seed) == (24, [1, 2], 1234)
    validate(cfg)
    # the demo is the embedded default: the preset and a bare 'cfgx train' compose the same config
    assert compose(["experiment=digits_laptop"]) == compose([])


def test_command_line_beats_the_preset():
    cfg = compose(["experiment=ddpm_cifar10_cfg", "sampler.steps=50", "guidance=1,3", "eval.num_samples=2048",
                   "backbone.ch=64", "cond_drop=0.2", "train.steps=1000"])
    assert (cfg.sampler.steps, list(cfg.guidance.scales), cfg.eval.num_samples) == (50, [1.0, 3.0], 2048)
    assert (cfg.backbone.ch, cfg.cond_drop.p, cfg.train.steps, cfg.dataset.name) == (64, 0.2, 1000, "cifar10")
    cfg = compose(["experiment=zhao_schwing_cifar10", "postprocess=none", "sampler=dpmpp2m"])
    assert (cfg.postprocess.name, cfg.sampler.name, list(cfg.guidance.scales)) == ("none", "dpmpp2m",
                                                                                 [1, 2.25, 2.5, 2.75])
    cfg = compose(["experiment=digits_laptop", "dataset=mnist"])
    assert cfg.dataset.name == "mnist" and cfg.backbone.ch == 24  # the preset still pins the backbone


def test_unknown_preset_is_one_line():
    with pytest.raises(CfgxError, match=r"unknown experiment 'ddpm_cifar'; valid: ddpm_cifar10_cfg, digits_laptop"):
        compose(["experiment=ddpm_cifar"])


def test_sweep_refuses_a_preset():
    with pytest.raises(CfgxError, match="preset for a new run; train with 'cfgx train experiment=digits_laptop'"):
        check_eval_overrides(["experiment=digits_laptop"])


def test_cfg_job_prints_each_preset(tmp_path):
    """As a user types it; one process for all presets (Hydra's --cfg job prints and exits 0 each time)."""
    want = {"ddpm_cifar10_cfg": "name: cifar10", "zhao_schwing_cifar10": "- 2.25", "digits_laptop": "name: dpmpp2m"}
    script = ("import sys\nfrom cfgx.cli import main\nfor p in sys.argv[1:]:\n    print('=== ' + p, flush=True)\n"
              "    try:\n        main(['train', 'experiment=' + p, '--cfg', 'job'])\n"
              "    except SystemExit as e:\n        assert not e.code, e.code\n")
    out = subprocess.run([sys.executable, "-c", script, *PRESETS], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    printed = dict(part.split("\n", 1) for part in out.stdout.split("=== ")[1:])
    assert sorted(printed) == sorted(PRESETS)
    for preset in PRESETS:
        assert want[preset] in printed[preset] and "experiment" not in printed[preset], preset


def test_an_eval_preset_keeps_the_runs_named_classifier():
    """eval=fid50k replaces the eval block (its counts beat a dataset's); the classifier a run was imported with
    is the run's judge, not part of the protocol, and stays unless the command line names another."""
    from cfgx.config import merge_eval_overrides

    saved = compose(["dataset=digits", "eval.classifier.source=torchvision:resnet50:/w/r50.pth", "eval.num_samples=7"])
    merged = merge_eval_overrides(saved, ["eval=fid50k"])
    assert merged.eval.classifier.source == "torchvision:resnet50:/w/r50.pth" and merged.eval.num_samples == 50000
    assert merge_eval_overrides(saved, ["eval=fid50k", "eval.classifier.source=none"]).eval.classifier.source == "none"
    assert merge_eval_overrides(compose(["dataset=digits"]), ["eval=quick"]).eval.classifier.source == "auto"
