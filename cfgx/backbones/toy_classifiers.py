"""Small trainable noisy classifiers for classifier guidance on toy data.

Classifier guidance (Dhariwal & Nichol 2021) needs p_phi(c | x_t, t) at every
noise level; Zhao & Schwing 2025 ("Studying Classifier(-Free) Guidance From a
Classifier-Centric Perspective", arXiv 2503.10638) compare guidance from such
learned classifiers with the exact one. Both modules follow the cfgx classifier
contract ``classifier(x_t, t) -> logits``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cfgx.data.gmm import GaussianMixture
from cfgx.diffusion.schedule import NoiseSchedule


def time_embedding(t: torch.Tensor, num_steps: int, dim: int) -> torch.Tensor:
    """Sinusoidal features of t / num_steps in [0, 1): [B, dim] (dim even)."""
    tau = t.to(torch.float32).reshape(-1, 1) / num_steps
    # Low frequencies only: t/T lives in [0, 1), so periods far below 1/T would just alias noise.
    freqs = math.pi * torch.arange(1, dim // 2 + 1, dtype=torch.float32, device=t.device)
    return torch.cat([torch.sin(tau * freqs), torch.cos(tau * freqs)], dim=1)


class LinearNoisyClassifier(nn.Module):
    """Logits linear in x_t for each t: W(t) x_t + b(t), W and b linear in a time embedding.

    The exact noisy posterior of two equal-std Gaussians has this form (logit slope
    2 mu sqrt(abar) / v(t), shrinking with noise), so the time-modulated weights can
    track it closely for gmm1d; a plain linear model on [x, t] has one slope for all t.
    """

    def __init__(self, dim: int, num_classes: int, num_steps: int = 1000, emb_dim: int = 8) -> None:
        super().__init__()
        self.dim, self.num_classes, self.num_steps, self.emb_dim = dim, num_classes, num_steps, emb_dim
        self.linear = nn.Linear(dim + dim * (emb_dim + 1) + emb_dim + 1, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # A constant 1 in the embedding keeps a t-independent weight/bias alongside the modulated ones.
        e = time_embedding(t, self.num_steps, self.emb_dim).to(x_t.dtype)
        e = torch.cat([torch.ones_like(e[:, :1]), e], dim=1)
        xe = (x_t[:, :, None] * e[:, None, :]).flatten(1)
        return self.linear(torch.cat([x_t, xe, e], dim=1))


class MLPNoisyClassifier(nn.Module):
    """MLP on [x_t, sinusoidal embedding of t/T] -> logits."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 64, num_steps: int = 1000,
                 emb_dim: int = 16) -> None:
        super().__init__()
        self.dim, self.num_classes, self.num_steps, self.emb_dim = dim, num_classes, num_steps, emb_dim
        self.net = nn.Sequential(
            nn.Linear(dim + emb_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = time_embedding(t, self.num_steps, self.emb_dim).to(x_t.dtype)
        return self.net(torch.cat([x_t, e], dim=1))


def train_noisy_classifier(clf: nn.Module, data: GaussianMixture | tuple[torch.Tensor, torch.Tensor],
                           schedule: NoiseSchedule, steps: int = 500, batch: int = 256, lr: float = 1e-2,
                           generator: torch.Generator | None = None) -> nn.Module:
    """Fit ``clf`` to p(c | x_t, t) by cross-entropy on noised clean data; returns it in eval mode.

    ``data`` is either a mixture (fresh samples every step) or a fixed (x, y) pair
    (minibatches drawn with replacement). t is uniform over the schedule's steps
    and x_t = q_sample(x_0, t, eps), the noising the sampler's x_t follows. Runs
    on the device of ``clf``'s parameters; all randomness comes from ``generator``
    (CPU), so a seed reproduces the classifier.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = next(clf.parameters()).device
    if not isinstance(data, GaussianMixture):
        x_all, y_all = (d.cpu() for d in data)
        if x_all.shape[0] != y_all.shape[0] or x_all.shape[0] == 0:
            raise ValueError("train_noisy_classifier needs matching, non-empty (x, y)")
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    clf.train()
    for _ in range(steps):
        if isinstance(data, GaussianMixture):
            x0, y = data.sample(batch, generator)
        else:
            idx = torch.randint(0, x_all.shape[0], (batch,), generator=generator)
            x0, y = x_all[idx].float(), y_all[idx].long()
        t = torch.randint(0, schedule.num_steps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.q_sample(x0, t, noise)
        loss = F.cross_entropy(clf(x_t.to(device), t.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()
