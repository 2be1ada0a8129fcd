"""Generating samples for a sweep with *paired seeds*.

Sample i gets the same class label, the same initial noise and the same
per-step noise at every guidance scale, so differences between rows of the
table measure guidance and not sampling noise. Labels are balanced over classes
(i mod C). Noise comes from one generator per batch seeded by (seed, batch
index); the sweep keeps the batch size fixed across scales, so batch b sees the
same random stream at every scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx import cpu
from cfgx.data.base import DatasetBundle
from cfgx.diffusion.guidance import GuidanceRule, GuidedEps, Models, make_rule
from cfgx.diffusion.samplers import Sampler, build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.pretrained.adapter import learned_variance_source


@dataclass
class SampleBatch:
    x: torch.Tensor          # [N, ...] in model range, on CPU
    y: torch.Tensor          # [N] requested labels
    seconds: float
    nfe: int                 # network evaluations per sample


def run_sampler(cfg: DictConfig, schedule: NoiseSchedule, model: torch.nn.Module, data: DatasetBundle) -> Sampler:
    """The sampler a run's ``sampler`` config names for ``model`` (its ``tag`` names it in rows and keys).

    One place for the sweep and ``cfgx postprocess``, so the postprocessor's pairs are drawn as the sweep
    draws: an imported latent model turns x0 clipping off (``model.clip_x0``); ``sampler.variance=learned``
    reads the model's own variance output through a hook bound to the model (the guided eps_fn returns eps
    only), and a model without one is refused here, before any sampling.
    """
    variance = str(OmegaConf.select(cfg, "sampler.variance", default="fixed_small"))
    source = learned_variance_source(model, schedule) if variance == "learned" else None
    return build_sampler(cfg.sampler.name, schedule, int(cfg.sampler.steps), float(cfg.sampler.eta),
                         clip_x0=getattr(model, "clip_x0", data.clip),
                         spacing=str(OmegaConf.select(cfg, "sampler.spacing", default="linspace")),
                         variance=variance, variance_source=source)


def sample_shape(model: torch.nn.Module, data: DatasetBundle) -> tuple[int, ...]:
    """What the sampler draws: an imported latent model's own shape (``model.sample_shape``), else the data's."""
    return tuple(getattr(model, "sample_shape", None) or data.shape)


def decoded(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Samples as images (an imported latent model's ``codec`` decodes them) and the seconds that took,
    which rows count in their sampling time."""
    if getattr(model, "codec", None) is None:
        return x, 0.0
    t0 = time.perf_counter()
    x = model.decode(x)
    return x, time.perf_counter() - t0


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(batch_index))


class CountingModel(torch.nn.Module):
    """Passes calls through to a denoiser and counts the rows it evaluates.

    Rules such as interval guidance or autoguidance spend a varying number of network
    evaluations per step; counting them is what makes a row's ``nfe`` the evaluations made.
    It only forwards calls, so what a call leaves on the inner model stays there: the DDPM sampler's
    ``variance_source`` (sampler.variance=learned) is bound to the inner model, not to this wrapper.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.num_classes, self.rows = inner, inner.num_classes, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.inner(x, t, y)


@torch.no_grad()
def generate(model: torch.nn.Module, sampler: Sampler, shape: tuple[int, ...], labels: torch.Tensor,
             scale: float, seed: int, batch_size: int, device: torch.device, rule: GuidanceRule | str = "cfg",
             classifier: torch.nn.Module | None = None, autocast_bf16: bool = False,
             guide: torch.nn.Module | None = None, first_batch: int = 0) -> SampleBatch:
    """Draw ``len(labels)`` samples at guidance ``scale`` with paired per-batch seeds.

    ``rule`` is a guidance rule (``make_rule``), or the name of one without options. ``labels`` may
    be a slice that starts at batch ``first_batch`` of the full set: its noise is that batch's,
    whoever draws it (how sweeps shard batches over processes). ``nfe`` is counted, not assumed:
    denoiser (and autoguidance guide) rows evaluated per sample, plus what the rule evaluates
    besides (classifier guidance: one classifier forward/backward per step at s != 0).
    """
    rule = make_rule(rule) if isinstance(rule, str) else rule
    counted = CountingModel(model)
    counted_guide = CountingModel(guide) if guide is not None else None
    models = Models(counted, classifier, counted_guide)
    xs = []
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(labels), batch_size)):
        cpu.tick()
        y = labels[start:start + batch_size].to(device)
        g = batch_generator(seed, first_batch + b, device)
        eps_fn = GuidedEps(rule, models, y, scale, sampler)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            x = sampler.sample(eps_fn, (len(y), *shape), g, device)
        xs.append(x.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    rows = counted.rows + (counted_guide.rows if counted_guide is not None else 0)
    nfe = rows / max(len(labels), 1) + rule.extra_nfe(scale, len(sampler.timesteps))
    return SampleBatch(torch.cat(xs), labels.cpu(), seconds, nfe=int(nfe) if nfe == int(nfe) else round(nfe, 3))
