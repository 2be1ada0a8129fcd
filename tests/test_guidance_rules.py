"""Guidance rules as classes behind one registry: a rule from outside cfgx sweeps like a built-in one,
each rule's own formula decides s = 0 and s = 1, and the sampler pairing is checked in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from conftest import private_copy

from cfgx.backbones.exact import ExactDenoiser
from cfgx.cli import main
from cfgx.config import compose, default_rule, guidance_rules
from cfgx.data.gmm import gmm2d
from cfgx.diffusion.guidance import (
    RULES,
    GuidanceRule,
    GuidedEps,
    Models,
    Step,
    apg_eps,
    cfg_eps,
    cond_uncond,
    register,
    rescale_eps,
)
from cfgx.diffusion.guidance.apg import APGState
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.sample import generate
from cfgx.sweep.rows import load_rows

SCHEDULE = NoiseSchedule("linear", 1000)


@dataclass(frozen=True)
class HalfwayOptions:
    k: float


class Halfway(GuidanceRule):
    """A rule that lives in this test module: CFG at k * s."""

    name = "halfway"
    Options = HalfwayOptions

    def check(self) -> None:
        if not self.opts.k > 0:
            raise CfgxError(f"guidance.halfway.k={self.opts.k} must be > 0")

    def row_fields(self, s: float) -> dict:
        return {"halfway_scale": self.opts.k * s}

    def eps(self, step: Step, m: Models, state: None):
        return cfg_eps(m.model, step.x, step.t, step.y, self.opts.k * step.s)


@pytest.fixture
def halfway():
    register(Halfway)
    yield Halfway
    RULES.pop("halfway")


def test_a_rule_registered_from_outside_cfgx_sweeps_like_a_builtin(halfway, tiny_run, tmp_path_factory, cache_dir):
    run = private_copy(tiny_run, tmp_path_factory, "halfway")
    assert main(["sweep", f"run={run}", "guidance.method=[halfway,cfg]", "+guidance.halfway.k=0.5",
                 "guidance=2"]) == 0
    rows = {r["method"]: r for r in load_rows(run) if r["s"] == 2.0 or r["method"] == "halfway"}
    assert rows["halfway"]["halfway_scale"] == 1.0 and rows["halfway"]["guidance_options"] == '{"k": 0.5}'
    # halfway at s = 2 is CFG at s = 1: the same samples, so the same numbers as the cfg row at s = 1.
    assert main(["sweep", f"run={run}", "guidance=1"]) == 0
    cfg1 = next(r for r in load_rows(run) if r["method"] == "cfg" and r["s"] == 1.0)
    for col in ("accuracy", "fd_classifier", "precision", "recall", "nfe"):
        assert rows["halfway"][col] == cfg1[col], col


def test_a_registered_rule_is_validated_like_a_builtin(halfway):
    with pytest.raises(CfgxError, match="guidance.halfway.k=-1 must be > 0"):
        guidance_rules(compose(["guidance.method=halfway", "+guidance.halfway.k=-1"]))
    with pytest.raises(CfgxError, match="guidance.halfway.k is not set"):
        guidance_rules(compose(["guidance.method=halfway"]))
    with pytest.raises(CfgxError, match="has no option 'j'"):
        guidance_rules(compose(["guidance.method=halfway", "+guidance.halfway.k=1", "+guidance.halfway.j=1"]))


def _one_step(rule: GuidanceRule, s: float, ti: int = 500):
    mix = gmm2d(num_classes=3, components_per_class=2, std=0.25)
    den = ExactDenoiser(mix, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, generator=g), torch.arange(64) % 3
    t = torch.full((64,), ti, dtype=torch.long)
    sampler = build_sampler("ddim", SCHEDULE, 20, clip_x0=None)
    got = GuidedEps(rule, Models(den), y, s, sampler)(x, t)
    return got, den, x, t, y, float(SCHEDULE.alpha_bars[ti])


def test_rescale_at_s0_is_its_own_formula_and_s1_is_conditional():
    rule = default_rule("rescale")
    got, den, x, t, y, abar = _one_step(rule, 0.0)
    ec, eu = cond_uncond(den, x, t, y)
    torch.testing.assert_close(got, rescale_eps(ec, eu, x, abar, 0.0, 0.7), rtol=0, atol=0)
    assert (got - eu).abs().max() > 1e-3  # not the unconditional prediction
    one, *_ = _one_step(rule, 1.0)
    torch.testing.assert_close(one, den(x, t, y).float(), rtol=0, atol=0)


def test_apg_at_s0_is_its_own_formula():
    got, den, x, t, y, abar = _one_step(default_rule("apg"), 0.0)
    ec, eu = cond_uncond(den, x, t, y)
    torch.testing.assert_close(got, apg_eps(ec, eu, x, abar, 0.0, 0.0, None, -0.5, APGState()), rtol=0, atol=0)
    assert (got - eu).abs().max() > 1e-3


def test_a_schedules_first_step_still_updates_apgs_momentum():
    """cfg@linear's first weight is exactly 0; APG's running update must still see that step."""
    mix = gmm2d(num_classes=3, components_per_class=2, std=0.25)
    den = ExactDenoiser(mix, SCHEDULE)
    sampler = build_sampler("ddim", SCHEDULE, 4, clip_x0=None)
    y = torch.arange(8) % 3
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    fn = GuidedEps(default_rule("apg@linear"), Models(den), y, 3.0, sampler)
    state = APGState()
    for i, ti in enumerate(sampler.timesteps[:2]):
        t = torch.full((8,), ti, dtype=torch.long)
        s_i = 2 * 3.0 * i / 3
        abar = float(SCHEDULE.alpha_bars[ti])
        want = apg_eps(*cond_uncond(den, x, t, y), x, abar, s_i, 0.0, None, -0.5, state)
        torch.testing.assert_close(fn(x, t), want, rtol=0, atol=0)
    assert state.running is not None and fn.state.running is not None


def test_cfgpp_with_a_sampler_it_is_not_defined_for_is_one_clear_error():
    mix = gmm2d(num_classes=3, components_per_class=2, std=0.25)
    den = ExactDenoiser(mix, SCHEDULE)
    for name in ("dpmpp2m", "ddpm"):
        smp = build_sampler(name, SCHEDULE, 5, clip_x0=None)
        with pytest.raises(CfgxError, match=f"guidance.method=cfgpp is defined for ddim only, not sampler={name}"):
            generate(den, smp, (2,), torch.arange(6) % 3, 3.0, seed=0, batch_size=6, device=torch.device("cpu"),
                     rule=default_rule("cfgpp"))


def test_every_rule_names_its_paper():
    for name, cls in RULES.items():
        doc = (cls.__doc__ or "") + (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")
        assert cls.name == name and re.search(r"(19|20)\d\d", doc), name
