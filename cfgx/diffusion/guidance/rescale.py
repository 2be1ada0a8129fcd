"""Guidance rescale (Lin et al., WACV 2024, "Common diffusion noise schedules and sample steps are
flawed", Sec. 3.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfgx.diffusion.guidance.base import (
    GuidanceRule,
    Models,
    Step,
    cond_uncond,
    eps_plus_x0_delta,
    finite,
    register,
    x0_of,
)
from cfgx.errors import CfgxError


def rescale_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, x: torch.Tensor, abar: float, scale: float,
                phi: float, space: str = "x0") -> torch.Tensor:
    """Rescale the CFG prediction to the per-sample standard deviation of the conditional one, then
    mix, x = phi * x_cfg * std(x_c) / std(x_cfg) + (1 - phi) * x_cfg.

    The paper rescales the x0 prediction (``space="x0"``, default); diffusers' ``guidance_rescale``
    rescales eps (``space="eps"``). phi = 0 is CFG exactly; the paper recommends phi = 0.7.
    """
    eps_cfg = eps_u + scale * (eps_c - eps_u)
    dims = tuple(range(1, x.dim()))
    if space == "eps":
        pos, cfg = eps_c.double(), eps_cfg.double()
    else:
        pos, cfg = x0_of(x.double(), eps_c.double(), abar), x0_of(x.double(), eps_cfg.double(), abar)
    # The std ratio does not depend on Bessel's correction; correction=0 keeps one-element samples
    # (1-D toys) defined, where both stds are 0 and rescaling is the identity.
    sd_pos, sd_cfg = pos.std(dim=dims, keepdim=True, correction=0), cfg.std(dim=dims, keepdim=True, correction=0)
    factor = torch.where(sd_cfg > 0, sd_pos / sd_cfg.clamp_min(1e-300), torch.ones_like(sd_cfg))
    delta = phi * (factor - 1.0) * cfg  # phi * x_rescaled + (1 - phi) * x_cfg - x_cfg
    if space == "eps":
        return (eps_cfg.double() + delta).float()
    return eps_plus_x0_delta(eps_cfg, delta, abar)


@dataclass(frozen=True)
class RescaleOptions:
    phi: float   # mix weight of the rescaled prediction (0 = plain CFG)
    space: str   # x0 (the paper) | eps (diffusers' guidance_rescale)


@register
class Rescale(GuidanceRule):
    """At s = 1 x_cfg is x_c, whose std is its own: the rescale is the identity and the conditional
    prediction (one evaluation) is exact. At s = 0 the formula rescales the unconditional prediction to
    the conditional one's std, which is not the unconditional model: computed, not short-cut."""

    name = "rescale"
    Options = RescaleOptions

    def check(self) -> None:
        phi = finite("rescale", "phi", self.opts.phi)
        if not 0 <= phi <= 1:
            raise CfgxError(f"guidance.rescale.phi={phi:g} is outside [0, 1]; the paper uses 0.7 (0 = plain CFG)")
        if self.opts.space not in ("x0", "eps"):
            raise CfgxError(f"guidance.rescale.space={self.opts.space!r}; valid: x0, eps")

    def eps(self, step: Step, m: Models, state: None):
        if step.s == 1.0:
            return m.model(step.x, step.t, step.y).float()
        eps_c, eps_u = cond_uncond(m.model, step.x, step.t, step.y)
        return rescale_eps(eps_c, eps_u, step.x, step.abar, step.s, float(self.opts.phi), str(self.opts.space))
