"""Autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of itself")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cfgx.diffusion.guidance.base import GuidanceRule, Models, Prepared, RuleEnv, Step, register
from cfgx.errors import CfgxError
from cfgx.store.checkpoints import load_ema_model, load_snapshot_model
from cfgx.store.rundir import load_run_config, read_meta, resolve_run


def autoguidance_eps(good: torch.nn.Module, bad: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor, scale: float) -> torch.Tensor:
    """D = D_bad(x|c) + s (D_good(x|c) - D_bad(x|c)), both conditional; eps is affine in D, so the
    same combination holds for eps. s = 1 is the good model alone, s = 0 the bad one (1 evaluation);
    otherwise two (different networks, so no 2B batch)."""
    if scale == 1:
        return good(x, t, y).float()
    if scale == 0:
        return bad(x, t, y).float()
    e_bad = bad(x, t, y).float()
    e_good = good(x, t, y).float()
    return e_bad + scale * (e_good - e_bad)


@dataclass(frozen=True)
class AutoguidanceOptions:
    guide: str | None  # step:N (EMA snapshot N of this run) | run:PATH (another run of the same dataset)


def load_guide(guide: str, env: RuleEnv) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The guide model of ``step:N`` or ``run:PATH``, and the row fields naming it."""
    cfg, data = env.cfg, env.data
    kind, _, arg = guide.partition(":")
    if kind == "step":
        model = load_snapshot_model(env.run_dir, cfg, data, env.schedule, env.device, int(arg))
        return model, {"guide": guide, "guide_step": int(arg), "guide_run": str(env.run_dir)}
    other = resolve_run(arg, Path(str(cfg.paths.runs)))
    ocfg = OmegaConf.create(load_run_config(other))
    if ocfg.dataset.name != data.name:
        raise CfgxError(f"guidance.autoguidance.guide={guide} is a run of dataset {ocfg.dataset.name}, this run is "
                        f"of {data.name}; guide with a run of the same dataset")
    if OmegaConf.to_container(ocfg.diffusion) != OmegaConf.to_container(cfg.diffusion):
        raise CfgxError(f"guidance.autoguidance.guide={guide} uses another noise schedule (diffusion.*); guide with "
                        "a run trained with the same diffusion settings")
    model, step = load_ema_model(other, ocfg, data, env.schedule, env.device)
    return model, {"guide": guide, "guide_step": step, "guide_run": str(other),
                   "guide_config_hash": read_meta(other).get("config_hash")}


@register
class Autoguidance(GuidanceRule):
    """The guide is a weaker model of the same task (an earlier EMA snapshot or a smaller run)."""

    name = "autoguidance"
    Options = AutoguidanceOptions
    needs = ("guide",)

    def check(self) -> None:
        g = self.opts.guide
        if not (isinstance(g, str) and (g.startswith("run:") and len(g) > 4 or re.fullmatch(r"step:\d+", g))):
            raise CfgxError(f"guidance.autoguidance.guide={g!r}; give step:N (an EMA snapshot of this run, see "
                            "train.snapshot_every) or run:PATH (another run of the same dataset)")

    def prepare(self, env: RuleEnv) -> Prepared:
        guide, info = load_guide(str(self.opts.guide), env)
        return Prepared(self, self.tag(), {**self.info(), **info}, guide=guide)

    def eps(self, step: Step, m: Models, state: None):
        return autoguidance_eps(m.model, m.guide, step.x, step.t, step.y, step.s)
