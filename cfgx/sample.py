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

from cfgx.diffusion.guidance import cfg_eps, cg_eps
from cfgx.diffusion.samplers import Sampler


@dataclass
class SampleBatch:
    x: torch.Tensor          # [N, ...] in model range, on CPU
    y: torch.Tensor          # [N] requested labels
    seconds: float
    nfe: int                 # network evaluations per sample


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(batch_index))


def nfe_per_step(scale: float, method: str = "cfg") -> int:
    """Network evaluations per sampling step: CFG at s not in {0, 1} costs a batch of 2B."""
    if method == "classifier":
        return 1 if scale == 0 else 2  # denoiser + classifier forward/backward
    return 1 if scale in (0.0, 1.0) else 2


def make_eps_fn(model: torch.nn.Module, y: torch.Tensor, scale: float, method: str = "cfg",
                classifier: torch.nn.Module | None = None, schedule=None):
    if method == "cfg":
        return lambda x, t: cfg_eps(model, x, t, y, scale)
    if classifier is None or schedule is None:
        raise ValueError("classifier guidance needs a classifier and the noise schedule")
    return lambda x, t: cg_eps(model, classifier, schedule.sigma(t), x, t, y, scale)


@torch.no_grad()
def generate(model: torch.nn.Module, sampler: Sampler, shape: tuple[int, ...], labels: torch.Tensor,
             scale: float, seed: int, batch_size: int, device: torch.device, method: str = "cfg",
             classifier: torch.nn.Module | None = None, autocast_bf16: bool = False,
             first_batch: int = 0) -> SampleBatch:
    """Draw ``len(labels)`` samples at guidance ``scale`` with paired per-batch seeds.

    ``labels`` may be a slice that starts at batch ``first_batch`` of the full set: its
    noise is that batch's, whoever draws it (how sweeps shard batches over processes).
    """
    xs = []
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(labels), batch_size)):
        y = labels[start:start + batch_size].to(device)
        g = batch_generator(seed, first_batch + b, device)
        eps_fn = make_eps_fn(model, y, scale, method, classifier, sampler.schedule)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            x = sampler.sample(eps_fn, (len(y), *shape), g, device)
        xs.append(x.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return SampleBatch(torch.cat(xs), labels.cpu(), seconds,
                       nfe=len(sampler.timesteps) * nfe_per_step(scale, method))
