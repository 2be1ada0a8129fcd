"""Exact-score "networks" for Gaussian-mixture toys.

With the data a ``GaussianMixture`` the ideal denoiser and the ideal noisy
classifier are closed-form, which is how Zhao & Schwing 2025 ("Studying
Classifier(-Free) Guidance From a Classifier-Centric Perspective", arXiv
2503.10638) isolate guidance itself from learning error. Both modules follow
the cfgx contracts, so ``cfg_eps``/``cg_eps`` and the samplers use them as-is.
"""

from __future__ import annotations

import torch
from torch import nn

from cfgx.data.gmm import GaussianMixture
from cfgx.diffusion.schedule import NoiseSchedule


def _abar64(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    # Index the float64 table directly: schedule.alpha_bar() rounds to float32, which at
    # abar ~ 1 - 1e-4 would cost the exact model digits it otherwise has.
    return schedule.alpha_bars.to(t.device)[t.long().reshape(-1)]


class ExactDenoiser(nn.Module):
    """model(x, t, y) -> eps: the exact E[eps | x_t, y] of a mixture (y == num_classes: marginal)."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = self.mixture.eps(x, _abar64(self.schedule, t), y)
        return eps.to(dtype=torch.float32, device=x.device)


class ExactClassifier(nn.Module):
    """classifier(x_t, t) -> logits = exact log p_t(c | x_t); differentiable in x_t for guidance."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = self.mixture.class_log_posterior(x_t, _abar64(self.schedule, t))
        # Cast inside the graph so autograd still reaches x_t; float32 matches learned classifiers.
        return logp.to(torch.float32)
