"""Samplers: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022).

All walk a (possibly respaced) subsequence of the training timesteps and take
an ``eps_fn(x_t, t) -> eps`` so they know nothing about guidance. All
randomness (initial noise and per-step noise) comes from the ``generator`` the
caller passes, in a fixed order, which is what makes seeds *paired* across
guidance scales: the same generator state gives the same noise at every scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cfgx.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SPACINGS = ("linspace", "leading")


def respaced_timesteps(num_train_steps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """Evenly spaced timesteps, descending, always ending at t = 0.

    ``linspace`` spans 0..T-1; ``leading`` is k * (T // steps) for k < steps, the default of diffusers'
    DDIMScheduler (and so DiTPipeline's), which pretrained-model protocols are published with.
    """
    if steps <= 0 or steps > num_train_steps:
        raise ValueError(f"sampler steps must be in [1, {num_train_steps}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown sampler spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if spacing == "leading":
        return (torch.arange(steps) * (num_train_steps // steps)).flip(0).tolist()
    ts = torch.linspace(0, num_train_steps - 1, steps).round().long().unique()
    return ts.flip(0).tolist()


def logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """Timesteps whose log-SNR lambda = log(alpha / sigma) is evenly spaced, descending, ending at t = 0.

    Lu et al. (2022) use this spacing for pixel-space models: a multistep solver's extrapolation
    assumes slowly varying step ratios h_i / h_{i-1}, and uniform-in-t steps on the linear schedule
    end with one jump in lambda several times the size of the previous one (2.9 vs 0.66 at 20
    steps), which throws the second-order correction far off. Rounded to integer timesteps; where
    rounding collides (only at hundreds of steps) neighbours are pushed apart, so there are
    exactly ``steps`` distinct timesteps.
    """
    if steps <= 0 or steps > schedule.num_steps:
        raise ValueError(f"sampler steps must be in [1, {schedule.num_steps}], got {steps}")
    abar = schedule.alpha_bars.double()
    lam = 0.5 * torch.log(abar / (1 - abar))  # decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    idx = torch.searchsorted(-lam, -targets).clamp(max=schedule.num_steps - 1)
    # searchsorted gives the first t with lambda_t <= target; take the nearer neighbour.
    lower = (idx - 1).clamp(min=0)
    nearer = torch.where((lam[lower] - targets).abs() < (lam[idx] - targets).abs(), lower, idx)
    ts = nearer.flip(0).tolist()  # ascending from t = 0
    # Where rounding collides (many steps, t near 0), push apart so there are exactly ``steps``.
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = min(ts[-1], schedule.num_steps - 1)
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts[::-1]


class Sampler:
    """Shared respacing and x0 clipping; subclasses define one update step."""

    name = "base"
    variance = "fixed_small"  # what the ancestral step adds (DDPMSampler's choice; the others have none)

    def __init__(self, schedule: NoiseSchedule, steps: int, clip_x0: float | None = 1.0,
                 eta: float = 0.0, spacing: str = "linspace") -> None:
        self.schedule = schedule
        self.steps = steps
        self.clip_x0 = clip_x0
        self.eta = eta
        self.spacing = spacing
        self.timesteps = respaced_timesteps(schedule.num_steps, steps, spacing)

    @property
    def tag(self) -> str:
        """The sampler as rows and row keys name it: ``ddpm``, ``ddim-leading``, ``ddpm-learned``, ...
        (defaults unnamed, so rows written before an option existed keep their keys)."""
        return (self.name + ("" if self.spacing == "linspace" else f"-{self.spacing}")
                + ("" if self.variance == "fixed_small" else f"-{self.variance}"))

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
        self.reset()
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

    def reset(self) -> None:
        """Clear per-trajectory state (multistep solvers remember earlier steps)."""

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             generator: torch.Generator, eps_renoise: torch.Tensor | None = None) -> torch.Tensor:
        """One update from t to t_prev; ``eps_renoise`` (CFG++) only where the sampler supports it (a rule's
        ``samplers`` says which: GuidedEps checks it before the first step)."""
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


VARIANCES = ("fixed_small", "fixed_large", "learned")
VarianceSource = Callable[[], torch.Tensor]


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020) on respaced steps.

    Each step x_t -> x_{t_prev} draws from N(posterior mean, Sigma) on the respaced chain, whose
    beta = 1 - abar_t / abar_prev and beta-tilde = beta (1 - abar_prev) / (1 - abar_t). ``variance``:
    ``fixed_small`` Sigma = beta-tilde (the default); ``fixed_large`` Sigma = beta (Ho et al.'s other
    choice); ``learned`` (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models",
    Sec. 3.1) log Sigma = f log beta + (1 - f) log beta-tilde, f = (v + 1) / 2 per dimension, with v
    the network's variance output: guided-diffusion's LEARNED_RANGE, which DiT's 250-step protocol
    samples with. ``variance_source()`` returns v for the rows being sampled; the caller binds it to
    the model (cfgx.pretrained.adapter.learned_variance_source), since eps_fn returns eps only.
    """

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, steps: int, clip_x0: float | None = 1.0, eta: float = 0.0,
                 spacing: str = "linspace", variance: str = "fixed_small",
                 variance_source: VarianceSource | None = None) -> None:
        super().__init__(schedule, steps, clip_x0=clip_x0, eta=eta, spacing=spacing)
        if variance not in VARIANCES:
            raise ValueError(f"unknown DDPM variance {variance!r}; valid: {', '.join(VARIANCES)}")
        if (variance == "learned") != (variance_source is not None):
            raise ValueError("variance='learned' needs a variance_source (the model's variance output), and only it")
        self.variance, self.variance_source = variance, variance_source

    def log_variance(self, t: int, t_prev: int, v: torch.Tensor | None = None) -> torch.Tensor | float:
        """log Sigma of the step t -> t_prev (``v``: the network's variance output, for ``learned``).

        Where beta-tilde = 0 (onto t = 0, abar_prev = 1) its log is that of the chain's next step, as
        guided-diffusion's ``posterior_log_variance_clipped``; that step adds no noise, so it never
        reaches a sample.
        """
        abar, abar_prev = self._abar(t), self._abar(t_prev)
        beta = 1 - abar / abar_prev
        if t_prev < 0 and len(self.timesteps) > 1:
            t1 = self.timesteps[-2]  # the chain's step into t (the respaced chain's index 1)
            beta1 = 1 - self._abar(t1) / abar
            log_small = math.log(beta1 * (1 - abar) / (1 - self._abar(t1)))
        else:
            log_small = math.log(beta * (1 - abar_prev) / (1 - abar)) if t_prev >= 0 else math.log(beta)
        if self.variance == "fixed_small":
            return log_small
        if self.variance == "fixed_large":
            return math.log(beta)
        frac = (v + 1) / 2
        return frac * math.log(beta) + (1 - frac) * log_small

    def step(self, x, eps, t, t_prev, generator):
        abar, abar_prev = self._abar(t), self._abar(t_prev)
        beta = 1 - abar / abar_prev
        x0 = self._pred_x0(x, eps, abar)
        # Posterior q(x_{t_prev} | x_t, x0) mean and variance.
        c0 = abar_prev ** 0.5 * beta / (1 - abar)
        ct = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)
        mean = c0 * x0 + ct * x
        if t_prev < 0:
            return mean
        if self.variance == "fixed_small":
            var = beta * (1 - abar_prev) / (1 - abar)
            return mean + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
        if self.variance == "fixed_large":
            return mean + beta ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
        v = self.variance_source()
        if v.shape != x.shape:
            raise RuntimeError(f"the model's variance output has shape {tuple(v.shape)}, the step {tuple(x.shape)}: "
                               "it must come from the rows this step evaluated")
        log_var = self.log_variance(t, t_prev, v.float())
        return mean + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator, device=x.device)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2): multistep, second order, in the data (x0) prediction.

    Guidance is applied to eps by ``eps_fn`` before the conversion to x0, so every guidance rule works
    unchanged; the paper's point is that the data-prediction form stays stable at large scales. With
    lambda = log(alpha / sigma) and h_i = lambda_i - lambda_{i-1}:

        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i,

    first order (D_i = x0_{i-1}, i.e. DDIM) on the first step. Steps are evenly spaced in lambda
    (``logsnr_timesteps``), the paper's choice for pixel-space models; ``eta`` does not apply. The
    last step lands on clean data (sigma = 0, h = inf), where the update reduces to x = D; it is
    taken first order (x = x0), as diffusers' ``lower_order_final`` does, since r -> 0 there.
    Deterministic: its only randomness is the initial noise, so paired seeds hold.
    """

    name = "dpmpp2m"

    def __init__(self, schedule: NoiseSchedule, steps: int, clip_x0: float | None = 1.0,
                 eta: float = 0.0) -> None:
        super().__init__(schedule, steps, clip_x0=clip_x0, eta=0.0)
        self.timesteps = logsnr_timesteps(schedule, steps)
        self.reset()

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def step(self, x, eps, t, t_prev, generator):
        abar, abar_prev = self._abar(t), self._abar(t_prev)
        x0 = self._pred_x0(x, eps, abar)
        if t_prev < 0:  # onto the data: sigma = 0
            return x0
        alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
        alpha_n, sigma_n = abar_prev ** 0.5, (1 - abar_prev) ** 0.5
        h = math.log(alpha_n / sigma_n) - math.log(alpha / sigma)
        d = x0
        if self._prev_x0 is not None and self._prev_h is not None:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0
        self._prev_x0, self._prev_h = x0, h
        return (sigma_n / sigma) * x - alpha_n * math.expm1(-h) * d


SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "dpmpp2m": DPMSolverPP2MSampler}


def build_sampler(name: str, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                  clip_x0: float | None = 1.0, spacing: str = "linspace", variance: str = "fixed_small",
                  variance_source: VarianceSource | None = None) -> Sampler:
    """``variance`` and ``variance_source``: DDPM's (DDPMSampler); the other samplers take fixed_small only."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    if name != "ddpm" and variance != "fixed_small":
        raise ValueError(f"sampler.variance={variance} applies to sampler=ddpm only, not {name}")
    extra = {"variance": variance, "variance_source": variance_source} if name == "ddpm" else {}
    if spacing == "linspace":
        return SAMPLERS[name](schedule, steps, clip_x0=clip_x0, eta=eta, **extra)
    if name == "dpmpp2m":
        raise ValueError("sampler=dpmpp2m spaces its steps in log-SNR; sampler.spacing applies to ddim and ddpm")
    return SAMPLERS[name](schedule, steps, clip_x0=clip_x0, eta=eta, spacing=spacing, **extra)
