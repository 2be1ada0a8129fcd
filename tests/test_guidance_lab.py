"""The guidance lab: every rule against its exact reduction to CFG (or s = 0 / s = 1).

All on exact Gaussian-mixture scores (``ExactDenoiser``), DDIM without x0 clipping, paired
seeds: where a rule's option turns it into CFG (or into s = 0 / s = 1) the final samples must
agree bitwise or within 1e-6 (float order changes); where the option is on, they must differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from cfgx.backbones.exact import ExactDenoiser
from cfgx.data.gmm import gmm1d, gmm2d
from cfgx.diffusion.guidance import (
    GuidanceRule,
    apg_eps,
    cfg_zero_star_eps,
    edm_sigma,
    get_rule,
    rescale_eps,
    scheduled_scale,
)
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.sample import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _rule(name: str, schedule: str = "constant", options: dict | None = None) -> GuidanceRule:
    # These tests hand autoguidance its guide model themselves: its load option is not checked.
    return get_rule(name)(options or {}, schedule, check="guide" not in (options or {}))

SCHEDULE = NoiseSchedule("linear", 1000)
CPU = torch.device("cpu")
N = 64


def _mixture(name: str):
    return gmm1d(mu=0.5, std=0.05) if name == "gmm1d" else gmm2d(num_classes=3, components_per_class=2, std=0.25)


def _draw(name: str, spec: GuidanceRule | str, scale: float, sampler: str = "ddim", steps: int = 20,
          guide=None):
    mix = _mixture(name)
    model = ExactDenoiser(mix, SCHEDULE)
    smp = build_sampler(sampler, SCHEDULE, steps, eta=0.0, clip_x0=None)
    labels = torch.arange(N) % mix.num_classes
    return generate(model, smp, (mix.dim,), labels, scale, seed=3, batch_size=32, device=CPU, rule=spec,
                    guide=guide)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= 1e-6, (a - b).abs().max().item()


TOYS = ["gmm1d", "gmm2d"]
SCALES = [0.0, 1.0, 2.5, 5.0]


@pytest.mark.parametrize("toy", TOYS)
def test_interval_covering_every_step_is_cfg_and_empty_interval_is_conditional(toy):
    for s in SCALES:
        cfg = _draw(toy, "cfg", s)
        everywhere = _draw(toy, _rule("interval", options={"sigma": [0.0, None]}), s)
        assert torch.equal(everywhere.x, cfg.x) and everywhere.nfe == cfg.nfe
        # No step has sigma in [1e6, 2e6]: conditional alone, at one evaluation per step.
        nowhere = _draw(toy, _rule("interval", options={"sigma": [1e6, 2e6]}), s)
        assert torch.equal(nowhere.x, _draw(toy, "cfg", 1.0).x) and nowhere.nfe == 20
    # A real interval: nfe counts the guided steps only, and the samples are neither CFG nor s = 1.
    sig = [edm_sigma(float(SCHEDULE.alpha_bars[t])) for t in build_sampler("ddim", SCHEDULE, 20).timesteps]
    inside = sum(0.28 <= v <= 5.42 for v in sig)
    mid = _draw(toy, _rule("interval", options={"sigma": [0.28, 5.42]}), 3.0)
    assert 0 < inside < 20 and mid.nfe == 20 + inside
    assert not torch.allclose(mid.x, _draw(toy, "cfg", 3.0).x)


@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("space", ["x0", "eps"])
def test_rescale_phi0_is_cfg(toy, space):
    for s in SCALES:
        _close(_draw(toy, _rule("rescale", options={"phi": 0.0, "space": space}), s).x, _draw(toy, "cfg", s).x)
    on = _draw(toy, _rule("rescale", options={"phi": 0.7, "space": space}), 5.0).x
    if toy == "gmm1d":  # a one-number sample has std 0: rescaling is the identity there
        assert torch.equal(on, _draw(toy, "cfg", 5.0).x)
    else:
        assert (on - _draw(toy, "cfg", 5.0).x).abs().max() > 1e-3


@pytest.mark.parametrize("toy", TOYS)
def test_apg_eta1_without_momentum_or_cap_is_cfg(toy):
    plain = {"eta": 1.0, "momentum": 0.0, "norm_threshold": None}
    for s in SCALES:
        _close(_draw(toy, _rule("apg", options=plain), s).x, _draw(toy, "cfg", s).x)
    cfg5 = _draw(toy, "cfg", 5.0).x
    for change in ({"eta": 0.0}, {"momentum": -0.5}, {"norm_threshold": 0.05}):
        assert (_draw(toy, _rule("apg", options={**plain, **change}), 5.0).x - cfg5).abs().max() > 1e-4


def test_apg_matches_the_papers_algorithm_step_by_step():
    """Against a direct transcription of Sadat et al.'s Algorithm 1 (project, momentum, norm cap)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    abar, s, eta, r, beta = 0.3, 4.0, 0.2, 2.0, -0.5
    from cfgx.diffusion.guidance.apg import APGState

    state = APGState()
    apg = lambda ec, eu, x, abar, s: apg_eps(ec, eu, x, abar, s, eta, r, beta, state)  # noqa: E731
    running = 0.0
    for _ in range(3):
        ec, eu = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
        got = apg(ec, eu, x.float(), abar, s)
        dc = (x - math.sqrt(1 - abar) * ec.double()) / math.sqrt(abar)
        du = (x - math.sqrt(1 - abar) * eu.double()) / math.sqrt(abar)
        running = (dc - du) + beta * running
        diff = running * torch.clamp(r / running.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
        v1 = dc / dc.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        par = (diff * v1).sum(dim=(1, 2, 3), keepdim=True) * v1
        d = dc + (s - 1) * ((diff - par) + eta * par)
        want = (x.float() - math.sqrt(abar) * d.float()) / math.sqrt(1 - abar)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rescale_matches_the_papers_formula():
    g = torch.Generator().manual_seed(1)
    x, ec, eu = (torch.randn(3, 2, generator=g) for _ in range(3))
    abar, s, phi = 0.5, 3.0, 0.7
    x0 = lambda e: (x - math.sqrt(1 - abar) * e) / math.sqrt(abar)  # noqa: E731
    pos, cfg = x0(ec), x0(eu + s * (ec - eu))
    final = phi * cfg * pos.std(1, keepdim=True) / cfg.std(1, keepdim=True) + (1 - phi) * cfg
    want = (x - math.sqrt(abar) * final) / math.sqrt(1 - abar)
    torch.testing.assert_close(rescale_eps(ec, eu, x, abar, s, phi), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("toy", TOYS)
def test_cfgpp_lambda0_is_unconditional_ddim_and_ddpm_is_refused(toy):
    zero = _draw(toy, _rule("cfgpp", options={"s_at_lambda1": 12.5}), 0.0)
    base = _draw(toy, "cfg", 0.0)
    _close(zero.x, base.x)
    assert zero.nfe == base.nfe == 20
    guided = _draw(toy, _rule("cfgpp", options={"s_at_lambda1": 12.5}), 6.0)
    assert guided.nfe == 40 and (guided.x - base.x).abs().max() > 1e-3
    with pytest.raises(CfgxError, match="defined for ddim only"):
        _draw(toy, _rule("cfgpp", options={"s_at_lambda1": 12.5}), 6.0, sampler="ddpm")


@pytest.mark.parametrize("toy", TOYS)
def test_autoguidance_with_the_model_itself_is_conditional_at_every_scale(toy):
    cond = _draw(toy, "cfg", 1.0)
    itself = ExactDenoiser(_mixture(toy), SCHEDULE)
    for s in SCALES:
        got = _draw(toy, _rule("autoguidance", options={"guide": "self"}), s, guide=itself)
        assert torch.equal(got.x, cond.x)
        assert got.nfe == (20 if s in (0.0, 1.0) else 40)
    # A genuinely worse guide (a broader mixture) changes the samples.
    mix = _mixture(toy)
    bad = ExactDenoiser(type(mix)(means=mix.means, stds=mix.stds * 3, weights=mix.weights,
                                  component_class=mix.component_class, num_classes=mix.num_classes), SCHEDULE)
    other = _draw(toy, _rule("autoguidance", options={"guide": "broad"}), 3.0, guide=bad)
    assert (other.x - cond.x).abs().max() > 1e-3


@pytest.mark.parametrize("toy", TOYS)
def test_constant_schedule_is_cfg_and_schedules_average_to_s(toy):
    for s in SCALES:
        assert torch.equal(_draw(toy, _rule("cfg", "constant"), s).x, _draw(toy, "cfg", s).x)
        for kind in ("linear", "cosine"):
            for n in (2, 7, 20, 25):
                w = [scheduled_scale(kind, s, i, n) for i in range(n)]
                assert abs(sum(w) / n - s) < 1e-12
                assert all(b >= a - 1e-12 for a, b in zip(w, w[1:]))  # increasing: low at high noise
    lin = _draw(toy, _rule("cfg", "linear"), 3.0).x
    assert (lin - _draw(toy, "cfg", 3.0).x).abs().max() > 1e-3


def test_cfg_zero_star_scale_and_reduction():
    g = torch.Generator().manual_seed(2)
    ec, eu = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    alpha = (ec * eu).sum(1, keepdim=True) / (eu * eu).sum(1, keepdim=True)
    torch.testing.assert_close(cfg_zero_star_eps(ec, eu, 4.0), alpha * eu + 4.0 * (ec - alpha * eu))
    torch.testing.assert_close(cfg_zero_star_eps(ec, eu, 1.0), ec)
    # When cond is a multiple of uncond the optimised base is cond itself: guidance adds nothing.
    torch.testing.assert_close(cfg_zero_star_eps(2 * eu, eu, 6.0), 2 * eu)


def test_paired_seeds_hold_for_every_rule():
    """Every rule sees the same x_T and the same per-step noise: DDIM eta=1 differences come from guidance."""
    mix = _mixture("gmm2d")
    model = ExactDenoiser(mix, SCHEDULE)
    labels = torch.arange(N) % mix.num_classes
    specs = [_rule("cfg"), _rule("interval", options={"sigma": [0.0, None]}),
             _rule("rescale", options={"phi": 0.0, "space": "x0"}),
             _rule("apg", options={"eta": 1.0, "momentum": 0.0, "norm_threshold": None}),
             _rule("autoguidance", options={"guide": "self"})]
    outs = []
    for spec in specs:
        smp = build_sampler("ddim", SCHEDULE, 10, eta=1.0, clip_x0=None)
        outs.append(generate(model, smp, (2,), labels, 1.0, seed=9, batch_size=32, device=CPU, rule=spec,
                             guide=model).x)
    for o in outs[1:]:
        _close(o, outs[0])
