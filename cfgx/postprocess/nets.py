"""Velocity networks v(z, t, c) of the flow postprocessor: the run's U-Net for images, an MLP for vectors."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from cfgx.backbones import build_backbone
from cfgx.backbones.unet import UNet, timestep_embedding
from cfgx.config import config_dir
from cfgx.data.base import DatasetBundle
from cfgx.errors import CfgxError
from cfgx.postprocess.settings import FlowSettings


class VelocityMLP(nn.Module):
    """v(z, t, c) for vector data: an MLP on [z, time embedding, class embedding]."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, depth: int = 3, t_scale: float = 1000.0,
                 emb_dim: int = 64) -> None:
        super().__init__()
        self.num_classes, self.t_scale, self.emb_dim = num_classes, float(t_scale), emb_dim
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        # Zero output: the untrained postprocessor is the identity map, never a random kick.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, timestep_embedding(t * self.t_scale, self.emb_dim), self.label_emb(y)], dim=-1)
        return self.out(self.body(h))


class VelocityUNet(nn.Module):
    """v(z, t, c) for images: the cfgx U-Net with flow time t in [0, 1] scaled into its timestep embedding."""

    def __init__(self, unet: nn.Module, t_scale: float = 1000.0) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = unet.num_classes
        self.t_scale = float(t_scale)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t * self.t_scale, y)


def _reinitialise(unet: UNet) -> None:
    """A fresh U-Net of the same shape: its constructor arguments are not stored, so re-run the
    per-module initialisers and re-zero the layers UNet zero-initialises."""
    for m in unet.modules():
        if hasattr(m, "reset_parameters") and m is not unet:
            m.reset_parameters()
    for name, m in unet.named_modules():
        if name.endswith("conv2") or name.endswith("proj") or name == "out":
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


def velocity_unet_config(run_backbone: Mapping[str, Any] | None, preset: str | None,
                         init: str) -> Mapping[str, Any] | None:
    """The velocity U-Net's config: the run's own backbone, or for an imported model a ``configs/backbone``
    preset (``postprocess.unet``). An imported network (a DiT, a py: factory) is not a U-Net the flow
    can copy, and sizing one for the user would hide a choice that decides what the flow can learn."""
    if run_backbone is None or run_backbone.get("name") != "pretrained":
        if preset:
            raise CfgxError(f"postprocess.unet={preset} applies to imported models only; this run's flow uses its "
                            "own U-Net: drop postprocess.unet")
        return run_backbone
    presets = sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml")
                     if OmegaConf.load(p).get("name") == "unet")
    if not preset or init != "scratch":
        raise CfgxError("an imported model is not a U-Net the flow postprocessor can copy; give the flow its own: "
                        f"postprocess.init=scratch postprocess.unet=<{'|'.join(presets)}> (a configs/backbone preset)")
    if preset not in presets:
        raise CfgxError(f"postprocess.unet={preset} is not a U-Net preset; valid: {', '.join(presets)}")
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "backbone" / f"{preset}.yaml"))


def build_velocity_net(data: DatasetBundle, cfg: FlowSettings | Mapping[str, Any] | None,
                       init_from: nn.Module | None = None,
                       backbone_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """The velocity network v(z, t, c) of the postprocessor (``cfg``: its settings, or a config of them).

    Images: a U-Net with the run's architecture (``backbone_cfg``, the run's
    ``backbone`` config entry, or a copy of ``init_from``'s). With
    ``init == "run"`` and ``init_from`` (the run's EMA denoiser) its weights
    are copied and the output conv re-zeroed: the features of the trained
    denoiser are reused while the untrained flow starts as the identity map (an
    eps-predictor's output would otherwise be a unit-scale kick on every sample).
    Vector data: ``VelocityMLP`` from scratch (toy denoisers have no weights to reuse).
    """
    st = FlowSettings.from_config(cfg)
    if st.init not in ("run", "scratch"):
        raise CfgxError(f"postprocess.init must be 'run' or 'scratch', got {st.given['init']!r}")
    if not data.is_image:
        return VelocityMLP(data.shape[0], data.num_classes, st.mlp_hidden, st.mlp_depth, st.t_scale)
    if backbone_cfg is not None:
        unet = build_backbone(OmegaConf.create(dict(backbone_cfg)), data)
    elif isinstance(init_from, UNet):
        unet = copy.deepcopy(init_from)
        if st.init == "scratch":
            _reinitialise(unet)
    else:
        raise CfgxError("an image postprocessor needs the run's backbone config or its U-Net to copy; pass "
                        "backbone_cfg= or init_from=")
    if st.init == "run":
        if init_from is None:
            raise CfgxError("postprocess.init=run needs the run's EMA model; pass init_from= or use "
                            "postprocess.init=scratch")
        unet.load_state_dict(init_from.state_dict())
        nn.init.zeros_(unet.out.weight)
        nn.init.zeros_(unet.out.bias)
    return VelocityUNet(unet, st.t_scale)
