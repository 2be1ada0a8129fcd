"""Ground truth for the exact-score toys (Zhao & Schwing 2025, arXiv 2503.10638).

The mixture's noised densities, eps and noisy classifier are checked against
independent computations (autograd, scipy), then the samplers are run with the
exact denoiser: at s=1 they must reproduce the class-conditional mixture, at s=0
the marginal, classifier guidance with the exact classifier must equal CFG, and
for s > 1 samples must move away from the decision boundary as s grows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm, wasserstein_distance

from cfgx.backbones.exact import ExactClassifier, ExactDenoiser
from cfgx.backbones.toy_classifiers import (
    LinearNoisyClassifier,
    MLPNoisyClassifier,
    train_noisy_classifier,
)
from cfgx.data.gmm import GaussianMixture, build_gmm_bundle, gmm1d, gmm2d
from cfgx.diffusion.guidance import cfg_eps, cg_eps
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError

SCHEDULE = NoiseSchedule("linear", 1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(mixture: GaussianMixture, sampler: str, scale: float, y: torch.Tensor, steps: int = 100,
            seed: int = 0) -> torch.Tensor:
    den = ExactDenoiser(mixture, SCHEDULE)
    smp = build_sampler(sampler, SCHEDULE, steps, eta=1.0 if sampler == "ddpm" else 0.0, clip_x0=None)
    # Same seed at every scale: paired noise makes differences across s low-variance.
    return smp.sample(lambda x, t: cfg_eps(den, x, t, y, scale), (y.shape[0], mixture.dim),
                      torch.Generator().manual_seed(seed))


def _normal_quantiles(mean: float, std: float, n: int = 20000) -> np.ndarray:
    """Deterministic stand-in for an infinite sample of N(mean, std^2) in wasserstein_distance."""
    return mean + std * norm.ppf((np.arange(n) + 0.5) / n)


def _mixtures() -> list[GaussianMixture]:
    return [gmm1d(mu=0.5, std=0.05, weights=(0.3, 0.7)),
            gmm2d(num_classes=4, components_per_class=2, std=0.3, inner_radius=0.5)]


# ---- analytic quantities -------------------------------------------------------------------


@pytest.mark.parametrize("mix_idx", [0, 1])
def test_eps_is_scaled_autograd_score_of_noised_log_density(mix_idx: int) -> None:
    mix = _mixtures()[mix_idx]
    g = torch.Generator().manual_seed(1)
    for abar in (1 - 1e-4, 0.9, 0.5, 0.01):
        x = (1.5 * torch.randn(257, mix.dim, generator=g, dtype=torch.float64)).requires_grad_(True)
        ys = [None, torch.randint(0, mix.num_classes + 1, (257,), generator=g)]
        for y in ys:
            (grad,) = torch.autograd.grad(mix.log_prob(x, abar, y).sum(), x)
            eps = mix.eps(x.detach(), abar, y)
            assert torch.isfinite(eps).all()
            torch.testing.assert_close(eps, -math.sqrt(1 - abar) * grad, rtol=1e-9, atol=1e-9)
    # Far outside the data, at the smallest noise, naive densities underflow to 0/0.
    far = torch.full((4, mix.dim), 40.0, dtype=torch.float64)
    assert torch.isfinite(mix.eps(far, 1 - 1e-4, torch.zeros(4, dtype=torch.long))).all()
    assert torch.isfinite(mix.class_log_posterior(far, 1 - 1e-4)).all()


def test_noised_1d_density_and_posterior_match_scipy() -> None:
    mix = gmm1d(mu=0.5, std=0.05, weights=(0.3, 0.7))
    x = np.linspace(-1.5, 1.5, 301)
    xt = torch.from_numpy(x)[:, None]
    for abar in (1.0, 1 - 1e-4, 0.7, 0.05):
        sd = math.sqrt(abar * 0.05**2 + 1 - abar)
        # Log-space reference: at abar ~ 1 the far component's pdf underflows to 0.
        comp = np.stack([np.log(0.3) + norm.logpdf(x, -0.5 * math.sqrt(abar), sd),
                         np.log(0.7) + norm.logpdf(x, 0.5 * math.sqrt(abar), sd)], axis=1)
        marg = logsumexp(comp, axis=1)
        np.testing.assert_allclose(mix.log_prob(xt, abar).numpy(), marg, rtol=1e-10)
        np.testing.assert_allclose(mix.log_prob(xt, abar, torch.ones(301, dtype=torch.long)).numpy(),
                                   comp[:, 1] - np.log(0.7), rtol=1e-10)
        np.testing.assert_allclose(mix.class_log_posterior(xt, abar).exp().numpy(),
                                   np.exp(comp - marg[:, None]), atol=1e-10)


@pytest.mark.parametrize("mix_idx", [0, 1])
def test_noisy_posterior_tends_to_clean_posterior(mix_idx: int) -> None:
    mix = _mixtures()[mix_idx]
    x, _ = mix.sample(2000, torch.Generator().manual_seed(2))
    x = x.double()
    clean = mix.class_log_posterior(x, 1.0).exp()
    # Clean Bayes from the component densities, written out independently of the class reduction.
    joint = mix.component_log_prob(x, 1.0).exp()
    by_class = torch.stack([joint[:, mix.component_class == c].sum(1) for c in range(mix.num_classes)], 1)
    torch.testing.assert_close(clean, by_class / by_class.sum(1, keepdim=True), rtol=1e-8, atol=1e-12)
    errs = [(mix.class_log_posterior(x, 1 - d).exp() - clean).abs().max().item() for d in (1e-3, 1e-5, 1e-7)]
    assert errs[2] < 1e-4 and errs[0] > errs[1] > errs[2]
    # And the exact classifier module at t = 0 (abar = 1 - 1e-4) is already within 2% of clean.
    clf = ExactClassifier(mix, SCHEDULE)
    p0 = torch.softmax(clf(x.float(), torch.zeros(2000, dtype=torch.long)), 1).double()
    assert (p0 - clean).abs().max() < 0.02


# ---- samplers with the exact denoiser --------------------------------------------------------

# Per-mode W1 tolerance (fraction of the component std 0.2): the measured error is ~0.010 for DDIM
# and ~0.019 for DDPM at 100 respaced steps, both mostly variance shrinkage of the last jumps.
# These tolerances still reject a 25% std error (W1 = 0.04) or a 0.03 shift of a mode.
W1_TOL = {"ddim": 0.02, "ddpm": 0.03}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_sampling_matches_conditional_and_marginal(sampler: str) -> None:
    mu, std, n = 1.0, 0.2, 20000
    mix = gmm1d(mu=mu, std=std, weights=(0.3, 0.7))
    y = torch.arange(n) % 2
    ref = {0: _normal_quantiles(-mu, std), 1: _normal_quantiles(mu, std)}
    tol = W1_TOL[sampler]
    assert wasserstein_distance(ref[1], _normal_quantiles(mu, 1.25 * std)) > tol  # the check has power

    x1 = _sample(mix, sampler, 1.0, y)[:, 0].numpy()
    side = (x1 > 0).astype(int)
    assert (side == y.numpy()).mean() > 0.999, f"s=1 label agreement {(side == y.numpy()).mean():.4f}"
    for c in (0, 1):
        d = wasserstein_distance(x1[y.numpy() == c], ref[c])
        assert d < tol, f"s=1 class {c}: W1 {d:.4f} >= {tol}"

    x0 = _sample(mix, sampler, 0.0, y)[:, 0].numpy()
    frac_pos = (x0 > 0).mean()
    # 4 binomial standard errors around the 0.7 component weight.
    assert abs(frac_pos - 0.7) < 4 * math.sqrt(0.21 / n), f"s=0 mass at +mu {frac_pos:.4f}, want 0.7"
    for c, part in ((1, x0[x0 > 0]), (0, x0[x0 < 0])):
        d = wasserstein_distance(part, ref[c])
        assert d < tol, f"s=0 mode {c}: W1 {d:.4f} >= {tol}"
    # s = 0 must ignore the label: agreement with y is the marginal chance 0.5, not ~1.
    assert abs(((x0 > 0).astype(int) == y.numpy()).mean() - 0.5) < 0.05
    assert wasserstein_distance(x0[y.numpy() == 1], ref[1]) > 0.5


# ---- classifier guidance with the exact classifier ------------------------------------------------


@pytest.mark.parametrize("mix_idx", [0, 1])
def test_exact_classifier_guidance_equals_cfg(mix_idx: int) -> None:
    mix = _mixtures()[mix_idx]
    den, clf = ExactDenoiser(mix, SCHEDULE), ExactClassifier(mix, SCHEDULE)
    g = torch.Generator().manual_seed(3)
    for t_val in (0, 10, 200, 999):
        x0, _ = mix.sample(512, g)
        t = torch.full((512,), t_val, dtype=torch.long)
        x = SCHEDULE.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        y = torch.randint(0, mix.num_classes, (512,), generator=g)
        cond = den(x, t, y)
        torch.testing.assert_close(cg_eps(den, clf, SCHEDULE.sigma(t), x, t, y, 1.0), cond,
                                   rtol=1e-4, atol=1e-4)
        # With exact models, grad log p(c|x) = grad log p(x|c) - grad log p(x), so CG = CFG at every s.
        for s in (0.0, 3.0):
            torch.testing.assert_close(cg_eps(den, clf, SCHEDULE.sigma(t), x, t, y, s),
                                       cfg_eps(den, x, t, y, s), rtol=1e-4, atol=2e-4)


# ---- guidance pushes samples away from the decision boundary ---------------------------------------

SCALES = (1.0, 2.0, 4.0, 8.0)


def _assert_increasing(values: list[float], what: str) -> None:
    steps = np.diff(values)
    assert (steps > 0).all(), f"{what} not increasing in s: {values}"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("mu", [0.5, 0.1])
def test_boundary_distance_grows_with_scale_1d(sampler: str, mu: float) -> None:
    mix = gmm1d(mu=mu, std=0.05)
    y = torch.arange(10000) % 2
    sign = (2 * y - 1).double()
    # Signed distance to the boundary x = 0: samples on the wrong side count negative.
    dist = [(sign * _sample(mix, sampler, s, y)[:, 0].double()).mean().item() for s in SCALES]
    _assert_increasing(dist, f"mean signed |x| (mu={mu}, {sampler})")
    assert dist[0] == pytest.approx(mu, abs=0.01)  # s = 1 sits on the class mean


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_boundary_margin_grows_with_scale_2d(sampler: str) -> None:
    mix = gmm2d(num_classes=4, components_per_class=2, std=0.3, inner_radius=0.5)
    y = torch.arange(6000) % 4
    margins, accs = [], []
    for s in SCALES:
        lp = mix.class_log_posterior(_sample(mix, sampler, s, y, steps=50), 1.0)
        own = lp.gather(1, y[:, None])[:, 0]
        other = lp.scatter(1, y[:, None], -math.inf).max(1).values
        margins.append((own - other).mean().item())
        accs.append((own > other).double().mean().item())
    _assert_increasing(margins, f"clean posterior margin ({sampler})")
    assert accs[-1] > accs[0]


# ---- trainable toy classifiers ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LinearNoisyClassifier, MLPNoisyClassifier])
def test_toy_classifier_beats_chance_at_small_t(cls: type) -> None:
    torch.manual_seed(0)
    mix = gmm1d(mu=1.0, std=0.05)
    clf = train_noisy_classifier(cls(1, 2), mix, SCHEDULE, steps=300, batch=256, lr=1e-2,
                                 generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    x0, y = mix.sample(4000, g)
    t = torch.randint(0, 100, (4000,), generator=g)
    x = SCHEDULE.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        acc = (clf(x, t).argmax(1) == y).float().mean().item()
    exact_acc = (ExactClassifier(mix, SCHEDULE)(x, t).argmax(1) == y).float().mean().item()
    assert acc > 0.95 and acc > exact_acc - 0.02, (acc, exact_acc)


def test_toy_classifier_trains_from_fixed_dataset() -> None:
    torch.manual_seed(0)
    bundle = build_gmm_bundle("gmm1d", {"mu": 1.0, "n_train": 2000})
    clf = train_noisy_classifier(MLPNoisyClassifier(1, 2), bundle.train.tensors, SCHEDULE, steps=200,
                                 generator=torch.Generator().manual_seed(6))
    x, y = bundle.test.tensors
    t = torch.full((x.shape[0],), 20, dtype=torch.long)
    xt = SCHEDULE.q_sample(x, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        assert (clf(xt, t).argmax(1) == y).float().mean() > 0.95


# ---- dataset bundle ---------------------------------------------------------------------------------


def test_gmm_bundle() -> None:
    b = build_gmm_bundle("gmm2d", {"num_classes": 3, "n_train": 500, "n_test": 100, "seed": 3})
    x, y = b.train.tensors
    assert x.shape == (500, 2) and x.dtype == torch.float32 and b.shape == (2,)
    assert b.num_classes == 3 and set(y.tolist()) == {0, 1, 2} and len(b.class_names) == 3
    assert not b.is_image and b.clip is None and isinstance(b.extra["mixture"], GaussianMixture)
    again = build_gmm_bundle("gmm2d", {"num_classes": 3, "n_train": 500, "n_test": 100, "seed": 3})
    assert torch.equal(again.train.tensors[0], x)
    assert not torch.equal(b.test.tensors[0], x[:100])
    prior = b.extra["mixture"].class_prior
    torch.testing.assert_close(prior, torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(CfgxError, match="valid options"):
        build_gmm_bundle("gmm1d", {"sigma": 0.1})
    with pytest.raises(CfgxError, match="unknown toy mixture"):
        build_gmm_bundle("moons", {})
