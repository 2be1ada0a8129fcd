"""Gaussian-mixture toys with exact noisy scores and an exact noisy classifier.

These are the exact-score toys of Zhao & Schwing 2025, "Studying Classifier(-Free)
Guidance From a Classifier-Centric Perspective" (arXiv 2503.10638): with the data
a Gaussian mixture, every quantity guidance needs is available in closed form, so
CG/CFG behaviour can be studied with no learned network in the way.

Noising under a DDPM schedule, x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, maps
component k = N(mu_k, s_k^2 I) to N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I),
so p_t(x_t), p_t(x_t | c) and p_t(c | x_t) are mixtures / ratios of mixtures of
Gaussians. A class may own several components, which is what makes 2D decision
boundaries curved.

``std`` is always a standard deviation (the paper's 1D cases N(+-mu, sigma^2) with
sigma = 0.05 are read as std 0.05, variance 0.0025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import TensorDataset

from cfgx.data.base import DatasetBundle
from cfgx.errors import CfgxError

AbarLike = float | torch.Tensor


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture whose components are assigned to classes.

    means: [K, D]; stds: [K] (per-component isotropic std); weights: [K], summing
    to 1; component_class: [K] LongTensor with values in [0, num_classes). Every
    class must own at least one component. Computation is float64 throughout.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    component_class: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        stds = torch.as_tensor(self.stds, dtype=torch.float64)
        self.stds = stds.expand(k).clone() if stds.dim() == 0 else stds
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.component_class = torch.as_tensor(self.component_class, dtype=torch.long)
        if self.stds.shape != (k,) or self.weights.shape != (k,) or self.component_class.shape != (k,):
            raise ValueError("stds, weights and component_class must each have one entry per component")
        if (self.stds <= 0).any() or (self.weights <= 0).any():
            raise ValueError("component stds and weights must be positive")
        if not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(f"component weights must sum to 1, got {float(self.weights.sum())}")
        counts = torch.bincount(self.component_class, minlength=self.num_classes)
        if self.component_class.min() < 0 or counts.numel() != self.num_classes or (counts == 0).any():
            raise ValueError("component_class must map onto every class in [0, num_classes)")

    # ---- basic properties -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def class_prior(self) -> torch.Tensor:
        """p(c) [C], the summed weights of each class's components."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(
            0, self.component_class, self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` clean samples: (x float32 [n, D], y long [n])."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp, None] * noise
        return x.float(), self.component_class[comp].clone()

    # ---- noised densities ---------------------------------------------------------------

    def _params(self, x: torch.Tensor, abar: AbarLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x as float64 [B, D], abar as float64 [B] and noised variances [B, K]."""
        x = x.to(torch.float64)
        a = torch.as_tensor(abar, dtype=torch.float64, device=x.device)
        a = a.expand(x.shape[0]) if a.dim() == 0 else a.reshape(-1)
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"abar has {a.shape[0]} entries for a batch of {x.shape[0]}")
        var = a[:, None] * self.stds.to(x.device)[None] ** 2 + (1.0 - a[:, None])
        return x, a, var

    def _joint_logits(self, x: torch.Tensor, abar: AbarLike) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
        """log w_k + log N(x; sqrt(abar) mu_k, v_k(t) I) [B, K], plus x, abar, var for reuse."""
        x, a, var = self._params(x, abar)
        mu = self.means.to(x.device)
        # |x - sqrt(a) mu_k|^2 expanded into matmuls: [B, K, D] temporaries and reductions over a
        # size-2 axis dominated sampling time. In float64 the cancellation error (~1e-16 |x|^2) is
        # far below the smallest noised variance (~1e-4), so nothing is lost.
        sq = ((x * x).sum(1, keepdim=True) - 2 * a.sqrt()[:, None] * (x @ mu.T)
              + a[:, None] * (mu * mu).sum(1)[None]).clamp_min(0.0)
        log_n = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return self.weights.to(x.device).log()[None] + log_n, x, a, var

    def _class_mask(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """[B, K] bool: component k belongs to y_b; label ``num_classes`` (null) keeps all."""
        if y is None:
            return None
        y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
        if y.numel() == 1 and batch != 1:
            y = y.expand(batch)
        if y.min() < 0 or y.max() > self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null)")
        cc = self.component_class.to(device)
        return (cc[None, :] == y[:, None]) | (y[:, None] == self.num_classes)

    def component_log_prob(self, x: torch.Tensor, abar: AbarLike = 1.0) -> torch.Tensor:
        """log w_k p_t(x | k) [B, K] (joint of component and x at noise level abar)."""
        return self._joint_logits(x, abar)[0]

    def log_prob(self, x: torch.Tensor, abar: AbarLike = 1.0, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x) [B], or log p_t(x | y) when labels are given (null label = marginal)."""
        logits = self._joint_logits(x, abar)[0]
        mask = self._class_mask(y, logits.shape[0], logits.device)
        if mask is None:
            return torch.logsumexp(logits, dim=1)
        # Renormalise by the class's prior mass so the conditional integrates to 1.
        w = self.weights.to(logits.device)[None].expand_as(logits)
        neg = torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device)
        return (torch.logsumexp(torch.where(mask, logits, neg), dim=1)
                - torch.logsumexp(torch.where(mask, w.log(), neg), dim=1))

    def score(self, x: torch.Tensor, abar: AbarLike, y: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log p_t(x [| y]) [B, D] in float64, via logsumexp responsibilities."""
        logits, x, a, var = self._joint_logits(x, abar)
        mask = self._class_mask(y, logits.shape[0], logits.device)
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        # sum_k r_k (sqrt(a) mu_k - x) / v_k, with r the (class-restricted) responsibilities.
        rv = torch.softmax(logits, dim=1) / var
        return a.sqrt()[:, None] * (rv @ self.means.to(x.device)) - rv.sum(1, keepdim=True) * x

    def eps(self, x: torch.Tensor, abar: AbarLike, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact eps-prediction E[eps | x_t(, y)] = -sqrt(1 - abar) grad log p_t, float64 [B, D]."""
        x64 = x.to(torch.float64)
        a = torch.as_tensor(abar, dtype=torch.float64, device=x64.device)
        a = a.expand(x64.shape[0]) if a.dim() == 0 else a.reshape(-1)
        return -(1.0 - a).sqrt()[:, None] * self.score(x64, a, y)

    def class_log_posterior(self, x: torch.Tensor, abar: AbarLike = 1.0) -> torch.Tensor:
        """log p_t(c | x_t) [B, C]: the exact noisy classifier (differentiable in x)."""
        logits = self._joint_logits(x, abar)[0]
        cc = self.component_class.to(logits.device)
        neg = torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device)
        per_class = torch.stack([torch.logsumexp(torch.where(cc[None] == c, logits, neg), dim=1)
                                 for c in range(self.num_classes)], dim=1)
        return per_class - torch.logsumexp(logits, dim=1, keepdim=True)


# ---- presets -------------------------------------------------------------------------------


def gmm1d(mu: float = 1.0, std: float = 0.05, weights: tuple[float, float] = (0.5, 0.5)) -> GaussianMixture:
    """The paper's 1D case: class 0 = N(-mu, std^2), class 1 = N(+mu, std^2); boundary near x = 0.

    The paper uses mu in {1.0, 0.5, 0.1}, sigma = 0.05 (taken here as the std).
    """
    if mu <= 0 or std <= 0:
        raise ValueError("gmm1d needs mu > 0 and std > 0")
    w = torch.tensor(weights, dtype=torch.float64)
    # Explicit float64: torch.tensor of Python floats would round 0.05 or 0.1 to float32 first.
    return GaussianMixture(means=torch.tensor([[-mu], [mu]], dtype=torch.float64),
                           stds=torch.tensor([std, std], dtype=torch.float64),
                           weights=w / w.sum(), component_class=torch.tensor([0, 1]), num_classes=2)


def gmm2d(num_classes: int = 3, components_per_class: int = 2, radius: float = 1.0,
          std: float = 0.25, inner_radius: float | None = None) -> GaussianMixture:
    """Several classes on the plane whose decision boundaries cross it.

    Components sit on a ring (radius ``radius``), interleaved so that neighbours
    belong to different classes; with ``components_per_class`` > 1 each class is
    split across the ring and its decision region is non-convex. ``inner_radius``
    (if set) alternates components between two rings, bending the boundaries
    further. Overlap is controlled by ``std`` relative to the ring spacing.
    Equal component weights.
    """
    if num_classes < 2 or components_per_class < 1:
        raise ValueError("gmm2d needs num_classes >= 2 and components_per_class >= 1")
    k = num_classes * components_per_class
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    r = torch.full((k,), float(radius), dtype=torch.float64)
    if inner_radius is not None:
        r[1::2] = float(inner_radius)
    means = torch.stack([r * ang.cos(), r * ang.sin()], dim=1)
    return GaussianMixture(means=means, stds=torch.full((k,), float(std), dtype=torch.float64),
                           weights=torch.full((k,), 1.0 / k, dtype=torch.float64),
                           component_class=torch.arange(k) % num_classes, num_classes=num_classes)


_PRESETS = {"gmm1d": gmm1d, "gmm2d": gmm2d}
_PRESET_KEYS = {
    "gmm1d": {"mu", "std", "weights"},
    "gmm2d": {"num_classes", "components_per_class", "radius", "std", "inner_radius"},
}
_BUNDLE_KEYS = {"n_train", "n_test", "seed", "kind"}


def build_gmm_bundle(name: str, cfg: dict[str, Any] | None = None) -> DatasetBundle:
    """A ``DatasetBundle`` of samples from a preset mixture, carrying the mixture in ``extra``.

    ``name`` (or ``cfg["kind"]``) picks the preset: "gmm1d" or "gmm2d". ``cfg`` may set
    the preset's arguments plus n_train (default 20000), n_test (default 5000), seed
    (default 0). The train and test sets come from independent seeded generators.
    """
    cfg = dict(cfg or {})
    kind = cfg.get("kind", name)
    if kind not in _PRESETS:
        raise CfgxError(f"unknown toy mixture {kind!r}; use one of {sorted(_PRESETS)}")
    unknown = set(cfg) - _PRESET_KEYS[kind] - _BUNDLE_KEYS
    if unknown:
        valid = sorted(_PRESET_KEYS[kind] | _BUNDLE_KEYS)
        raise CfgxError(f"unknown {kind} option(s) {sorted(unknown)}; valid options: {valid}")
    kwargs = {k: v for k, v in cfg.items() if k in _PRESET_KEYS[kind]}
    if "weights" in kwargs:
        kwargs["weights"] = tuple(kwargs["weights"])
    try:
        mixture = _PRESETS[kind](**kwargs)
    except ValueError as e:
        raise CfgxError(f"invalid {kind} options: {e}; fix the dataset config") from e
    n_train, n_test = int(cfg.get("n_train", 20000)), int(cfg.get("n_test", 5000))
    seed = int(cfg.get("seed", 0))
    # Separate streams so changing n_train leaves the test set unchanged.
    x_tr, y_tr = mixture.sample(n_train, torch.Generator().manual_seed(seed))
    x_te, y_te = mixture.sample(n_test, torch.Generator().manual_seed(seed + 1_000_003))
    if kind == "gmm1d":
        class_names = ["neg", "pos"]
    else:
        class_names = [f"class{c}" for c in range(mixture.num_classes)]
    return DatasetBundle(name=name, train=TensorDataset(x_tr, y_tr), test=TensorDataset(x_te, y_te),
                         num_classes=mixture.num_classes, shape=(mixture.dim,), class_names=class_names,
                         is_image=False, clip=None, extra={"mixture": mixture})
