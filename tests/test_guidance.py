"""The guidance convention and the samplers' paired seeds."""

from __future__ import annotations

import torch

from cfgx.backbones.unet import UNet
from cfgx.diffusion.guidance import cfg_eps
from cfgx.diffusion.samplers import build_sampler, respaced_timesteps
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.sample import generate


class Recorder(torch.nn.Module):
    """Wraps a denoiser and records every call's batch size and labels."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_classes, self.calls, self.first_x = inner, inner.num_classes, [], None

    def forward(self, x, t, y):
        if self.first_x is None:
            self.first_x = x.clone()
        self.calls.append(y.clone())
        return self.inner(x, t, y)


def _model(seed=0):
    torch.manual_seed(seed)
    m = UNet(in_channels=1, resolution=8, num_classes=10, ch=8, ch_mult=(1, 2))
    with torch.no_grad():  # non-zero outputs so cond and uncond differ
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_s0_is_unconditional_and_s1_conditional_exactly():
    m = _model()
    x, t, y = torch.randn(6, 1, 8, 8), torch.full((6,), 500), torch.arange(6)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        uncond, cond = m(x, t, null), m(x, t, y)
        assert torch.equal(cfg_eps(m, x, t, y, 0.0), uncond)
        assert torch.equal(cfg_eps(m, x, t, y, 1.0), cond)
        assert not torch.allclose(uncond, cond)
        g = cfg_eps(m, x, t, y, 3.0)
    torch.testing.assert_close(g, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_guided_scale_is_one_batched_call():
    rec = Recorder(_model())
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 100), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cfg_eps(rec, x, t, y, 0.0)
        cfg_eps(rec, x, t, y, 1.0)
        cfg_eps(rec, x, t, y, 7.0)
    assert [len(c) for c in rec.calls] == [4, 4, 8]
    assert (rec.calls[0] == 10).all() and torch.equal(rec.calls[1], y)
    assert torch.equal(rec.calls[2], torch.tensor([1, 2, 3, 4, 10, 10, 10, 10]))


def test_bf16_outputs_are_combined_in_float32():
    """Under bf16 autocast the network answers in bf16; guidance must not round cond - uncond."""

    class Bf16(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):  # cond = 3 + 2^-6, uncond = 3: both exact in bf16
            return (3.0 + 2**-6 * (y < 10).float().view(-1, 1, 1, 1) + 0 * x).to(torch.bfloat16)

    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 100), torch.arange(4)
    m = Bf16()
    out = cfg_eps(m, x, t, y, 2.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 3.0 + 2.3 * 2**-6), rtol=0, atol=1e-6)
    assert cfg_eps(m, x, t, y, 0.0).dtype == cfg_eps(m, x, t, y, 1.0).dtype == torch.float32


def test_paired_seeds_same_noise_and_labels_at_every_scale():
    schedule = NoiseSchedule("linear", 1000)
    labels = torch.arange(12) % 10
    first = {}
    outs = {}
    for s in (0.0, 1.0, 3.0):
        rec = Recorder(_model())
        for name in ("ddim", "ddpm", "dpmpp2m"):
            sampler = build_sampler(name, schedule, 5, eta=0.5)
            rec.first_x = None
            outs[(s, name)] = generate(rec, sampler, (1, 8, 8), labels, s, seed=7, batch_size=6,
                                       device=torch.device("cpu")).x
            first[(s, name)] = rec.first_x[:6]  # first batch's x_T (cond half when batched)
    for name in ("ddim", "ddpm", "dpmpp2m"):
        assert torch.equal(first[(0.0, name)], first[(1.0, name)])
        assert torch.equal(first[(0.0, name)], first[(3.0, name)])
        assert not torch.allclose(outs[(1.0, name)], outs[(3.0, name)])
    # Same seed, same scale: identical samples (per-step noise is paired too).
    rec = Recorder(_model())
    again = generate(rec, build_sampler("ddpm", schedule, 5), (1, 8, 8), labels, 3.0, seed=7, batch_size=6,
                     device=torch.device("cpu")).x
    assert torch.equal(again, outs[(3.0, "ddpm")])
    other = generate(rec, build_sampler("ddpm", schedule, 5), (1, 8, 8), labels, 3.0, seed=8, batch_size=6,
                     device=torch.device("cpu")).x
    assert not torch.allclose(other, again)


def test_respacing_and_schedules():
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]
    assert len(respaced_timesteps(1000, 1000)) == 1000
    lin, cos = NoiseSchedule("linear", 1000), NoiseSchedule("cosine", 1000)
    for s in (lin, cos):
        ab = s.alpha_bars
        assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.99 and ab[-1] < 0.01


def test_ddim_eta0_is_deterministic_and_recovers_data_with_exact_eps():
    # With the true eps of a single point x* (x_t = sqrt(ab) x* + sqrt(1-ab) eps), DDIM lands on x*.
    schedule = NoiseSchedule("linear", 1000)
    target = torch.full((3, 1, 8, 8), 0.3)

    def eps_fn(x, t):
        ab = schedule.alpha_bar(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    for name in ("ddim", "ddpm", "dpmpp2m"):
        out = build_sampler(name, schedule, 20).sample(eps_fn, (3, 1, 8, 8), torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
