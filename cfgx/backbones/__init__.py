"""Backbone registry: to add a network, write a module and a ``build`` branch here.

``configs/backbone/`` has one YAML per preset; its ``name`` picks the builder.
"""

from __future__ import annotations

import copy

import torch

from cfgx.backbones.exact import ExactDenoiser
from cfgx.backbones.unet import UNet
from cfgx.data.base import DatasetBundle
from cfgx.errors import CfgxError
from cfgx.pretrained.load import load_pretrained

BACKBONES = ("unet", "exact", "pretrained")


def build_backbone(cfg, data: DatasetBundle, schedule=None) -> torch.nn.Module:
    """Instantiate the denoiser ``eps(x, t, y)`` described by a ``backbone`` config entry."""
    if cfg.name == "unet":
        if not data.is_image:
            raise CfgxError(f"backbone=unet needs an image dataset, {data.name!r} is not one; "
                            "use backbone=exact (or an MLP) for toy data")
        return UNet(in_channels=data.shape[0], resolution=data.shape[-1], num_classes=data.num_classes,
                    ch=int(cfg.ch), ch_mult=tuple(cfg.ch_mult), num_res_blocks=int(cfg.num_res_blocks),
                    attn_resolutions=tuple(cfg.attn_resolutions), dropout=float(cfg.dropout),
                    heads=int(cfg.get("heads", 1)))
    if cfg.name == "exact":
        if "mixture" not in data.extra:
            raise CfgxError(f"backbone=exact needs an analytic dataset (gmm1d, gmm2d), not "
                            f"{data.name!r}; pick dataset=gmm1d or a trainable backbone")
        return ExactDenoiser(data.extra["mixture"], schedule)
    if cfg.name == "pretrained":  # written by cfgx import (cfgx/pretrained/)
        return load_pretrained(cfg, data, schedule)
    raise CfgxError(f"unknown backbone {cfg.name!r}; valid: {', '.join(BACKBONES)}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_label_dependence(model: torch.nn.Module, shape: tuple[int, ...], device="cpu") -> None:
    """Fail loudly if the network ignores its class label.

    diffusers#5330 shipped a 'conditional' model whose output did not depend on
    the label. A freshly initialised U-Net zero-initialises its residual and
    output layers (so it starts as an identity-ish map that ignores *everything*),
    so the check runs on a copy with every parameter jittered: that tests the
    wiring, which is what goes wrong.
    """
    probe = copy.deepcopy(model).to(device).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
        x = torch.randn((2, *shape), generator=g).to(device)
        t = torch.tensor([10, 10], device=device)
        nc = model.num_classes
        a = probe(x, t, torch.tensor([0, 0], device=device))
        b = probe(x, t, torch.tensor([min(1, nc - 1), nc], device=device))
    if torch.allclose(a, b, rtol=1e-5, atol=1e-7):
        raise CfgxError("self-check failed: the backbone's output does not depend on the class label "
                        "(the class embedding is not wired in); fix the backbone before training")
