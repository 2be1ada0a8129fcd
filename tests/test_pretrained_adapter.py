"""The adapter contract on ground truth: the exact-score Gaussian mixture written as eps-, x0-, v-,
flow-velocity- and EDM-sigma denoisers, each in its own paper's process and time variable (formulas
written out here, independently of cfgx/pretrained/adapter.py). Wrapped, each must return the exact
eps at every cfgx timestep, and s = 1 sampling through each must reach the mixture as closely as the
native exact backbone (the W1 tolerance of tests/test_exact_toys.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, wasserstein_distance

from cfgx.backbones.exact import ExactDenoiser
from cfgx.data.gmm import gmm1d, gmm2d
from cfgx.diffusion.guidance import cfg_eps
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.pretrained.adapter import Conventions, ExternalDenoiser

SCHEDULE = NoiseSchedule("linear", 1000)
pytestmark = pytest.mark.usefixtures("one_thread")


class MixtureNet(torch.nn.Module):
    """The exact mixture as an external network ``net(x', time, y)`` in one convention."""

    def __init__(self, mix, kind: str) -> None:
        super().__init__()
        self.mix, self.kind = mix, kind
        self.abar_ddpm = NoiseSchedule("cosine", 1000).alpha_bars  # the model's own schedule

    def forward(self, xp, time, y):
        xp, time = xp.double(), time.double().view(-1, 1)
        if self.kind == "eps_ddpm_cosine":       # DDPM, its own cosine betas, integer or fractional t
            lo = time.floor().long().clamp(max=998)
            f = time - lo
            lam = lambda i: 0.5 * torch.log(self.abar_ddpm[i] / (1 - self.abar_ddpm[i]))  # noqa: E731
            lam_t = (1 - f) * lam(lo) + f * lam(lo + 1)
            abar = torch.sigmoid(2 * lam_t)
            return self.mix.eps(xp, abar.view(-1), y)
        if self.kind == "x0_vp":                 # VP-SDE (Song et al. 2021), t in [0, 1] scaled by 999
            t = time / 999
            abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t * t))
            eps = self.mix.eps(xp, abar.view(-1), y)
            return (xp - (1 - abar).sqrt() * eps) / abar.sqrt()
        if self.kind == "v_ddpm":                # cfgx's linear schedule, v = alpha eps - sigma x0
            abar = SCHEDULE.alpha_bars[time.long().view(-1)].view(-1, 1)
            eps = self.mix.eps(xp, abar.view(-1), y)
            x0 = (xp - (1 - abar).sqrt() * eps) / abar.sqrt()
            return abar.sqrt() * eps - (1 - abar).sqrt() * x0
        if self.kind == "edm":                   # D(x'; sigma), x' = x0 + sigma n
            sig = time
            abar = 1 / (1 + sig * sig)
            eps = self.mix.eps(xp * abar.sqrt(), abar.view(-1), y)
            return xp - sig * eps
        if self.kind == "flow":                  # rectified flow: x' = (1 - t) x0 + t n, u = n - x0
            t = time / 1000
            r = torch.sqrt((1 - t) ** 2 + t ** 2)
            abar = ((1 - t) / r) ** 2
            eps = self.mix.eps(xp / r, abar.view(-1), y)
            return eps - (xp - t * eps) / (1 - t)
        if self.kind == "sit":                   # SiT: x' = t x0 + (1 - t) n, u = x0 - n
            r = torch.sqrt(time ** 2 + (1 - time) ** 2)
            abar = (time / r) ** 2
            eps = self.mix.eps(xp / r, abar.view(-1), y)
            return (xp - (1 - time) * eps) / time - eps
        raise AssertionError(self.kind)


CASES = {
    "eps_ddpm_cosine": Conventions("eps", "ddpm", schedule={"kind": "cosine", "num_steps": 1000}),
    "x0_vp": Conventions("x0", "vp", time_scale=999.0),
    "v_ddpm": Conventions("v", "ddpm"),
    "edm": Conventions("x0", "edm"),
    "flow": Conventions("flow", "flow", time_scale=1000.0),
    "sit": Conventions("flow", "flow_rev"),
}


def _wrapped(mix, kind: str) -> ExternalDenoiser:
    conv = CASES[kind]
    conv = Conventions(**{**conv.__dict__, "num_classes": mix.num_classes, "null_index": mix.num_classes})
    return ExternalDenoiser(MixtureNet(mix, kind), conv, SCHEDULE)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_adapter_returns_exact_eps_at_every_timestep(kind: str) -> None:
    mix = gmm2d(num_classes=3, components_per_class=2, std=0.3)
    native, wrapped = ExactDenoiser(mix, SCHEDULE), _wrapped(mix, kind)
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(64, 2, generator=g)
    y = torch.arange(64) % 4  # includes the null label 3
    worst = 0.0
    for t in range(1000):
        tt = torch.full((64,), t, dtype=torch.long)
        worst = max(worst, (wrapped(x, tt, y) - native(x, tt, y)).abs().max().item())
    assert worst < 1e-5, f"{kind}: max |eps - exact eps| = {worst:.2e}"


