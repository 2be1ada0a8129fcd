"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance")."""

from __future__ import annotations

from cfgx.diffusion.guidance.base import GuidanceRule, Models, Step, cfg_eps, register


@register
class CFG(GuidanceRule):
    """eps = eps(x, null) + s (eps(x, c) - eps(x, null)): s = 0 is the unconditional prediction and
    s = 1 the conditional one, each one network evaluation; other scales one batch of 2B."""

    name = "cfg"

    def eps(self, step: Step, m: Models, state: None):
        return cfg_eps(m.model, step.x, step.t, step.y, step.s)
