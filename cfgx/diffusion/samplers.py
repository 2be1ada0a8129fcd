"""Samplers: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021).

Both walk a (possibly respaced) subsequence of the training timesteps and take
an ``eps_fn(x_t, t) -> eps`` so they know nothing about guidance. All
randomness (initial noise and per-step noise) comes from the ``generator`` the
caller passes, in a fixed order, which is what makes seeds *paired* across
guidance scales: the same generator state gives the same noise at every scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cfgx.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def respaced_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """Evenly spaced timesteps, descending, always ending at t = 0."""
    if steps <= 0 or steps > num_train_steps:
        raise ValueError(f"sampler steps must be in [1, {num_train_steps}], got {steps}")
    ts = torch.linspace(0, num_train_steps - 1, steps).round().long().unique()
    return ts.flip(0).tolist()


class Sampler:
    """Shared respacing and x0 clipping; subclasses define one update step."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, steps: int, clip_x0: float | None = 1.0,
                 eta: float = 0.0) -> None:
        self.schedule = schedule
        self.steps = steps
        self.clip_x0 = clip_x0
        self.eta = eta
        self.timesteps = respaced_timesteps(schedule.num_steps, steps)

    def _abar(self, t: int) -> float:
        return float(self.schedule.alpha_bars[t]) if t >= 0 else 1.0

    def _pred_x0(self, x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, shape: tuple[int, ...], generator: torch.Generator,
               device: torch.device | str = "cpu",
               trajectory: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Draw samples of ``shape``; appends x_t after each step to ``trajectory`` if given."""
        x = torch.randn(shape, generator=generator, device=device)
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
        seq = self.timesteps
        for i, t in enumerate(seq):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            out = eps_fn(x, tt)
            if isinstance(out, tuple):  # (eps for x0, eps for re-noising): CFG++
                x = self.step(x, out[0].float(), t, t_prev, generator, eps_renoise=out[1].float())
            else:
                x = self.step(x, out.float(), t, t_prev, generator)
            if trajectory is not None:
                trajectory.append(x.detach().cpu())
        return x

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             generator: torch.Generator, eps_renoise: torch.Tensor | None = None) -> torch.Tensor:
        """One update from t to t_prev; ``eps_renoise`` (CFG++) only where the sampler supports it."""
        raise NotImplementedError


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021). eta = 0 is deterministic; eta = 1 matches DDPM's variance."""

    name = "ddim"

    def step(self, x, eps, t, t_prev, generator, eps_renoise=None):
        abar, abar_prev = self._abar(t), self._abar(t_prev)
        x0 = self._pred_x0(x, eps, abar)
        if eps_renoise is not None and self.clip_x0 is None:
            eps = eps_renoise  # CFG++: x0 from the guided eps, direction from the unconditional one
        else:
            # Re-derive eps from the (possibly clipped) x0 so the update stays consistent; for
            # CFG++ the clipping's correction is carried over onto the re-noising eps.
            eps_x0 = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5
            eps = eps_x0 if eps_renoise is None else eps_renoise + (eps_x0 - eps)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        dir_xt = max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
        x_prev = abar_prev ** 0.5 * x0 + dir_xt
        if sigma > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020) on respaced steps, posterior variance beta-tilde."""

    name = "ddpm"

    def step(self, x, eps, t, t_prev, generator, eps_renoise=None):
        if eps_renoise is not None:
            raise ValueError("CFG++ is defined for DDIM only; use sampler=ddim")
        abar, abar_prev = self._abar(t), self._abar(t_prev)
        beta = 1 - abar / abar_prev
        x0 = self._pred_x0(x, eps, abar)
        # Posterior q(x_{t_prev} | x_t, x0) mean and variance.
        c0 = abar_prev ** 0.5 * beta / (1 - abar)
        ct = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)
        mean = c0 * x0 + ct * x
        if t_prev < 0:
            return mean
        var = beta * (1 - abar_prev) / (1 - abar)
        return mean + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)


SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler}


def build_sampler(name: str, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                  clip_x0: float | None = 1.0) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](schedule, steps, clip_x0=clip_x0, eta=eta)
