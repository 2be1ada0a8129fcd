"""Adapter contract: an external class-conditional denoiser seen as a cfgx ``model(x, t, y) -> eps``.

An external network declares (``Conventions``) what it predicts, its own time variable, how it says
"no class", and whether its output carries learned-variance channels. cfgx samples on its VP process
x_t = alpha x0 + sigma eps (alpha^2 = abar_t of cfgx's schedule); at every sampler step the adapter
finds the point of the model's own process with the *same log-SNR* lambda = log(alpha / sigma),

    x' = c x  with  x' = a' x0 + s' eps,  a' / s' = alpha / sigma,  c = s' / sigma,

evaluates the network there at its own time value, and converts its prediction to eps in float64.
Every process with the same log-SNR has the same x0 and eps, so the conversion is exact (Kingma et
al. 2021, "Variational Diffusion Models", Sec. 3: the SNR is all a Gaussian diffusion's marginals
depend on), and every sampler and guidance rule of cfgx works unchanged on the result.

Predictions: ``eps``; ``x0`` (EDM's D(x; sigma) is this, with time ``edm``); ``v`` (Salimans & Ho
2022, v = alpha eps - sigma x0 on the variance-preserving normalisation); ``flow`` (the velocity
dx'/dtau of the model's own path, Lipman et al. 2023 / Liu et al. 2023; SiT's is ``flow`` with time
``flow_rev``).

Time variables (what the network is called with):
  ``ddpm``     discrete t of the model's own beta schedule (``schedule``), fractional where its
               log-SNR falls between two of the model's steps, times ``time_scale``;
  ``vp``       continuous VP-SDE time in [0, 1] (Song et al. 2021, linear beta(t) from ``beta_min``
               to ``beta_max``), times ``time_scale`` (score_sde's DDPM ports use 999);
  ``edm``      EDM's sigma (Karras et al. 2022): x' = x0 + sigma n, sigma = exp(-lambda);
  ``flow``     rectified-flow t (x' = (1 - t) x0 + t n; t = 1 is noise), times ``time_scale``;
  ``flow_rev`` SiT's t (x' = t x0 + (1 - t) n; t = 1 is data), times ``time_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError

PREDICTIONS = ("eps", "x0", "v", "flow")
TIMES = ("ddpm", "vp", "edm", "flow", "flow_rev")


@dataclass(frozen=True)
class Conventions:
    """What an external denoiser predicts and how it is called: ``net(x', time, y)``.

    ``null_index``: the label the network reads as "no class" (diffusers' DiT: its
    ``num_embeds_ada_norm``); None when a separate unconditional network (called ``uncond(x', time)``)
    serves as the null branch. ``learned_sigma``: the output has 2C channels, eps-like ones first
    (Nichol & Dhariwal 2021); the adapter returns the first C and keeps the rest for
    ``sampler.variance=learned`` (``learned_variance_source``). ``schedule``: the model's own
    ``NoiseSchedule`` keyword arguments (time ``ddpm``).
    """

    prediction: str = "eps"
    time: str = "ddpm"
    num_classes: int = 0
    null_index: int | None = None
    learned_sigma: bool = False
    time_scale: float = 1.0
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "linear", "num_steps": 1000})
    beta_min: float = 0.1
    beta_max: float = 20.0

    def check(self, has_uncond: bool) -> None:
        if self.prediction not in PREDICTIONS:
            raise CfgxError(f"model prediction {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.time not in TIMES:
            raise CfgxError(f"model time {self.time!r} is not one of {', '.join(TIMES)}")
        if self.num_classes < 1:
            raise CfgxError("the model declares no classes (num_classes < 1); cfgx guides class-conditional models")
        if self.null_index is None and not has_uncond:
            raise CfgxError("the model says neither how it reads 'no class' (null_index) nor gives an unconditional "
                            "network; declare one of them")

    def describe(self) -> str:
        return f"{self.prediction}-prediction, {self.time} time"


def _sched_logsnr(schedule: NoiseSchedule) -> torch.Tensor:
    abar = schedule.alpha_bars.double()
    return 0.5 * torch.log(abar / (1 - abar))  # decreasing in t


class ProcessMap:
    """lambda -> (the model's time value, a', s', da'/dtau, ds'/dtau), all float64 [B]."""

    def __init__(self, conv: Conventions) -> None:
        self.conv = conv
        self.lam_table = _sched_logsnr(NoiseSchedule(**conv.schedule)) if conv.time == "ddpm" else None

    def __call__(self, lam: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c, one = self.conv, torch.ones_like(lam)
        alpha, sigma = torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
        zero = torch.zeros_like(lam)
        if c.time == "ddpm":
            return self._ddpm_time(lam) * c.time_scale, alpha, sigma, zero, zero
        if c.time == "vp":
            # log abar(t) = -(b0 t + (b1 - b0) t^2 / 2); abar = sigmoid(2 lambda); solve the quadratic.
            b0, d = c.beta_min, c.beta_max - c.beta_min
            log_abar = torch.nn.functional.logsigmoid(2 * lam)
            t = (-b0 + torch.sqrt(b0 * b0 - 2 * d * log_abar)) / d
            return t * c.time_scale, alpha, sigma, zero, zero
        if c.time == "edm":
            return torch.exp(-lam), one, torch.exp(-lam), zero, zero
        t = sigma / (alpha + sigma)  # noise fraction: a'/s' = (1 - t)/t = alpha/sigma
        if c.time == "flow":
            return t * c.time_scale, 1 - t, t, -one, one  # velocity per unit t, whatever the time scale
        return (1 - t) * c.time_scale, 1 - t, t, one, -one  # flow_rev: tau = 1 - t, a' = tau

    def _ddpm_time(self, lam: torch.Tensor) -> torch.Tensor:
        """Fractional model timestep with the model's log-SNR = lam (piecewise linear in lambda)."""
        table = self.lam_table.to(lam.device)
        neg = -table  # increasing
        hi = torch.searchsorted(neg, -lam).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = (lam - table[lo]) / (table[hi] - table[lo])
        t = lo.double() + frac.clamp(0, 1)
        # On the grid (cfgx and the model share a schedule) the time is the integer step, exactly.
        near = torch.round(t)
        return torch.where((t - near).abs() < 1e-6, near, t)


def to_eps(pred: torch.Tensor, xp: torch.Tensor, a: torch.Tensor, s: torch.Tensor, da: torch.Tensor,
           ds: torch.Tensor, prediction: str) -> torch.Tensor:
    """eps from a prediction at x' = a x0 + s eps (float64 throughout)."""
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return (xp - a * pred) / s
    if prediction == "v":
        r = torch.sqrt(a * a + s * s)  # v is defined on the variance-preserving normalisation
        return (s / r) * (xp / r) + (a / r) * pred
    # flow velocity u = da x0 + ds eps, solved with x' for eps
    return (a * pred - da * xp) / (a * ds - da * s)


class ExternalDenoiser(nn.Module):
    """cfgx's ``model(x, t, y) -> eps`` for an external ``net(x', time, y)`` under ``conv``.

    ``schedule`` is cfgx's (what the sampler walks); labels ``num_classes`` (cfgx's null) go to
    ``conv.null_index`` or, without one, to ``uncond``.
    """

    def __init__(self, net: Any, conv: Conventions, schedule: NoiseSchedule, uncond: Any = None,
                 name: str = "external", codec: LatentCodec | None = None,
                 sample_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        conv.check(uncond is not None)
        self.net, self.uncond, self.conv, self.schedule, self.name = net, uncond, conv, schedule, name
        self.codec, self.sample_shape = codec, sample_shape
        self.weights_sha256: str | None = None  # set by the run's loader once the files are re-hashed
        self.guide_channels: int | None = None  # set_guide_channels: DiT/SiT's published "guide 3 of 4" option
        if codec is not None:  # a latent x0 is no image: clipping it to [-1, 1] would distort it (the sweep reads this)
            self.clip_x0 = None
        self.num_classes = int(conv.num_classes)
        self.map = ProcessMap(conv)
        self._lam = _sched_logsnr(schedule)
        theirs = NoiseSchedule(**conv.schedule).alpha_bars if conv.time == "ddpm" else None
        # Whether cfgx's timesteps are the model's own DDPM steps (the same betas): cfgx import arranges it.
        self.own_grid = bool(theirs is not None and conv.time_scale == 1 and theirs.shape == schedule.alpha_bars.shape
                             and torch.allclose(theirs, schedule.alpha_bars, rtol=0, atol=1e-12))
        self._variance: torch.Tensor | None = None  # learned-variance channels of the last call (learned_variance)
        self.keep_variance = False  # set when a sampler reads them (learned_variance_source): otherwise not kept

    def row_fields(self) -> dict[str, Any]:
        """Columns naming the model's conventions; rules not linear in the prediction (rescale, APG,
        CFG-Zero*) act on cfgx's eps / x0 of the VP process, which ``guidance_space`` says."""
        return {"model": self.name, "model_sha256": self.weights_sha256, "model_prediction": self.conv.prediction,
                "model_time": self.conv.time,
                "guide_channels": self.guide_channels,
                "guidance_space": f"cfgx VP eps/x0 (converted from the model's {self.conv.prediction})"}

    def set_guide_channels(self, k: int | None) -> None:
        """Guide only the first ``k`` channels (off: None). facebookresearch/DiT's and SiT's ``forward_with_cfg``
        guide eps[:, :3] of the 4 latent channels and keep the conditional prediction in the rest, which is what
        their published scales mean (DiT#12). Here the null branch's channels >= k are replaced by the
        conditional branch's whenever a rule evaluates the pair as one batch (cond rows, then null rows, same
        x): the guidance signal in those channels is zero, so rules linear in the prediction (cfg, interval,
        weight schedules) leave them at the conditional prediction exactly as DiT does; the others (APG's
        projection, rescale's norms) still act on all channels. Rows with only null labels (s = 0) are unchanged."""
        if k is not None and (int(k) < 1 or (self.sample_shape and int(k) > self.sample_shape[0])):
            raise CfgxError(f"guide_channels={k} must be between 1 and the model's channels")
        self.guide_channels = None if k is None else int(k)

    def _pair_half(self, x: torch.Tensor, y: torch.Tensor) -> int | None:
        """B when the call is the cond/null pair batch rules make (cond rows, then null rows, same x), else None."""
        b, null = x.shape[0] // 2, y == self.num_classes
        if x.shape[0] % 2 or not null[b:].all() or null[:b].any() or not torch.equal(x[:b], x[b:]):
            return None
        return b

    def _keep_tail_conditional(self, out: torch.Tensor, b: int | None) -> torch.Tensor:
        k = self.guide_channels
        if k is None or b is None:
            return out
        out = out.clone()
        out[b:, k:] = out[:b, k:]
        return out

    def learned_variance(self) -> torch.Tensor:
        """The variance output v (Nichol & Dhariwal 2021) of the rows the last call evaluated, float32.

        For the cond/null pair batch, the conditional half: facebookresearch/DiT's ``forward_with_cfg``
        returns the conditional rows' variance channels with the guided eps, and ``p_sample`` uses them,
        so guidance (and ``guide_channels``) acts on eps only. A call on one branch (s = 1: cond; s = 0 or
        classifier guidance: null) leaves its own rows' v. Rules evaluate the denoiser once per step
        (a pair, or one branch), so after eps_fn this is the step's v.
        """
        if self._variance is None:
            raise RuntimeError("no learned variance: the model has not been called, or has no variance channels")
        return self._variance

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1]: decoded in batches for a latent model, unchanged otherwise."""
        return x if self.codec is None else self.codec.decode(x.to(self.device_of())).float().cpu()

    def device_of(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def _call(self, net: Any, xp: torch.Tensor, time: torch.Tensor,
              y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the eps-like channels, the learned-variance channels or None)."""
        out = net(xp, time) if y is None else net(xp, time, y)
        if self.conv.learned_sigma:
            return out[:, : xp.shape[1]], out[:, xp.shape[1]:]
        return out, None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # VP time (ddpm, vp) is cfgx's own process: x' = x, and an eps prediction needs no conversion.
        same = self.conv.time in ("ddpm", "vp")
        if self.own_grid and self.conv.prediction == "eps":
            # What cfgx import sets up for a DDPM model: cfgx's step is the model's, nothing to map (and, on a
            # GPU, no per-step table copy or host sync for the time lookup).
            xp, time = x, t.long().reshape(-1)
        else:
            lam = self._lam.to(x.device)[t.long().reshape(-1)]
            time, a, s, da, ds = self.map(lam)
            sigma = torch.sigmoid(-2 * lam).sqrt()
            view = (-1, *([1] * (x.dim() - 1)))
            c = (s / sigma).view(view)  # x' = c x: the model's process at cfgx's log-SNR
            xp = x if same else (x.double() * c).to(x.dtype)  # the network sees its usual dtype ...
            if self.conv.time == "ddpm" and self.conv.time_scale == 1 and bool((time == time.round()).all()):
                time = time.long()  # on the model's own grid: the integer step it was trained on
        null = y == self.num_classes
        if self.conv.null_index is not None or not null.any():
            yy = torch.where(null, torch.full_like(y, int(self.conv.null_index or 0)), y)
            out, var = self._call(self.net, xp, time, yy)
        else:
            out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
            var = torch.empty(x.shape, device=x.device) if self.conv.learned_sigma else None
            for rows, net, yy in ((~null, self.net, y), (null, self.uncond, None)):
                if rows.any():
                    o, v = self._call(net, xp[rows], time[rows], None if yy is None else yy[rows])
                    out[rows] = o.double()
                    if var is not None:
                        var[rows] = v.float()
        keep = var is not None and self.keep_variance
        # Finding the pair compares the halves (a host sync on a GPU): only when something needs it.
        pair = self._pair_half(x, y) if self.guide_channels is not None or keep else None
        if keep:
            self._variance = (var if pair is None else var[:pair]).float()
        if same and self.conv.prediction == "eps":
            return self._keep_tail_conditional(out.float(), pair)
        # ... and the conversion uses exactly what it saw, in float64
        eps = to_eps(out, xp.double(), a.view(view), s.view(view), da.view(view), ds.view(view), self.conv.prediction)
        return self._keep_tail_conditional(eps.float(), pair)


def learned_variance_source(model: Any, schedule: NoiseSchedule) -> Callable[[], torch.Tensor]:
    """The DDPM sampler's ``variance_source`` for ``sampler.variance=learned``: the model's own variance output.

    Refused in one line (CfgxError) unless the model outputs learned-variance channels and is called on
    cfgx's own DDPM timesteps: its v interpolates between log beta and log beta-tilde of the chain it was
    trained on, which the sampler's steps are only when the run's schedule is the model's (what
    ``cfgx import`` sets for a DDPM-time model).
    """
    fix = "use sampler.variance=fixed_small (the default)"
    if not isinstance(model, ExternalDenoiser):
        raise CfgxError("sampler.variance=learned needs a model that outputs its variance (e.g. an imported DiT); "
                        f"this run's network predicts eps only; {fix}")
    c = model.conv
    if not c.learned_sigma:
        raise CfgxError(f"sampler.variance=learned: {model.name} has no learned-variance output channels (its "
                        f"output has as many channels as its input); {fix}")
    sampled_on = model.schedule is schedule or torch.equal(model.schedule.alpha_bars, schedule.alpha_bars)
    if not (model.own_grid and sampled_on):
        raise CfgxError(f"sampler.variance=learned: {model.name} is not called on this run's DDPM timesteps ("
                        f"{c.describe()}), so its variance is not of the sampler's chain; {fix}")
    model.keep_variance = True  # from now on each call keeps its rows' variance for the sampler to read
    return model.learned_variance


class LatentCodec(nn.Module):
    """Latent -> image: ``decoder(z / scale + shift)`` in batches (diffusers' AutoencoderKL convention).

    A module, so that moving the denoiser to a device moves its decoder with it.
    """

    def __init__(self, decoder: nn.Module, scale: float = 1.0, shift: float = 0.0, batch_size: int = 16) -> None:
        super().__init__()
        self.decoder, self.scale, self.shift, self.batch_size = decoder, float(scale), float(shift), int(batch_size)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.decoder(zb / self.scale + self.shift) for zb in z.split(self.batch_size)])


def log_snr(abar: float) -> float:
    return 0.5 * math.log(abar / (1 - abar))
