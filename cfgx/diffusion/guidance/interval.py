"""Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024, "Applying guidance in a limited
interval improves sample and distribution quality in diffusion models")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfgx.diffusion.guidance.base import GuidanceRule, Models, Step, cfg_eps, edm_sigma, finite, register
from cfgx.errors import CfgxError


def interval_eps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float,
                 abar: float, lo: float, hi: float | None) -> torch.Tensor:
    """CFG at ``scale`` while sigma_t = sqrt((1 - abar_t) / abar_t) lies in [lo, hi] (``hi=None``:
    unbounded); outside it the conditional prediction alone, one network evaluation."""
    sigma = edm_sigma(abar)
    if lo <= sigma and (hi is None or sigma <= hi):
        return cfg_eps(model, x, t, y, scale)
    return model(x, t, y).float()


@dataclass(frozen=True)
class IntervalOptions:
    sigma: list  # [lo, hi] in EDM noise levels; hi None = unbounded


@register
class Interval(GuidanceRule):
    """Guidance at high noise mostly collapses diversity, at low noise it does little: guide only
    inside [lo, hi], be conditional elsewhere. Inside the interval s = 0 / 1 are CFG's."""

    name = "interval"
    Options = IntervalOptions

    def check(self) -> None:
        sig = self.opts.sigma
        if not (isinstance(sig, (list, tuple)) and len(sig) == 2):
            raise CfgxError(f"guidance.interval.sigma={sig!r} must be [lo, hi]; e.g. "
                            "guidance.interval.sigma=[0.28,5.42]")
        lo = finite("interval", "sigma lo", sig[0])
        if sig[1] is not None:
            hi = finite("interval", "sigma hi", sig[1])
            if not lo < hi:
                raise CfgxError(f"guidance.interval.sigma=[{lo:g}, {hi:g}] is empty: lo must be below hi; "
                                "e.g. guidance.interval.sigma=[0.28,5.42]")
        if lo < 0:
            raise CfgxError(f"guidance.interval.sigma lo={lo:g} must be >= 0 (a noise level)")

    def eps(self, step: Step, m: Models, state: None):
        lo, hi = self.opts.sigma
        return interval_eps(m.model, step.x, step.t, step.y, step.s, step.abar, float(lo),
                            None if hi is None else float(hi))
