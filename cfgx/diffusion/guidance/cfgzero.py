"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved classifier-free guidance for flow matching models"),
the optimised scale."""

from __future__ import annotations

import torch

from cfgx.diffusion.guidance.base import GuidanceRule, Models, Step, cond_uncond, register


def cfg_zero_star_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, scale: float) -> torch.Tensor:
    """Project the conditional prediction onto the unconditional one, alpha* = <eps_c, eps_u> / ||eps_u||^2
    per sample, and guide from alpha* eps_u: eps = alpha* eps_u + s (eps_c - alpha* eps_u)."""
    dims = tuple(range(1, eps_c.dim()))
    c, u = eps_c.double(), eps_u.double()
    alpha = (c * u).sum(dim=dims, keepdim=True) / (u * u).sum(dim=dims, keepdim=True).clamp_min(1e-12)
    base = alpha * u
    return (base + scale * (c - base)).float()


@register
class CFGZeroStar(GuidanceRule):
    """s = 1 is the conditional prediction, s = 0 alpha* eps_u (not eps_u): both computed from the
    2B batch. The paper's second ingredient, zeroing the first steps' velocity, is specific to flow
    matching (v = 0 leaves x unchanged); an eps = 0 step of a VP sampler is not a no-op, so it is not used."""

    name = "cfgzero"

    def eps(self, step: Step, m: Models, state: None):
        return cfg_zero_star_eps(*cond_uncond(m.model, step.x, step.t, step.y), step.s)
