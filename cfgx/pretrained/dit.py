"""diffusers ``DiTTransformer2DModel`` + ``AutoencoderKL`` (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers") from a local diffusers folder, as a cfgx ``Pretrained``.

The folder is what ``DiTPipeline.save_pretrained`` writes (``transformer/``, ``vae/``, ``scheduler/``);
weights are read from safetensors only (``use_safetensors=True``: no pickle runs). What the model says
about itself sets its conventions: eps prediction on discrete DDPM time with the scheduler's betas,
learned-variance channels when ``out_channels == 2 * in_channels``, and the null label read from the
model (``num_embeds_ada_norm``: the class-embedding row after the real classes), not the 1000 that
``DiTPipeline`` hard-codes (huggingface/diffusers#13616).

DiTPipeline guides every one of the ``in_channels`` latent channels of eps (its learned-variance half is
dropped before the scheduler step); cfgx's rules act on the same eps, so a cfgx cfg row at scale s is
DiTPipeline's ``guidance_scale=s``. (facebookresearch/DiT's own sample.py guides only the first 3 of the
4 channels; that is not what DiTPipeline does.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfgx.errors import CfgxError
from cfgx.pretrained.adapter import Conventions, LatentCodec
from cfgx.pretrained.entry import Pretrained
from cfgx.pretrained.weights import load_dit_transformer

# diffusers beta_schedule -> cfgx NoiseSchedule kind (cfgx has no scaled_linear: latent SD models only)
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


class DiTNet(nn.Module):
    """``net(x', t, y)`` around a diffusers DiT (its forward takes keywords and returns an output object)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y).sample


class VAEDecoder(nn.Module):
    """``decoder(z) -> image`` around a diffusers AutoencoderKL."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def scheduler_schedule(folder: Path) -> dict[str, Any]:
    """The NoiseSchedule keywords of a diffusers ``scheduler/scheduler_config.json`` (DDPM defaults without one)."""
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    kind = cfg.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise CfgxError(f"{path}: beta_schedule {kind!r} is not supported; cfgx has {', '.join(BETA_SCHEDULES)}")
    n = int(cfg.get("num_train_timesteps", 1000))
    if kind == "linear" and n != 1000:
        raise CfgxError(f"{path}: linear betas over {n} steps (cfgx rescales linear betas to 1000-step end points)")
    return {"kind": BETA_SCHEDULES[kind], "num_steps": n, "beta_start": float(cfg.get("beta_start", 1e-4)),
            "beta_end": float(cfg.get("beta_end", 0.02))}


FAMILIES = ("dit", "sit")


def load_dit(source: str | Path, device: torch.device | str = "cpu", vae: str | Path | None = None,
             family: str = "dit") -> Pretrained:
    """A DiT pipeline folder, a bare transformer folder, or an official DiT/SiT checkpoint file, as a ``Pretrained``.

    ``vae`` names the AutoencoderKL folder where ``source`` has no ``vae/`` beside it (a checkpoint file).
    ``family="sit"``: SiT (Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative Models with
    Scalable Interpolant Transformers") has DiT's architecture and keys but predicts the velocity of the
    linear interpolant x_t = t x_data + (1 - t) noise, called with t in [0, 1] (t = 1: data).
    """
    if family not in FAMILIES:
        raise CfgxError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    # why: diffusers is the optional [pretrained] extra; only this loader needs it
    from diffusers import AutoencoderKL

    source = Path(source)
    folder = source if source.is_dir() else source.parent
    tsrc = source / "transformer" if (source / "transformer").is_dir() else source
    vdir = Path(vae) if vae else (source / "vae" if source.is_dir() and (source / "vae").is_dir() else None)
    transformer = load_dit_transformer(tsrc, device)
    try:
        opts = {"use_safetensors": True, "low_cpu_mem_usage": False}  # no pickle; no accelerate needed
        vae_model = AutoencoderKL.from_pretrained(vdir, **opts).to(device).eval() if vdir is not None else None
    except (OSError, ValueError) as e:
        raise CfgxError(f"cannot load the AutoencoderKL in {vdir} ({str(e).splitlines()[0]}); give the folder "
                        "save_pretrained wrote, with .safetensors weights") from None
    c = transformer.config
    num_classes = int(c.num_embeds_ada_norm)
    learned_sigma = int(c.out_channels) == 2 * int(c.in_channels)
    if family == "sit":
        conv = Conventions("flow", "flow_rev", num_classes=num_classes, null_index=num_classes,
                           learned_sigma=learned_sigma)
    else:
        conv = Conventions("eps", "ddpm", num_classes=num_classes, null_index=num_classes,
                           learned_sigma=learned_sigma, schedule=scheduler_schedule(folder))
    codec = None
    if vae_model is not None:
        codec = LatentCodec(VAEDecoder(vae_model), scale=float(vae_model.config.scaling_factor),
                            shift=float(getattr(vae_model.config, "shift_factor", None) or 0.0))
    return Pretrained(DiTNet(transformer), conv, codec=codec,
                      shape=(int(c.in_channels), int(c.sample_size), int(c.sample_size)))
