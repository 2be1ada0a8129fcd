"""Guidance: how a sampler turns a denoiser (and optionally a classifier) into one eps.

Convention used everywhere in cfgx (scale ``s``):

    eps_hat = eps(x, null) + s * (eps(x, c) - eps(x, null))

s = 0 is unconditional, s = 1 conditional, s > 1 guided. Ho & Salimans (2022)
write the same thing with w = s - 1.

Denoiser contract: ``model(x, t, y) -> eps`` with ``y`` a LongTensor of labels in
[0, num_classes]; index ``model.num_classes`` is the reserved null label.
Classifier contract (classifier guidance): ``classifier(x_t, t) -> logits``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def null_labels_like(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.full_like(y, num_classes)


def cfg_eps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Classifier-free guided eps (Ho & Salimans 2022) in the cfgx convention.

    s = 0 and s = 1 need one network evaluation; any other scale runs cond and
    null as one batch of 2B so the GPU sees a single launch per step.
    """
    null = null_labels_like(y, model.num_classes)
    if scale == 0:
        return model(x, t, null).float()
    if scale == 1:
        return model(x, t, y).float()
    cond, uncond = cond_uncond(model, x, t, y)
    return uncond + scale * (cond - uncond)


def classifier_grad(classifier: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t), computed with autograd even inside no_grad sampling."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logp = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
        sel = logp.gather(1, y.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(sel, x_in)
    return grad


def cg_eps(model: torch.nn.Module, classifier: torch.nn.Module, sigma_t: torch.Tensor,
           x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier guidance (Dhariwal & Nichol 2021) on the unconditional branch.

    eps_hat = eps(x, null) - s * sigma_t * grad log p_phi(c | x_t). With an exact
    classifier and s = 1 this is the exact conditional eps.
    """
    null = null_labels_like(y, model.num_classes)
    eps = model(x, t, null).float()
    if scale == 0:
        return eps
    grad = classifier_grad(classifier, x, t, y)
    sig = sigma_t.view(-1, *([1] * (x.dim() - 1)))
    return eps - scale * sig * grad.float()


# ---------------------------------------------------------------- the guidance lab
#
# Every rule below takes the same per-step inputs (the noisy x_t, abar_t, the scale s of this
# step) and returns eps in the cfgx convention, so the samplers stay guidance-agnostic. Rules
# defined on the denoised prediction D = x0_hat (APG, rescale) convert with
#     x0 = (x - sqrt(1 - abar) eps) / sqrt(abar),   so  d eps = -sqrt(abar / (1 - abar)) d x0,
# and return eps_cfg plus the correction in float64: where the correction vanishes (phi = 0,
# eta = 1, ...) the result is CFG's eps to the last bit or within float32 rounding.

METHODS = ("cfg", "classifier", "interval", "rescale", "apg", "cfgpp", "autoguidance", "cfgzero")
SCHEDULES = ("constant", "linear", "cosine")
# Rules whose per-step scale may follow a schedule (CFG++'s lambda and CG keep theirs constant).
SCHEDULABLE = ("cfg", "interval", "rescale", "apg", "autoguidance", "cfgzero")


def edm_sigma(abar: float) -> float:
    """The EDM noise level of a VP step: x_t / sqrt(abar) = x0 + sigma * n, sigma = sqrt((1-abar)/abar)."""
    return math.sqrt((1.0 - abar) / abar) if abar > 0 else math.inf


def scheduled_scale(kind: str, s: float, index: int, num_steps: int) -> float:
    """Guidance weight schedules (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
    Schedulers", TMLR): monotonically *increasing* weights, low at high noise and high near the data.

    With progress u = i / (N - 1) over the N sampling steps (u = 0 at the noisiest step):
    ``linear`` s_i = 2 s u and ``cosine`` s_i = s (1 - cos(pi u)); both have mean exactly s over
    the N steps (the cosine terms cancel in pairs), so a row's s is the schedule's mean and rows
    stay comparable with constant CFG at the same s. ``constant`` is s at every step.
    """
    if kind == "constant" or num_steps <= 1:
        return s
    u = index / (num_steps - 1)
    if kind == "linear":
        return 2.0 * s * u
    if kind == "cosine":
        return s * (1.0 - math.cos(math.pi * u))
    raise ValueError(f"unknown guidance schedule {kind!r}; valid: {', '.join(SCHEDULES)}")


def cond_uncond(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps(x, c), eps(x, null)) in float32 from one batch of 2B (one launch per step on a GPU)."""
    null = null_labels_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    # Under bf16 autocast the network returns bf16; the difference cond - uncond is small and
    # multiplied by s, so combine in float32 or the rounding error grows with the scale.
    cond, uncond = out.float().chunk(2)
    return cond, uncond


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _x0(x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    return (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def _eps_plus_x0_delta(eps: torch.Tensor, delta_x0: torch.Tensor, abar: float) -> torch.Tensor:
    """eps of the prediction whose x0 is x0(eps) + delta_x0 (delta in float64, result float32)."""
    return (eps.double() - math.sqrt(abar / (1.0 - abar)) * delta_x0).float()


def interval_eps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float,
                 abar: float, lo: float, hi: float | None) -> torch.Tensor:
    """Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024, "Applying guidance in a
    limited interval improves sample and distribution quality in diffusion models").

    CFG at ``scale`` while the noise level sigma_t = sqrt((1 - abar_t) / abar_t) lies in
    [lo, hi] (``hi=None``: unbounded); outside it the conditional prediction alone, one network
    evaluation. Guidance at high noise mostly collapses diversity, at low noise it does little.
    """
    sigma = edm_sigma(abar)
    if lo <= sigma and (hi is None or sigma <= hi):
        return cfg_eps(model, x, t, y, scale)
    return model(x, t, y).float()


def rescale_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, x: torch.Tensor, abar: float, scale: float,
                phi: float, space: str = "x0") -> torch.Tensor:
    """Guidance rescale (Lin et al., WACV 2024, "Common diffusion noise schedules and sample steps
    are flawed", Sec. 3.4): rescale the CFG prediction to the per-sample standard deviation of the
    conditional one, then mix, x = phi * x_cfg * std(x_c) / std(x_cfg) + (1 - phi) * x_cfg.

    The paper rescales the x0 prediction (``space="x0"``, default); diffusers' ``guidance_rescale``
    rescales eps (``space="eps"``). phi = 0 is CFG exactly; the paper recommends phi = 0.7.
    """
    eps_cfg = eps_u + scale * (eps_c - eps_u)
    dims = tuple(range(1, x.dim()))
    if space == "eps":
        pos, cfg = eps_c.double(), eps_cfg.double()
    else:
        pos, cfg = _x0(x.double(), eps_c.double(), abar), _x0(x.double(), eps_cfg.double(), abar)
    # The std ratio does not depend on Bessel's correction; correction=0 keeps one-element samples
    # (1-D toys) defined, where both stds are 0 and rescaling is the identity.
    sd_pos, sd_cfg = pos.std(dim=dims, keepdim=True, correction=0), cfg.std(dim=dims, keepdim=True, correction=0)
    factor = torch.where(sd_cfg > 0, sd_pos / sd_cfg.clamp_min(1e-300), torch.ones_like(sd_cfg))
    delta = phi * (factor - 1.0) * cfg  # phi * x_rescaled + (1 - phi) * x_cfg - x_cfg
    if space == "eps":
        return (eps_cfg.double() + delta).float()
    return _eps_plus_x0_delta(eps_cfg, delta, abar)


class APG:
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, "Eliminating
    oversaturation and artifacts of high guidance scales in diffusion models", Algorithm 1).

    On the denoised predictions D_c, D_u (x0 space), per step:
      1. dD = D_c - D_u; with momentum beta (negative in the paper, e.g. -0.5):
         m <- dD + beta * m, dD <- m (state kept across the steps of one batch);
      2. norm cap r: dD <- dD * min(1, r / ||dD||) per sample (``norm_threshold=None``: off);
      3. split dD into the part parallel to D_c and the orthogonal rest, keep
         dD_orth + eta * dD_par (eta = 0 drops the parallel part, the paper's cause of
         oversaturation);
      4. D = D_c + (s - 1) * that.
    With eta = 1, no momentum and no cap it is CFG. One instance per batch of samples.
    """

    def __init__(self, eta: float = 0.0, norm_threshold: float | None = None, momentum: float = 0.0) -> None:
        self.eta, self.norm_threshold, self.momentum = float(eta), norm_threshold, float(momentum)
        self.running: torch.Tensor | None = None

    def __call__(self, eps_c: torch.Tensor, eps_u: torch.Tensor, x: torch.Tensor, abar: float,
                 scale: float) -> torch.Tensor:
        eps_cfg = eps_u + scale * (eps_c - eps_u)
        x64 = x.double()
        d_c, d_u = _x0(x64, eps_c.double(), abar), _x0(x64, eps_u.double(), abar)
        raw = d_c - d_u
        diff = raw
        if self.momentum != 0.0:
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        dims = tuple(range(1, x.dim()))
        if self.norm_threshold is not None and self.norm_threshold > 0:
            norm = diff.flatten(1).norm(dim=1).clamp_min(1e-12)
            diff = diff * _bshape(torch.clamp(self.norm_threshold / norm, max=1.0), diff)
        unit = d_c / _bshape(d_c.flatten(1).norm(dim=1).clamp_min(1e-12), d_c)
        par = (diff * unit).sum(dim=dims, keepdim=True) * unit
        update = (diff - par) + self.eta * par
        # D_apg - D_cfg, with D_cfg = D_c + (s - 1) * raw in exact arithmetic.
        delta = (scale - 1.0) * (update - raw)
        return _eps_plus_x0_delta(eps_cfg, delta, abar)


def cfgpp_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG++ (Chung et al., ICLR 2025, "CFG++: Manifold-constrained classifier free guidance for
    diffusion models"), the DDIM form: denoise with eps_lam = eps_u + lam * (eps_c - eps_u),
    lam in [0, 1], but re-noise with the *unconditional* eps_u. Returns (eps_lam, eps_u) for a
    sampler that accepts a separate re-noising eps (DDIM). lam = 0 is unconditional DDIM.
    """
    return eps_u + lam * (eps_c - eps_u), eps_u


def autoguidance_eps(good: torch.nn.Module, bad: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor, scale: float) -> torch.Tensor:
    """Autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version
    of itself"): D = D_bad(x|c) + s (D_good(x|c) - D_bad(x|c)), both conditional; eps is affine in D,
    so the same combination holds for eps. The guide is a weaker model of the same task (an earlier
    EMA snapshot or a smaller run). s = 1 is the good model alone, s = 0 the bad one (1 evaluation);
    otherwise two (different networks, so no 2B batch).
    """
    if scale == 1:
        return good(x, t, y).float()
    if scale == 0:
        return bad(x, t, y).float()
    e_bad = bad(x, t, y).float()
    e_good = good(x, t, y).float()
    return e_bad + scale * (e_good - e_bad)


def cfg_zero_star_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved classifier-free guidance for flow matching
    models"), the optimised scale: project the conditional prediction onto the unconditional one,
    alpha* = <eps_c, eps_u> / ||eps_u||^2 per sample, and guide from alpha* eps_u:
    eps = alpha* eps_u + s (eps_c - alpha* eps_u). s = 1 is the conditional prediction.

    The paper's second ingredient, zeroing the first steps' velocity, is specific to flow matching
    (v = 0 leaves x unchanged); an eps = 0 step of a VP sampler is not a no-op, so it is not used.
    """
    dims = tuple(range(1, eps_c.dim()))
    c, u = eps_c.double(), eps_u.double()
    alpha = (c * u).sum(dim=dims, keepdim=True) / (u * u).sum(dim=dims, keepdim=True).clamp_min(1e-12)
    base = alpha * u
    return (base + scale * (c - base)).float()


@dataclass(frozen=True)
class GuidanceSpec:
    """One guidance rule with its options: what a sweep row's ``method`` and key stand for."""

    method: str = "cfg"
    schedule: str = "constant"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human name: 'cfg', 'cfg@linear', 'apg', ..."""
        return self.method if self.schedule == "constant" else f"{self.method}@{self.schedule}"

    def tag(self) -> str:
        """File-name part of the row key: plain 'cfg' stays 'cfg' (old rows keep their keys)."""
        if self.method == "cfg" and self.schedule == "constant":
            return "cfg"
        blob = json.dumps({"s": self.schedule, "o": self.options}, sort_keys=True, default=str)
        sched = "" if self.schedule == "constant" else f"_{self.schedule}"
        return f"{self.method}{sched}-{hashlib.sha256(blob.encode()).hexdigest()[:6]}"


def cfgpp_lambda(scale: float, s_at_lambda1: float) -> float:
    """CFG++'s lambda for a row's s: the paper equates lambda in [0, 1] with roughly the usual CFG
    range, so s maps linearly, lambda = s / s_at_lambda1 (s = 0 <-> lambda = 0: unconditional)."""
    return scale / s_at_lambda1


class GuidedEps:
    """eps_fn(x_t, t) for one batch under ``spec``: the samplers' view of every rule.

    Holds what a rule needs per step (abar_t, the step's index for schedules, APG's momentum),
    so one instance serves exactly one batch of samples. For CFG++ it returns (eps, eps_renoise).
    """

    def __init__(self, spec: GuidanceSpec, model: torch.nn.Module, y: torch.Tensor, scale: float,
                 noise_schedule, timesteps: list[int], classifier: torch.nn.Module | None = None,
                 guide: torch.nn.Module | None = None) -> None:
        self.spec, self.model, self.y, self.scale = spec, model, y, float(scale)
        self.noise_schedule, self.classifier, self.guide = noise_schedule, classifier, guide
        self.index = {int(t): i for i, t in enumerate(timesteps)}
        self.num_steps = len(timesteps)
        o = spec.options
        self.apg = (APG(float(o.get("eta", 0.0)), o.get("norm_threshold"), float(o.get("momentum", 0.0)))
                    if spec.method == "apg" else None)
        if spec.method == "autoguidance" and guide is None:
            raise ValueError("autoguidance needs a guide model")
        if spec.method == "classifier" and classifier is None:
            raise ValueError("classifier guidance needs a classifier")

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        ti = int(t.reshape(-1)[0])
        abar = float(self.noise_schedule.alpha_bars[ti])
        s = scheduled_scale(self.spec.schedule, self.scale, self.index.get(ti, 0), self.num_steps)
        m, o, model, y = self.spec.method, self.spec.options, self.model, self.y
        if m == "cfg":
            return cfg_eps(model, x, t, y, s)
        if m == "classifier":
            return cg_eps(model, self.classifier, self.noise_schedule.sigma(t), x, t, y, s)
        if m == "interval":
            lo, hi = o.get("sigma", (0.0, None))
            return interval_eps(model, x, t, y, s, abar, float(lo), None if hi is None else float(hi))
        if m == "autoguidance":
            return autoguidance_eps(model, self.guide, x, t, y, s)
        if m == "cfgpp":
            lam = cfgpp_lambda(s, float(o.get("s_at_lambda1", 12.5)))
            if lam == 0:
                eps_u = model(x, t, null_labels_like(y, model.num_classes)).float()
                return eps_u, eps_u
            return cfgpp_eps(*cond_uncond(model, x, t, y), lam)
        if s in (0.0, 1.0) and m != "cfgzero":
            return cfg_eps(model, x, t, y, s)  # nothing to rescale or project: plain s = 0 / s = 1
        eps_c, eps_u = cond_uncond(model, x, t, y)
        if m == "rescale":
            return rescale_eps(eps_c, eps_u, x, abar, s, float(o.get("phi", 0.7)), str(o.get("space", "x0")))
        if m == "apg":
            return self.apg(eps_c, eps_u, x, abar, s)
        if m == "cfgzero":
            return cfg_zero_star_eps(eps_c, eps_u, s)
        raise ValueError(f"unknown guidance method {m!r}; valid: {', '.join(METHODS)}")
