"""Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, "Eliminating oversaturation and
artifacts of high guidance scales in diffusion models", Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfgx.diffusion.guidance.base import (
    GuidanceRule,
    Models,
    Step,
    bshape,
    cond_uncond,
    eps_plus_x0_delta,
    finite,
    register,
    x0_of,
)
from cfgx.errors import CfgxError


class APGState:
    """The running (momentum) update of one batch, carried across its steps."""

    def __init__(self) -> None:
        self.running: torch.Tensor | None = None


def apg_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, x: torch.Tensor, abar: float, scale: float, eta: float,
            norm_threshold: float | None, momentum: float, state: APGState) -> torch.Tensor:
    """On the denoised predictions D_c, D_u (x0 space), per step:
      1. dD = D_c - D_u; with momentum beta (negative in the paper, e.g. -0.5):
         m <- dD + beta * m, dD <- m (``state`` keeps m across the steps of one batch);
      2. norm cap r: dD <- dD * min(1, r / ||dD||) per sample (``norm_threshold=None``: off);
      3. split dD into the part parallel to D_c and the orthogonal rest, keep
         dD_orth + eta * dD_par (eta = 0 drops the parallel part, the paper's cause of oversaturation);
      4. D = D_c + (s - 1) * that.
    With eta = 1, no momentum and no cap it is CFG.
    """
    eps_cfg = eps_u + scale * (eps_c - eps_u)
    x64 = x.double()
    d_c, d_u = x0_of(x64, eps_c.double(), abar), x0_of(x64, eps_u.double(), abar)
    raw = d_c - d_u
    diff = raw
    if momentum != 0.0:
        state.running = diff if state.running is None else diff + momentum * state.running
        diff = state.running
    dims = tuple(range(1, x.dim()))
    if norm_threshold is not None and norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1).clamp_min(1e-12)
        diff = diff * bshape(torch.clamp(norm_threshold / norm, max=1.0), diff)
    unit = d_c / bshape(d_c.flatten(1).norm(dim=1).clamp_min(1e-12), d_c)
    par = (diff * unit).sum(dim=dims, keepdim=True) * unit
    update = (diff - par) + eta * par
    # D_apg - D_cfg, with D_cfg = D_c + (s - 1) * raw in exact arithmetic.
    delta = (scale - 1.0) * (update - raw)
    return eps_plus_x0_delta(eps_cfg, delta, abar)


@dataclass(frozen=True)
class APGOptions:
    eta: float                    # weight of the update's part parallel to D_c (1 = CFG's)
    norm_threshold: float | None  # r: cap on the per-sample update norm (None = no cap)
    momentum: float               # beta: momentum on the update (0 = none)


@register
class APG(GuidanceRule):
    """D = D_c + (s - 1) * (projected, capped, momentum-averaged D_c - D_u). At s = 1 that is D_c
    whatever the update, so a constant s = 1 is the conditional prediction (one evaluation). At
    s = 0 it is D_c minus the update, not D_u: computed. Under a weight schedule every step is
    computed, so the momentum sees every step (the first one's weight is 0)."""

    name = "apg"
    Options = APGOptions

    def check(self) -> None:
        finite("apg", "eta", self.opts.eta)
        beta = finite("apg", "momentum", self.opts.momentum)
        if not -1 < beta < 1:
            raise CfgxError(f"guidance.apg.momentum={beta:g} must be in (-1, 1); the paper uses -0.5")
        r = self.opts.norm_threshold
        if r is not None and finite("apg", "norm_threshold", r) <= 0:
            raise CfgxError(f"guidance.apg.norm_threshold={r!r} must be > 0, or null for no cap")

    def new_state(self) -> APGState:
        return APGState()

    def eps(self, step: Step, m: Models, state: APGState):
        if step.s == 1.0 and self.schedule == "constant":
            return m.model(step.x, step.t, step.y).float()
        eps_c, eps_u = cond_uncond(m.model, step.x, step.t, step.y)
        o = self.opts
        return apg_eps(eps_c, eps_u, step.x, step.abar, step.s, float(o.eta), o.norm_threshold, float(o.momentum),
                       state)
