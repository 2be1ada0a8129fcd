"""FID / KID / IS math against torchmetrics and torch-fidelity, plus the feature cache."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from cfgx.errors import CfgxError
from cfgx.metrics.feature_cache import FeatureCache, default_cache_root
from cfgx.metrics.inception import FeatureExtractor
from cfgx.metrics.standard import (
    feature_stats,
    fid_from_features,
    fid_from_stats,
    inception_score_from_logits,
    kid_from_features,
)


class TinyFeatureNet(nn.Module):
    """A random-init conv net standing in for Inception; float64 so both tools do exact math."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, self.num_features, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.double() / 255.0)


def _image_sets(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    real = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    # A different distribution: darker, smoother images.
    fake = (torch.rand(n, 3, 16, 16, generator=g) * 120 + torch.linspace(0, 60, 16)).to(torch.uint8)
    return real, fake


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ----------------------------------------------------------------------------- FID


def test_fid_matches_torchmetrics_on_same_images_and_net():
    net = TinyFeatureNet()
    real, fake = _image_sets()
    tm = FrechetInceptionDistance(feature=net)
    for chunk in real.split(16):
        tm.update(chunk, real=True)
    for chunk in fake.split(16):
        tm.update(chunk, real=False)
    expected = float(tm.compute())

    ext = FeatureExtractor(net, batch_size=5)
    ours = fid_from_features(ext(real).pool, ext(fake).pool)
    assert expected > 1e-3  # the sets really differ, so the comparison is not 0 vs 0
    assert _rel(ours, expected) < 1e-4


def test_fid_from_stats_equals_from_features_and_numpy_stats():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu.numpy(), a.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-10)
    assert mu.dtype == sigma.dtype == torch.float64
    mu2, sigma2 = feature_stats(b)
    assert fid_from_stats(mu, sigma, mu2, sigma2) == pytest.approx(fid_from_features(a, b), rel=1e-12)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_singular_covariances_match_torch_fidelity():
    # Fewer samples than dimensions: both covariances are rank-deficient, where a
    # naive sqrtm goes complex/NaN. Compare with torch-fidelity's own formula.
    g = torch.Generator().manual_seed(3)
    a = torch.rand(10, 64, generator=g, dtype=torch.float64)
    b = torch.rand(12, 64, generator=g, dtype=torch.float64) ** 2
    ref = fid_statistics_to_metric(
        fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False
    )["frechet_inception_distance"]
    ours = fid_from_features(a, b)
    assert math.isfinite(ours)
    assert _rel(ours, ref) < 1e-6


def test_fid_rejects_mismatched_or_broken_inputs():
    a = torch.randn(5, 4)
    with pytest.raises(CfgxError, match="do not match"):
        fid_from_stats(*feature_stats(a), *feature_stats(torch.randn(5, 3)))
    with pytest.raises(CfgxError, match="at least 2"):
        fid_from_features(a[:1], a)
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CfgxError, match="NaN"):
        fid_from_features(bad, a)


# ----------------------------------------------------------------------------- KID


def test_kid_matches_torchmetrics_with_same_subsets():
    net = TinyFeatureNet()
    real, fake = _image_sets()
    tm = KernelInceptionDistance(feature=net, subsets=6, subset_size=20)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global RNG
    exp_mean, exp_std = (float(v) for v in tm.compute())

    ext = FeatureExtractor(net)
    mean, std = kid_from_features(ext(real).pool, ext(fake).pool, subsets=6, subset_size=20, seed=11)
    assert exp_mean > 1e-4 and exp_std > 0  # distinct subsets really were drawn
    assert _rel(mean, exp_mean) < 1e-4
    assert _rel(std, exp_std) < 1e-4


def test_kid_subset_size_clipped_and_seeded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 5, generator=g)
    b = torch.randn(25, 5, generator=g) + 0.5
    full = kid_from_features(a, b, subsets=3, subset_size=1000)
    assert full == kid_from_features(a, b, subsets=3, subset_size=25)
    assert kid_from_features(a, b, subsets=4, subset_size=10, seed=5) == kid_from_features(
        a, b, subsets=4, subset_size=10, seed=5
    )
    assert kid_from_features(a, b, subsets=4, subset_size=10, seed=5) != kid_from_features(
        a, b, subsets=4, subset_size=10, seed=6
    )
    assert full[1] > 0  # subsets of the larger set differ
    # With equal sizes every clipped subset is the whole set in some order: no spread.
    assert kid_from_features(a[:25], b, subsets=3, subset_size=1000)[1] < 1e-12


# ----------------------------------------------------------------------------- IS


