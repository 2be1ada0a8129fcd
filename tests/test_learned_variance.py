"""DDPM with the model's learned variance (Nichol & Dhariwal 2021, Sec. 3.1; DiT's 250-step protocol).

A tiny random diffusers DiT with learned sigma (out_channels = 2 * in_channels), sampled by cfgx, equals a
guided-diffusion ``p_sample_loop`` written out below from the paper's / ADM's formulas (respaced betas,
posterior mean coefficients, LEARNED_RANGE with the clipped first log-variance, eps-only guidance with the
variance from the conditional branch) on the same noise; one step equals diffusers' DDPMScheduler
(variance_type="learned_range"); ADM's respacing gives cfgx's ``linspace`` timesteps; and the sweep refuses
``sampler.variance=learned`` in one line where it cannot apply.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import private_copy

from cfgx.cli import main
from cfgx.diffusion.samplers import build_sampler, respaced_timesteps
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.pretrained.adapter import learned_variance_source
from cfgx.sample import batch_generator, generate
from cfgx.sweep.rows import load_rows

diffusers = pytest.importorskip("diffusers")
from test_pretrained_dit import save_tiny_pipeline, tiny_vae  # noqa: E402
from test_pretrained_import import _reference_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- guided-diffusion, written out ------------------------------------------------------------------

def adm_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """guided-diffusion's respace.space_timesteps (no "ddimN" form): per section, python round of an
    accumulated float stride."""
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def adm_sample(transformer, alphas_cumprod: np.ndarray, use_timesteps: list[int], labels: torch.Tensor,
               null: int, scale: float, generator: torch.Generator, shape: tuple[int, ...],
               guide_channels: int | None = None) -> torch.Tensor:
    """SpacedDiffusion(betas from alphas_cumprod at use_timesteps).p_sample_loop with LEARNED_RANGE variance,
    clip_denoised=False, and facebookresearch/DiT's forward_with_cfg (guided eps, the conditional rows'
    variance channels)."""
    last, betas = 1.0, []
    for t in use_timesteps:  # SpacedDiffusion.__init__
        betas.append(1 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    betas = np.array(betas, dtype=np.float64)
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
    coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
    recip, recipm1 = np.sqrt(1.0 / acp), np.sqrt(1.0 / acp - 1)
    f32 = lambda a, i: torch.tensor(a[i], dtype=torch.float32)  # noqa: E731  (_extract_into_tensor)
    b, c = shape[0], shape[1]
    x = torch.randn(shape, generator=generator)
    for i in reversed(range(len(use_timesteps))):
        t = torch.full((b,), use_timesteps[i], dtype=torch.long)  # _WrappedModel maps i to the original step
        with torch.no_grad():
            if scale == 1:  # DiT's sample.py without cfg: the model's own forward
                out = transformer(x, timestep=t, class_labels=labels).sample
                eps, v = out[:, :c], out[:, c:]
            else:
                out = transformer(torch.cat([x, x]), timestep=torch.cat([t, t]),
                                  class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
                k = c if guide_channels is None else guide_channels
                cond, uncond = out[:b, :c], out[b:, :c]
                eps = torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
                v = out[:b, c:]  # forward_with_cfg keeps the conditional half's variance channels
        frac = (v + 1) / 2
        log_var = frac * f32(np.log(betas), i) + (1 - frac) * f32(post_log_var_clipped, i)
        x0 = f32(recip, i) * x - f32(recipm1, i) * eps
        mean = f32(coef1, i) * x0 + f32(coef2, i) * x
        noise = torch.randn(shape, generator=generator) if i > 0 else None  # nonzero_mask: none at t = 0
        x = mean + torch.exp(0.5 * log_var) * noise if i > 0 else mean
    return x


# ---- tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [250, 100, 50, 25])
def test_adm_respacing_is_cfgx_linspace(n: int) -> None:
    assert respaced_timesteps(1000, n, "linspace") == sorted(adm_space_timesteps(1000, str(n)), reverse=True)


def test_adm_respacing_differs_only_at_odd_counts_with_a_tie() -> None:
    """The two roundings split on exact .5 points (an accumulated float sum vs linspace): never at an even count."""
    differ = [n for n in range(1, 1001)
              if respaced_timesteps(1000, n) != sorted(adm_space_timesteps(1000, str(n)), reverse=True)]
    assert differ and all(n % 2 for n in differ)
    assert sorted(set(respaced_timesteps(1000, 21)) ^ adm_space_timesteps(1000, "21")) == [499, 500]


@pytest.mark.parametrize("scale,k", [(1.0, None), (4.0, None), (4.0, 3)])
def test_learned_variance_ddpm_equals_guided_diffusion(tmp_path, scale: float, k: int | None) -> None:
    from cfgx.pretrained.dit import load_dit

    pipe = save_tiny_pipeline(tmp_path / "dit")
    pre = load_dit(tmp_path / "dit")
    assert pre.conventions.learned_sigma
    schedule = NoiseSchedule(**pre.conventions.schedule)
    den = pre.denoiser(schedule)
    den.set_guide_channels(k)
    labels, steps, seed = torch.tensor([0, 3, 9, 5]), 10, 7
    sampler = build_sampler("ddpm", schedule, steps, clip_x0=None, variance="learned",
                            variance_source=learned_variance_source(den, schedule))
    ours = generate(den, sampler, pre.shape, labels, scale, seed, 4, torch.device("cpu")).x  # CountingModel-wrapped

    acp = schedule.alpha_bars.numpy()
    use = sorted(adm_space_timesteps(1000, str(steps)))
    ref = adm_sample(pipe.transformer, acp, use, labels, 10, scale, batch_generator(seed, 0, torch.device("cpu")),
                     (4, *pre.shape), guide_channels=k)
    assert ours.std() > 0.1
    # A random net's eps is not the noise, so its x0 and samples reach ~1e3 at s = 4: float32 rounding (ADM's
    # float32 coefficient tensors vs cfgx's float64 scalars) is measured against the samples' scale.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # The variance matters: the fixed beta-tilde chain on the same noise ends elsewhere.
    fixed = build_sampler("ddpm", schedule, steps, clip_x0=None)
    other = generate(den, fixed, pre.shape, labels, scale, seed, 4, torch.device("cpu")).x
    assert (other - ours).abs().max() > 1e-2


def test_one_step_equals_diffusers_learned_range() -> None:
    schedule = NoiseSchedule("linear", 1000)
    v = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sampler = build_sampler("ddpm", schedule, 10, clip_x0=None, variance="learned", variance_source=lambda: v)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    variance_type="learned_range")
    sched.set_timesteps(timesteps=sampler.timesteps)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, t_prev = sampler.timesteps[3], sampler.timesteps[4]
    ours = sampler.step(x, eps, t, t_prev, torch.Generator().manual_seed(5))
    ref = sched.step(torch.cat([eps, v], dim=1), t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # diffusers' schedule is float32, cfgx's float64


def test_clipped_first_log_variance_and_fixed_choices() -> None:
    schedule = NoiseSchedule("linear", 1000)
    ts = respaced_timesteps(1000, 10)
    abar = schedule.alpha_bars.double()
    small = build_sampler("ddpm", schedule, 10)
    large = build_sampler("ddpm", schedule, 10, variance="fixed_large")
    # guided-diffusion's posterior_log_variance_clipped[0] = log posterior_variance[1]
    t1, t0 = ts[-2], ts[-1]
    beta1 = 1 - abar[t1] / abar[t0]
    assert small.log_variance(t0, -1) == pytest.approx(float(torch.log(beta1 * (1 - abar[t0]) / (1 - abar[t1]))))
    beta = 1 - abar[ts[2]] / abar[ts[3]]
    assert large.log_variance(ts[2], ts[3]) == pytest.approx(float(torch.log(beta)))
    assert small.log_variance(ts[2], ts[3]) == pytest.approx(float(torch.log(beta * (1 - abar[ts[3]])
                                                                             / (1 - abar[ts[2]]))))
    with pytest.raises(ValueError, match="applies to sampler=ddpm only"):
        build_sampler("ddim", schedule, 10, variance="learned", variance_source=lambda: None)


def _import(workdir, name: str, *extra: str):
    before = set((workdir / "runs").glob("imagefolder/*"))
    assert main(["import", f"model={name}", f"dataset.root={workdir / 'ref'}", *extra]) == 0
    (run,) = set((workdir / "runs").glob("imagefolder/*")) - before
    return run


def test_sweep_refuses_learned_variance_where_it_cannot_apply(workdir, capsys, tiny_run, tmp_path_factory) -> None:
    save_tiny_pipeline(workdir / "dit")
    pipe = diffusers.DiTPipeline(transformer=diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10), vae=tiny_vae(), scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(workdir / "dit-fixed")  # eps only: no variance channels
    _reference_folder(workdir / "ref")
    learned, sit = _import(workdir, "dit"), _import(workdir, "dit", "family=sit")
    fixed = _import(workdir, "dit-fixed")
    trained = private_copy(tiny_run, tmp_path_factory, "learned_variance")
    capsys.readouterr()
    cases = [(learned, "sampler=ddim", "add sampler=ddpm"), (learned, "sampler=dpmpp2m", "add sampler=ddpm"),
             (fixed, "sampler=ddpm", "has no learned-variance output channels"),
             (sit, "sampler=ddpm", "is not called on this run's DDPM timesteps"),
             (trained, "sampler=ddpm", "predicts eps only")]
    for run, sampler, msg in cases:
        files = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        assert main(["sweep", f"run={run}", sampler, "sampler.variance=learned", "guidance=1"]) == 2, (run, sampler)
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("cfgx: error:"), err
        assert "fixed_small" in err or "sampler=ddpm" in err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == files  # nothing written or touched


def test_sweep_learned_variance_rows_are_their_own(workdir, capsys) -> None:
    save_tiny_pipeline(workdir / "dit")
    _reference_folder(workdir / "ref")
    run = _import(workdir, "dit", "guide_channels=3")
    common = ["sampler=ddpm", "sampler.steps=4", "guidance=1,4", "eval.num_samples=10", "eval.batch_size=10",
              "eval.classifier.steps=60", "eval.classifier.width=8", "eval.features=classifier",
              "eval.classifier.source=own"]
    assert main(["sweep", f"run={run}", *common, "sampler.variance=learned"]) == 0
    assert main(["sweep", f"run={run}", *common]) == 0
    rows = load_rows(run)
    assert sorted((r["sampler"], r["s"]) for r in rows) == [("ddpm", 1.0), ("ddpm", 4.0), ("ddpm-learned", 1.0),
                                                            ("ddpm-learned", 4.0)]
    assert all(r["steps"] == 4 and r["guide_channels"] == 3 for r in rows)
    names = sorted(p.name for p in (run / "sweep" / "rows").glob("*.json"))
    assert sum("ddpm-learned4" in n for n in names) == 2 and sum("-ddpm4" in n for n in names) == 2
    md = (run / "metrics.md").read_text()
    assert "ddpm-learned" in md
    assert json.loads((run / "meta.json").read_text())["imported"]["conventions"]["learned_sigma"]


class _Net(torch.nn.Module):
    """eps-like channels, then variance channels that say which branch and label produced them."""

    def __init__(self, tag: float) -> None:
        super().__init__()
        self.tag = tag

    def forward(self, x, t, y=None):
        label = torch.zeros(len(x)) if y is None else y.float()
        return torch.cat([0.5 * x, self.tag + label.view(-1, 1) + 0 * x], dim=1)


@pytest.mark.parametrize("separate_uncond", [False, True])
def test_variance_comes_from_the_conditional_rows(separate_uncond: bool) -> None:
    from cfgx.diffusion.guidance import cfg_eps
    from cfgx.pretrained.adapter import Conventions, ExternalDenoiser

    schedule = NoiseSchedule("linear", 1000)
    conv = Conventions("eps", "ddpm", num_classes=3, null_index=None if separate_uncond else 3, learned_sigma=True)
    den = ExternalDenoiser(_Net(10.0), conv, schedule, uncond=_Net(-10.0) if separate_uncond else None)
    x, t, y = torch.randn(2, 1), torch.full((2,), 400), torch.tensor([1, 2])
    source = learned_variance_source(den, schedule)
    cfg_eps(den, x, t, y, 4.0)  # one pair batch: cond rows, then null rows
    assert source().tolist() == [[11.0], [12.0]]
    den.set_guide_channels(1)
    cfg_eps(den, x, t, y, 4.0)
    assert source().tolist() == [[11.0], [12.0]]
    cfg_eps(den, x, t, y, 0.0)  # the null branch alone: its own rows
    assert source().tolist() == ([[-10.0], [-10.0]] if separate_uncond else [[13.0], [13.0]])
