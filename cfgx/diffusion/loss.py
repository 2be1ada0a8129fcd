"""Training objectives. One small class per formulation, its paper in the docstring."""

from __future__ import annotations

import torch

from cfgx.diffusion.schedule import NoiseSchedule


def drop_labels(y: torch.Tensor, p: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the reserved null index ``num_classes`` with probability ``p``."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


class EpsLoss:
    """eps-prediction MSE (Ho et al. 2020) with condition dropout (Ho & Salimans 2022).

    Dropping the label to the null index with probability ``cond_drop`` trains the
    conditional and unconditional models as one network, which CFG needs.
    """

    def __init__(self, schedule: NoiseSchedule, cond_drop: float) -> None:
        self.schedule = schedule
        self.cond_drop = cond_drop

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        y_in = drop_labels(y, self.cond_drop, model.num_classes, generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        return (model(x_t, t, y_in).float() - noise).pow(2).mean()