def _is_plain(logits: np.ndarray, splits: int, perm: np.ndarray) -> tuple[float, float]:
    """IS written out sample by sample: exp(mean_x KL(p(y|x) || p(y))) per split."""
    x = logits[perm]
    n = x.shape[0]
    scores = []
    for i in range(splits):
        chunk = x[i * n // splits : (i + 1) * n // splits]
        p = np.exp(chunk - chunk.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        kls = [sum(pk * math.log(pk / qk) for pk, qk in zip(row, py, strict=True) if pk > 0) for row in p]
        scores.append(math.exp(sum(kls) / len(kls)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_kl_formula_and_torch_fidelity():
    rng = np.random.RandomState(0)
    logits = rng.randn(60, 7) * 3
    for splits in (1, 4):
        mean, std = inception_score_from_logits(torch.from_numpy(logits), splits=splits, seed=9)
        ref_mean, ref_std = _is_plain(logits, splits, np.random.RandomState(9).permutation(60))
        assert mean == pytest.approx(ref_mean, rel=1e-10)
        assert std == pytest.approx(ref_std, rel=1e-8, abs=1e-12)
        tf = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=9)
        assert mean == pytest.approx(tf["inception_score_mean"], rel=1e-10)


def test_inception_score_independent_of_class_ordered_samples():
    # 10 classes x 100 confident samples, stored class by class as a class-
    # conditional sampler produces them.
    n_cls, per = 10, 100
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_cls).repeat_interleave(per)
    logits = torch.randn(n_cls * per, n_cls, generator=g) + 6.0 * nn.functional.one_hot(labels, n_cls)
    permuted = logits[torch.randperm(len(logits), generator=g)]

    ordered_is, _ = inception_score_from_logits(logits, splits=10, seed=0)
    permuted_is, _ = inception_score_from_logits(permuted, splits=10, seed=0)
    whole_is, _ = inception_score_from_logits(logits, splits=1)
    # Without the shuffle each split would hold one class: p(y) = p(y|x) and IS ~ 1.
    naive_is, _ = _is_plain(logits.numpy(), 10, np.arange(len(logits)))
    assert naive_is < 1.5
    assert ordered_is > 0.6 * n_cls  # ~7.4: confident, balanced classes
    assert ordered_is == pytest.approx(permuted_is, rel=0.02)
    # What remains between 10 splits and 1 is IS's own small-sample bias (p(y) from
    # 100 samples), a few percent, not the ~7x collapse that ordering causes.
    assert ordered_is == pytest.approx(whole_is, rel=0.06)
    # With one split the order cannot matter at all.
    assert inception_score_from_logits(permuted, splits=1)[0] == pytest.approx(whole_is, rel=1e-12)


def test_inception_score_unavailable_is_nan_not_one():
    assert all(math.isnan(v) for v in inception_score_from_logits(None))
    # A zeroed classifier gives all-zero logits, i.e. uniform p(y|x) and IS = 1.0 exactly.
    assert all(math.isnan(v) for v in inception_score_from_logits(torch.zeros(50, 1008)))
    with pytest.raises(CfgxError, match="split"):
        inception_score_from_logits(torch.randn(5, 3), splits=10)


# ----------------------------------------------------------------------------- cache


def test_feature_cache_roundtrip_and_keys(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    parts = dict(
        dataset="cifar10",
        split="train",
        resolution=32,
        extractor="inception-v3-compat",
        weights_sha256="abc123def456",
        pipeline_version=1,
    )
    key = cache.key(**parts)
    assert key == cache.key(**dict(reversed(list(parts.items()))))  # order-independent
    assert key != cache.key(**{**parts, "weights_sha256": "000000000000"})
    assert key != cache.key(**{**parts, "pipeline_version": 2})
    assert cache.load(key) is None

    mu, sigma = feature_stats(torch.randn(20, 4))
    path = cache.save(key, {"mu": mu, "sigma": sigma})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [f"{key}.pt"]  # no temp files left behind
    got = cache.load(key)
    assert torch.equal(got["mu"], mu) and torch.equal(got["sigma"], sigma)
    assert got["mu"].dtype == torch.float64

    cache.save(key, {"mu": mu + 1})  # overwrite replaces the entry whole
    assert set(cache.load(key)) == {"mu"}

    path.write_bytes(b"truncated garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.load(key) is None

    with pytest.raises(CfgxError, match="tensors only"):
        cache.save(key, {"n": 3})


def test_feature_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CFGX_CACHE", str(tmp_path / "envcache"))
    assert default_cache_root() == tmp_path / "envcache"
    assert FeatureCache().root == tmp_path / "envcache"
    monkeypatch.delenv("CFGX_CACHE")
    assert str(default_cache_root()).endswith(os.path.join(".cache", "cfgx"))
