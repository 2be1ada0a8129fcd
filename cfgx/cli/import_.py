"""``cfgx import model=SOURCE [vae=DIR] [family=dit|sit] [guide_channels=K] dataset.root=REF``: a run dir for an
external model (``guide_channels=3``: guide only the first 3 latent channels, DiT/SiT's published protocol).

SOURCE is a diffusers DiT folder (DiTPipeline.save_pretrained), an official DiT checkpoint file (with
``vae=`` the AutoencoderKL folder), or ``py:package.module:factory``; REF is
the reference image folder (one sub-folder per model class, in class-index order) that the metrics
compare samples with. No evaluation classifier unless one is named (``eval.classifier.source=
torchvision:ARCH:PATH``, or ``own`` to train cfgx's on a small reference folder): its columns then stay
empty. The run dir holds config.yaml (the ``backbone: pretrained`` block naming the source), meta.json
(the weights' sha256, the model's conventions; ``train_finished`` so it is a default sweep target) and
nothing else, so ``cfgx sweep``, ``cfgx report`` and torchrun sweeps run on it as on a trained run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cfgx.cli.common import console as make_console
from cfgx.config import compose, config_hash, normalize_overrides, validate
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.metrics.torchvision_classifier import load_torchvision_classifier, parse_source
from cfgx.pretrained.entry import PREFIX, Pretrained
from cfgx.pretrained.load import open_source, weights_sha256
from cfgx.store.rundir import new_run_dir, provenance

MODEL_KEYS = ("model", "vae", "family", "guide_channels")  # what cfgx import reads itself; the rest is config


def _split(args: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(model source, {vae, family, guide_channels}, config overrides)."""
    overrides = normalize_overrides(args)
    mine = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in MODEL_KEYS}
    rest = [o for o in overrides if o.split("=", 1)[0] not in MODEL_KEYS]
    if not mine.get("model"):
        raise CfgxError("cfgx import needs model=SOURCE: a diffusers DiT folder or py:package.module:factory, "
                        "e.g. cfgx import model=./DiT-XL-2-256 dataset.root=./imagenet-val-256")
    if not any(o.startswith("dataset.root=") for o in rest):
        raise CfgxError("cfgx import needs dataset.root=PATH: the reference image folder (<root>/<class>/<image>) "
                        "or an ADM-format .npz batch (arr_0 images, arr_1 labels) at the model's resolution")
    src = mine["model"]
    src = src if src.startswith(PREFIX) else str(Path(src).expanduser().resolve())
    k = mine.get("guide_channels")
    if k is not None and not (k.isdigit() and int(k) > 0):
        raise CfgxError(f"guide_channels={k} is not a positive integer; DiT/SiT's published protocol guides 3 "
                        "(guide_channels=3)")
    opts = {"vae": str(Path(mine["vae"]).expanduser().resolve()) if mine.get("vae") else None,
            "family": mine.get("family", "dit"), "guide_channels": int(k) if k else None}
    return src, opts, rest


def _image_shape(pre: Pretrained) -> tuple[int, ...]:
    """(C, H, W) of the model's images: its decoder's output on one latent, or its own sample shape."""
    if pre.shape is None:
        raise CfgxError("the model does not say the shape it samples; set shape=(C, H, W) in its Pretrained")
    if pre.codec is None:
        return tuple(pre.shape)
    return tuple(pre.codec.decode(torch.zeros(1, *pre.shape)).shape[1:])


def import_config(src: str, opts: dict[str, Any], loader: str, pre: Pretrained, rest: list[str]) -> DictConfig:
    """The run's config: an image-folder or .npz reference at the model's resolution, the model's schedule and
    sampler."""
    c, h, _ = _image_shape(pre)
    root = next(o.split("=", 1)[1] for o in rest if o.startswith("dataset.root="))
    kind = "npz" if root.endswith(".npz") else "imagefolder"  # an ADM-format batch, or a class-per-folder tree
    cfg = compose([f"dataset={kind}", f"dataset.resolution={h}", f"dataset.channels={c}", *rest])
    conv = pre.conventions
    with open_dict(cfg):
        if kind == "npz" and cfg.dataset.num_classes is None:  # a batch may miss the top label: the model knows
            cfg.dataset.num_classes = int(conv.num_classes)
        if not any(o.startswith("eval.classifier.source=") for o in rest):
            cfg.eval.classifier.source = "none"  # cfgx's own would train on the reference set (ImageNet): name one
        cfg.backbone = OmegaConf.create({"name": "pretrained", "source": src, "loader": loader, **opts})
        if conv.time == "ddpm":  # sample on the model's own timesteps: the adapter's time map is then the identity
            sched = conv.schedule
            cfg.diffusion.schedule, cfg.diffusion.num_steps = sched["kind"], int(sched["num_steps"])
            cfg.diffusion.beta_start = float(sched.get("beta_start", 1e-4))
            cfg.diffusion.beta_end = float(sched.get("beta_end", 0.02))
        if loader == "dit" and conv.time == "ddpm" and not any(o.startswith("sampler.spacing=") for o in rest):
            cfg.sampler.spacing = "leading"  # DiTPipeline's DDIMScheduler default: rows comparable with it
    validate(cfg)
    return cfg


def cmd_import(args: list[str]) -> int:
    src, opts, rest = _split(args)
    con = make_console()
    pre, loader = open_source(src, vae=opts["vae"], family=opts["family"])
    cfg = import_config(src, opts, loader, pre, rest)
    data = build_dataset(cfg.dataset)
    if data.num_classes != pre.conventions.num_classes:
        what = "classes (largest label + 1)" if data.name == "npz" else "class folders"
        raise CfgxError(f"the model has {pre.conventions.num_classes} classes but {cfg.dataset.root} has "
                        f"{data.num_classes} {what}; give one class per model class, in class-index order")
    source = parse_source(cfg.eval.classifier.source, pretrained=True)
    if source.kind == "torchvision":  # its file and class count refused now, not at the first sweep
        load_torchvision_classifier(source, data.num_classes, torch.device("cpu"))
        cfg.eval.classifier.source = f"torchvision:{source.arch}:{Path(str(source.path)).resolve()}"  # any cwd
    meta = {"config_hash": config_hash(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": int(cfg.seed), "eval_seed": int(cfg.eval.seed), "dataset": data.name, "train_finished": True,
            "imported": {"source": src, **opts, "loader": loader,
                         "weights_sha256": weights_sha256(src, opts["vae"]),
                         "conventions": dataclasses.asdict(pre.conventions),
                         "latent": pre.codec is not None, "sample_shape": list(pre.shape or [])},
            **provenance(torch.device("cpu"))}
    run_dir = new_run_dir(Path(str(cfg.paths.runs)), data.name, "import", files={
        "config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create([f"model={src}", *rest])),
        "meta.json": json.dumps(meta, indent=2, default=str) + "\n"})
    con.print(f"imported {src} ({pre.conventions.describe()}, {pre.conventions.num_classes} classes, null label "
              f"{pre.conventions.null_index}) as run dir: {run_dir}", markup=False, soft_wrap=True)
    con.print(f"next: cfgx sweep run={run_dir} guidance=1,1.5,4", markup=False, soft_wrap=True)
    return 0
