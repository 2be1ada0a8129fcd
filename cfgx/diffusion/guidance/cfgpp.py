"""CFG++ (Chung et al., ICLR 2025, "CFG++: Manifold-constrained classifier free guidance for diffusion
models"), the DDIM form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cfgx.diffusion.guidance.base import GuidanceRule, Models, Step, cond_uncond, finite, null_labels_like, register
from cfgx.errors import CfgxError


def cfgpp_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise with eps_lam = eps_u + lam * (eps_c - eps_u), lam in [0, 1], but re-noise with the
    *unconditional* eps_u. Returns (eps_lam, eps_u) for DDIM's separate re-noising eps."""
    return eps_u + lam * (eps_c - eps_u), eps_u


def cfgpp_lambda(scale: float, s_at_lambda1: float) -> float:
    """CFG++'s lambda for a row's s: the paper equates lambda in [0, 1] with roughly the usual CFG
    range, so s maps linearly, lambda = s / s_at_lambda1 (s = 0 <-> lambda = 0: unconditional)."""
    return scale / s_at_lambda1


@dataclass(frozen=True)
class CFGPPOptions:
    s_at_lambda1: float  # the s that maps to lambda = 1


@register
class CFGPP(GuidanceRule):
    """lambda = 0 (s = 0) is unconditional DDIM, one evaluation per step; the samplers return
    (eps for x0, eps for re-noising), which only DDIM takes."""

    name = "cfgpp"
    Options = CFGPPOptions
    samplers = ("ddim",)
    schedulable = False

    def check(self) -> None:
        if finite("cfgpp", "s_at_lambda1", self.opts.s_at_lambda1) <= 0:
            raise CfgxError("guidance.cfgpp.s_at_lambda1 must be > 0; e.g. 12.5")

    def check_scales(self, scales: list[float]) -> None:
        top = float(self.opts.s_at_lambda1)
        for s in scales:
            if not 0 <= float(s) <= top:
                raise CfgxError(f"CFG++ needs lambda = s / {top:g} in [0, 1]; s={float(s):g} is outside "
                                f"[0, {top:g}] (raise guidance.cfgpp.s_at_lambda1 or drop that scale)")

    def row_fields(self, s: float) -> dict[str, Any]:
        return {"cfgpp_lambda": cfgpp_lambda(s, float(self.opts.s_at_lambda1))}

    def eps(self, step: Step, m: Models, state: None):
        lam = cfgpp_lambda(step.s, float(self.opts.s_at_lambda1))
        if lam == 0:
            eps_u = m.model(step.x, step.t, null_labels_like(step.y, m.model.num_classes)).float()
            return eps_u, eps_u
        return cfgpp_eps(*cond_uncond(m.model, step.x, step.t, step.y), lam)
