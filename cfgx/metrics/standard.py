"""FID, KID and Inception Score from precomputed features.

The math is torchmetrics' own (its Fréchet distance and polynomial-kernel MMD),
run in float64 on features computed once by :mod:`cfgx.metrics.inception`, so a
sweep over guidance scales extracts each image's features exactly once and the
real-data statistics can be cached.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from cfgx.errors import CfgxError
from cfgx.metrics.diversity import as_features


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``[N, D]`` features, as FID needs them.

    Matches ``numpy.cov(rowvar=False)`` and torchmetrics' running-sum estimate, so
    cached real statistics are interchangeable with either tool's.
    """
    x = as_features(feats, "features", 2)
    mu = x.mean(dim=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def _fid_scipy(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    # Fallback from pytorch-fid / TTUR: regularise both covariances when the
    # product is too ill-conditioned for the eigenvalue route to stay finite.
    m1, m2 = mu1.cpu().numpy(), mu2.cpu().numpy()
    a, b = s1.cpu().numpy(), s2.cpu().numpy()
    covmean, _ = scipy.linalg.sqrtm(a @ b, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((a + offset) @ (b + offset))
    covmean = np.real(covmean)
    diff = m1 - m2
    return float(diff @ diff + np.trace(a) + np.trace(b) - 2 * np.trace(covmean))


def fid_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between two Gaussians (Heusel et al. 2017, "GANs Trained by a Two
    Time-Scale Update Rule Converge to a Local Nash Equilibrium").

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, with the trace of the matrix
    square root taken as the sum of square roots of the eigenvalues of ``S1 S2``
    (torchmetrics' ``_compute_fid``; robust where ``sqrtm`` fails on singular
    covariances, e.g. fewer samples than feature dimensions). Float64 throughout.
    """
    mu1, mu2 = (torch.as_tensor(m).detach().to(torch.float64).flatten() for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).detach().to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape[0] != d or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise CfgxError(
            f"FID statistics do not match: mu {d} vs {mu2.shape[0]}, sigma {tuple(sigma1.shape)} vs "
            f"{tuple(sigma2.shape)}: compute both with the same feature extractor (clear stale cached stats)"
        )
    value = float(_compute_fid(mu1, sigma1, mu2.to(mu1.device), sigma2.to(mu1.device)))
    if not math.isfinite(value):
        value = _fid_scipy(mu1, sigma1, mu2, sigma2)
    return value


def fid_from_features(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """FID (Heusel et al. 2017) between two ``[N, D]`` feature sets, in float64."""
    mu1, s1 = feature_stats(as_features(real_feats, "real features", 2))
    mu2, s2 = feature_stats(as_features(fake_feats, "fake features", 2))
    return fid_from_stats(mu1, s1, mu2, s2)


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    *,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): (mean, std).

    Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over
    ``subsets`` random subsets of ``subset_size`` from each set (torchmetrics'
    ``poly_mmd``; std is the population std over subsets, as torchmetrics reports).
    ``subset_size`` is clipped to the smaller set so small evaluations still run.
    Subsets are drawn from a generator seeded with ``seed`` in the same order as
    torchmetrics draws from the global RNG, so after ``torch.manual_seed(seed)``
    torchmetrics picks the identical subsets.
    """
    x = as_features(real, "real features", 2)
    y = as_features(fake, "fake features", 2)
    if x.shape[1] != y.shape[1]:
        raise CfgxError(
            f"KID feature dims differ ({x.shape[1]} vs {y.shape[1]}): "
            "use the same extractor for real and fake"
        )
    if subsets < 1:
        raise CfgxError(f"KID subsets must be >= 1, got {subsets}: set a positive number")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise CfgxError(f"KID subset_size must be >= 2, got {subset_size}: increase it")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)
        iy = torch.randperm(y.shape[0], generator=gen)[:m].to(y.device)
        scores.append(poly_mmd(x[ix], y[iy], degree=degree, gamma=gamma, coef=coef))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def inception_score_from_logits(
    logits: torch.Tensor | None, splits: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs"): (mean, std).

    ``exp(E_x KL(p(y|x) || p(y)))`` per split, mean and population std over splits.
    Samples are shuffled (``numpy.random.RandomState(seed)``, as torch-fidelity does)
    before splitting: samples generated class by class would otherwise put one
    class in each split, making ``p(y)`` per split collapse and IS depend on the
    split size (openai/guided-diffusion#165).

    Returns ``(nan, nan)`` when the score is unavailable: no logits, or all-zero
    logits (a zeroed classifier, which would otherwise report exactly 1.0).
    """
    nan = (float("nan"), float("nan"))
    if logits is None:
        return nan
    x = torch.as_tensor(logits).detach().to(torch.float64)
    if x.dim() != 2:
        raise CfgxError(f"IS logits must be [N, K], got shape {tuple(x.shape)}: pass the classifier logits")
    if not bool(x.any()):
        return nan
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise CfgxError(
            f"IS needs at least one sample per split ({n} samples, {splits} splits): lower is_splits"
        )
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(x.device)
    x = x[perm]
    log_p = x.log_softmax(dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_py = p[lo:hi].mean(dim=0, keepdim=True).log()
        # p underflowing to 0 for a class absent from the split makes log p(y) = -inf;
        # its contribution is 0 * inf, which must count as 0, not NaN.
        terms = p[lo:hi] * (log_p[lo:hi] - log_py)
        kl = torch.where(p[lo:hi] > 0, terms, torch.zeros_like(terms)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
