"""Discrete-time DDPM noise schedules.

Ho et al. 2020 (linear betas) and Nichol & Dhariwal 2021 (cosine alpha-bar).
Everything downstream (loss, samplers, the exact toy denoiser, classifier
guidance) reads the schedule only through ``alpha_bar`` so a new schedule is a
new subclass-free entry in ``make_betas``.
"""

from __future__ import annotations

import math

import torch


def make_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Betas in float64 for ``kind`` in {"linear", "cosine"}."""
    if kind == "linear":
        # Scaled so the schedule keeps the same end points for any T (improved-DDPM convention).
        scale = 1000.0 / num_steps
        return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = 1 - abar[1:] / abar[:-1]
        # Clipping as in Nichol & Dhariwal: avoids a singular last step.
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; use 'linear' or 'cosine'")


class NoiseSchedule:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t = 0..T-1."""

    def __init__(self, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008) -> None:
        self.kind = kind
        self.num_steps = num_steps
        self.betas = make_betas(kind, num_steps, beta_start, beta_end, cosine_s)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer timesteps ``t`` (any shape), float32 on t's device."""
        return self.alpha_bars.to(t.device)[t.long()].float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise std sqrt(1 - abar_t): the factor linking eps and the score, eps = -sigma * score."""
        return (1.0 - self.alpha_bar(t)).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean data ``x0`` to timestep ``t`` with the given standard-normal ``noise``."""
        abar = self.alpha_bar(t).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    @classmethod
    def from_config(cls, cfg) -> NoiseSchedule:
        return cls(kind=cfg.schedule, num_steps=cfg.num_steps, beta_start=cfg.beta_start,
                   beta_end=cfg.beta_end)
