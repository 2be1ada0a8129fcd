"""Config composition, CLI shorthand and validation."""

from __future__ import annotations

import pytest

from cfgx.config import compose, config_hash, normalize_overrides, parse_scales, validate
from cfgx.errors import CfgxError


@pytest.mark.parametrize("text,expected", [
    ("0,1,3,7", [0.0, 1.0, 3.0, 7.0]),
    ("[0,1,3,7]", [0.0, 1.0, 3.0, 7.0]),
    ("1.5", [1.5]),
    ("0, 2.25 ,1e1", [0.0, 2.25, 10.0]),
    ("-1,0", [-1.0, 0.0]),
])
def test_parse_scales(text, expected):
    assert parse_scales(text) == expected


@pytest.mark.parametrize("text", ["0,a", "nan", "0,inf", "", "[]", "1,,x"])
def test_parse_scales_rejects(text):
    with pytest.raises(CfgxError):
        parse_scales(text)


def test_guidance_shorthand_is_a_list_not_a_multirun():
    assert normalize_overrides(["guidance=0,1,3,7"]) == ["guidance.scales=[0.0,1.0,3.0,7.0]"]
    assert normalize_overrides(["guidance.scales=[0,1]"]) == ["guidance.scales=[0.0,1.0]"]
    # A preset name stays a group choice.
    assert normalize_overrides(["guidance=fine"]) == ["guidance=fine"]
    cfg = compose(["guidance=0,1,3,7"])
    assert list(cfg.guidance.scales) == [0, 1, 3, 7]
    cfg = compose(["guidance=fine"])
    assert 1.5 in list(cfg.guidance.scales)


def test_cond_drop_shorthand():
    assert normalize_overrides(["cond_drop=0,0.1,0.2"]) == ["cond_drop.p=0,0.1,0.2"]
    assert compose(["cond_drop=0.2"]).cond_drop.p == 0.2
    assert compose(["cond_drop=ho2022"]).cond_drop.p == 0.2


def test_default_is_digits_tiny():
    cfg = compose([])
    assert cfg.dataset.name == "digits" and cfg.backbone.ch == 24 and cfg.eval.num_samples == 500
    assert list(cfg.guidance.scales) == [0, 1, 3, 7]
    validate(cfg)


def test_dataset_selects_its_recipe_and_user_overrides_win():
    cfg = compose(["dataset=cifar10"])
    assert cfg.backbone.ch == 128 and list(cfg.backbone.ch_mult) == [1, 2, 2, 2] and cfg.eval.num_samples == 10000
    assert list(cfg.backbone.attn_resolutions) == [16] and cfg.backbone.dropout == 0.1
    assert cfg.train.batch_size == 128 and cfg.train.lr == 2e-4 and cfg.train.ema_decay == 0.9999
    cfg = compose(["dataset=cifar10", "backbone=tiny", "train.steps=7", "train.batch_size=32"])
    assert cfg.backbone.ch == 24 and cfg.train.steps == 7 and cfg.train.batch_size == 32
    assert compose(["dataset=mnist"]).backbone.ch == 64


@pytest.mark.parametrize("overrides,needle", [
    (["dataset=cifar11"], "valid: cifar10"),
    (["backbone=huge"], "valid: ddpm_cifar"),
    (["sampler=euler"], "valid: ddim, ddpm, dpmpp2m"),
    (["train.stepz=3"], "train.stepz"),
])
def test_unknown_choice_or_key_names_the_valid_ones(overrides, needle):
    with pytest.raises(CfgxError, match=needle):
        compose(overrides)


@pytest.mark.parametrize("overrides,needle", [
    (["cond_drop=1.0"], "outside"),
    (["cond_drop=-0.1"], "outside"),
    (["train.steps=0"], "train.steps"),
    (["train.batch_size=-4"], "train.batch_size"),
    (["train.steps=abc"], "not a number"),
    (["guidance.method=magic"], "guidance.method"),
    (["sampler.steps=5000"], "exceeds"),
    (["eval.seed_blocks=0"], "eval.seed_blocks=0 must be a positive integer"),
    (["eval.pr_k=-1"], "eval.pr_k"),
    (["eval.inception_batch_size=0"], "eval.inception_batch_size=0 must be a positive integer or auto"),
    (["eval.inception_batch_size=big"], "eval.inception_batch_size='big' must be"),
])
def test_validate_rejects(overrides, needle):
    with pytest.raises(CfgxError, match=needle):
        validate(compose(overrides))


def test_config_hash_tracks_training_not_eval():
    a, b = compose([]), compose(["guidance=0,2", "eval.num_samples=10"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose(["cond_drop=0.2"]))


def test_digits_recipe_samples_with_dpmpp2m_and_a_typed_sampler_brings_its_own_steps():
    # The digits default was picked by measurement (README 'Sampler and steps'); a sampler typed on
    # the command line must not inherit the recipe's step count.
    assert dict(compose([]).sampler) == {"name": "dpmpp2m", "steps": 10, "eta": 0.0, "variance": "fixed_small"}
    assert compose(["sampler=ddim"]).sampler.steps == 50
    assert compose(["sampler=ddim", "sampler.steps=25"]).sampler.steps == 25
    assert compose(["dataset=mnist"]).sampler.name == "ddim"