def test_a_wrong_convention_is_caught() -> None:
    # The check has power: declaring an x0 network as eps-predicting is far off.
    mix = gmm1d(mu=1.0, std=0.2)
    bad = ExternalDenoiser(MixtureNet(mix, "x0_vp"), Conventions("eps", "vp", num_classes=2, null_index=2,
                                                                 time_scale=999.0), SCHEDULE)
    x, t, y = torch.randn(8, 1), torch.full((8,), 500, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    assert (bad(x, t, y) - ExactDenoiser(mix, SCHEDULE)(x, t, y)).abs().max() > 0.1


def test_separate_unconditional_network_serves_the_null_branch() -> None:
    mix = gmm1d(mu=1.0, std=0.2, weights=(0.3, 0.7))
    cond = MixtureNet(mix, "edm")

    def uncond(xp, sig):  # the marginal denoiser, a network of its own
        return cond(xp, sig, torch.full((xp.shape[0],), 2))

    den = ExternalDenoiser(cond, Conventions("x0", "edm", num_classes=2), SCHEDULE, uncond=uncond)
    x, t = torch.randn(6, 1), torch.full((6,), 300, dtype=torch.long)
    y = torch.tensor([0, 1, 2, 2, 0, 2])
    torch.testing.assert_close(den(x, t, y), ExactDenoiser(mix, SCHEDULE)(x, t, y), atol=1e-5, rtol=0)
    with pytest.raises(CfgxError, match="null_index"):
        ExternalDenoiser(cond, Conventions("x0", "edm", num_classes=2), SCHEDULE)


W1_TOL_DDIM = 0.02  # tests/test_exact_toys.py's tolerance for DDIM-100 with the native exact backbone


@pytest.mark.parametrize("kind", ["native", *sorted(CASES)])
def test_conditional_sampling_through_each_adapter_reaches_the_mixture(kind: str) -> None:
    mu, std, n = 1.0, 0.2, 20000
    mix = gmm1d(mu=mu, std=std, weights=(0.3, 0.7))
    den = ExactDenoiser(mix, SCHEDULE) if kind == "native" else _wrapped(mix, kind)
    y = torch.arange(n) % 2
    smp = build_sampler("ddim", SCHEDULE, 100, clip_x0=None)
    x = smp.sample(lambda x, t: cfg_eps(den, x, t, y, 1.0), (n, 1), torch.Generator().manual_seed(0))[:, 0].numpy()
    for c, m in ((0, -mu), (1, mu)):
        ref = m + std * norm.ppf((np.arange(20000) + 0.5) / 20000)
        d = wasserstein_distance(x[y.numpy() == c], ref)
        assert d < W1_TOL_DDIM, f"{kind} class {c}: W1 {d:.4f}"
    assert math.isfinite(float(x.sum()))


# ---- model=py:package.module:factory ---------------------------------------------------------

ENTRY_MODULE = '''
import torch
from cfgx.data.gmm import gmm1d
from cfgx.pretrained.adapter import Conventions


class EDMDenoiser(torch.nn.Module):
    """D(x; sigma) of the mixture: what an EDM-style network computes."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix

    def forward(self, x, sigma, y):
        sig = sigma.double().view(-1, 1)
        abar = 1 / (1 + sig * sig)
        return x.double() - sig * self.mix.eps(x.double() * abar.sqrt(), abar.view(-1), y)


def factory(mu=1.0):
    mix = gmm1d(mu=mu, std=0.2, weights=(0.3, 0.7))
    return EDMDenoiser(mix), Conventions("x0", "edm", num_classes=2, null_index=2)
'''


def test_py_entry_point_loads_an_edm_denoiser(tmp_path, monkeypatch) -> None:
    from cfgx.pretrained.entry import load_entry

    (tmp_path / "my_edm_model.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    den = load_entry("py:my_edm_model:factory", mu=1.0).denoiser(SCHEDULE)
    mix = gmm1d(mu=1.0, std=0.2, weights=(0.3, 0.7))
    x, y = torch.randn(16, 1), torch.arange(16) % 3
    for t in (0, 250, 999):
        tt = torch.full((16,), t, dtype=torch.long)
        torch.testing.assert_close(den(x, tt, y), ExactDenoiser(mix, SCHEDULE)(x, tt, y), atol=1e-5, rtol=0)
    for bad, msg in (("py:my_edm_model", "not an entry point"), ("py:no_such_mod:f", "cannot import"),
                     ("py:my_edm_model:nothing", "no function")):
        with pytest.raises(CfgxError, match=msg):
            load_entry(bad)


def test_hub_fetch_offline_is_one_line(tmp_path, monkeypatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touches the network: the offline path must fail in one line
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    from cfgx.pretrained.hub import fetch_pretrained

    with pytest.raises(CfgxError) as e:
        fetch_pretrained("facebook/DiT-XL-2-256", tmp_path / "dit")
    assert "cannot fetch facebook/DiT-XL-2-256" in str(e.value) and "\n" not in str(e.value)
