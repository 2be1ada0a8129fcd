"""The config schema (cfgx/schema.py): derived from every yaml under configs/, one validation pass."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cfgx import schema
from cfgx.config import compose, config_dir, validate
from cfgx.errors import CfgxError


def _yaml_keys() -> set[str]:
    """Every leaf key of every yaml of every group, walked independently of schema.py's own walk."""
    root = config_dir()
    keys: set[str] = set()

    def walk(d, prefix):
        if isinstance(d, dict) and d:
            for k, v in d.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif prefix:
            keys.add(prefix)

    top = OmegaConf.to_container(OmegaConf.load(root / "config.yaml"), resolve=False)
    walk({k: v for k, v in top.items() if k not in ("defaults", "hydra")}, "")
    for f in root.glob("*/*.yaml"):
        d = OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}
        d.pop("defaults", None)
        walk(d, "" if "@package _global_" in f.read_text().splitlines()[0] else f.parent.name)
    return keys


def test_the_schema_knows_every_key_of_every_yaml():
    keys = _yaml_keys()
    known = schema.schema(config_dir())
    assert len(keys) > 100
    assert keys <= set(known), sorted(keys - set(known))
    # Constraint tables name only keys that exist (a renamed key cannot leave a dead rule behind).
    assert set(schema.RANGES) <= set(known), sorted(set(schema.RANGES) - set(known))
    assert set(schema.ALSO) <= set(known), sorted(set(schema.ALSO) - set(known))


def test_types_are_inferred_from_the_defaults():
    known = schema.schema(config_dir())
    assert known["train.steps"] == {"int"}
    assert known["train.lr"] == {"float"}
    assert known["eval.features"] == {"str", "list"}  # 'auto' in eval/default, a list in the experiments
    assert known["train.resume"] == {"bool"}


@pytest.mark.parametrize("key", ["train.steps", "backbone.ch", "eval.classifier.width", "postprocess.k",
                                 "train.lr", "sampler.eta", "train.resume", "diffusion.num_steps",
                                 "guidance.classifier.steps", "dataset.resolution"])
def test_a_bad_type_is_refused_naming_the_key(key):
    cfg = compose(["postprocess=flow"])
    OmegaConf.update(cfg, key, "abc" if key != "train.resume" else 3, force_add=True)
    with pytest.raises(CfgxError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("override,needle", [
    ("train.compile=true", None), ("guidance.method=[cfg,interval]", None), ("guidance.classifier.steps=5", None),
    ("train.grad_clip=null", None), ("eval.features=inception", None), ("train.snapshot_every=10", None),
    ("train.grad_clip=-1", "flips the gradient"), ("diffusion.beta_end=2", "beta_start < beta_end < 1"),
    ("guidance=0,1e6", "beyond +-1000"), ("eval.pr_k=500", "below eval.num_samples=500"),
    ("seed=99999999999999999999999", "numpy's seed range"), ("train.weight_decay=nan", "not finite"),
    ("train.steps=${train.steps}", "does not resolve"), ("device=meta", "holds no data"),
])
def test_ranges_and_cross_key_rules(override, needle):
    cfg = compose([override])
    if needle is None:
        validate(cfg)
    else:
        with pytest.raises(CfgxError, match=needle.replace("+", r"\+")):
            validate(cfg)


def test_every_preset_and_dataset_passes():
    for ds in ("digits", "cifar10", "gmm1d", "gmm2d", "mnist", "svhn"):
        validate(compose([f"dataset={ds}"]))
    for exp in ("ddpm_cifar10_cfg", "digits_laptop", "zhao_schwing_cifar10"):
        validate(compose([f"experiment={exp}"]))
