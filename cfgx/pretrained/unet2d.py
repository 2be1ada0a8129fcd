"""diffusers ``UNet2DModel`` with a class embedding (what diffusers' training scripts produce with
``num_class_embeds``), from a local folder, as a cfgx ``Pretrained``.

The folder is ``unet/`` (config.json + weights) with ``scheduler/`` beside it, or a bare UNet folder.
The class table has ``num_class_embeds`` rows; cfgx reads its **last row as the null label** (classes
0..C-1 real, row C = "no class", as a model trained with condition dropout onto an extra row has it).
Prediction from the scheduler's ``prediction_type``: epsilon -> eps, v_prediction -> v, sample -> x0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cfgx.errors import CfgxError
from cfgx.pretrained.adapter import Conventions
from cfgx.pretrained.dit import scheduler_schedule
from cfgx.pretrained.entry import Pretrained
from cfgx.pretrained.weights import load_diffusers_model

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class UNet2DNet(nn.Module):
    """``net(x', t, y)`` around a diffusers UNet2DModel."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample


def prediction_type(folder: Path) -> str:
    path = folder / "scheduler" / "scheduler_config.json"
    kind = "epsilon"
    if path.is_file():
        kind = json.loads(path.read_text()).get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise CfgxError(f"{path}: prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[kind]


def load_unet2d(folder: str | Path, device: torch.device | str = "cpu") -> Pretrained:
    # why: diffusers is the optional [pretrained] extra; only this loader needs it
    from diffusers import UNet2DModel

    folder = Path(folder)
    udir = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = load_diffusers_model(UNet2DModel, udir).to(device).eval()
    c = unet.config
    if not c.num_class_embeds or c.class_embed_type is not None:
        raise CfgxError(f"{udir}: the UNet2DModel has no class table (num_class_embeds with class_embed_type "
                        "None); cfgx guides class-conditional models")
    nc = int(c.num_class_embeds) - 1
    conv = Conventions(prediction_type(folder), "ddpm", num_classes=nc, null_index=nc,
                       schedule=scheduler_schedule(folder))
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return Pretrained(UNet2DNet(unet), conv, shape=(int(c.in_channels), int(size), int(size)))
