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

from collections.abc import Callable

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
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    # Under bf16 autocast the network returns bf16; the difference cond - uncond is small and
    # multiplied by s, so combine in float32 or the rounding error grows with the scale.
    cond, uncond = out.float().chunk(2)
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
