"""Diversity metrics against brute-force formulas written out plainly, and known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfgx.errors import CfgxError
from cfgx.metrics.diversity import (
    density_coverage,
    improved_precision_recall,
    knn_radii,
    vendi_score,
    within_class_pairwise_distance,
)

# ----------------------------------------------------------------------------- brute force


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _radii(a: np.ndarray, k: int) -> np.ndarray:
    d = _dist(a, a)
    out = []
    for i in range(len(a)):
        others = sorted(d[i, j] for j in range(len(a)) if j != i)
        out.append(others[k - 1])
    return np.array(out)


def _pr_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    rr, rf = _radii(real, k), _radii(fake, k)
    d = _dist(fake, real)
    precision = np.mean([any(d[j, i] <= rr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[j, i] <= rf[j] for j in range(len(fake))) for i in range(len(real))])
    return float(precision), float(recall)


def _dc_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    rr = _radii(real, k)
    d = _dist(real, fake)
    inside = sum(1 for i in range(len(real)) for j in range(len(fake)) if d[i, j] < rr[i])
    density = inside / (k * len(fake))
    coverage = np.mean([min(d[i]) < rr[i] for i in range(len(real))])
    return float(density), float(coverage)


def _vendi_brute(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = x @ x.T  # n x n cosine similarity
    lam = np.linalg.eigvalsh(k / len(x))
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def _wcpd_brute(x: np.ndarray, labels: np.ndarray) -> float:
    means = []
    for c in np.unique(labels):
        pts = x[labels == c]
        pairs = [np.linalg.norm(pts[i] - pts[j]) for i in range(len(pts)) for j in range(i + 1, len(pts))]
        if pairs:
            means.append(np.mean(pairs))
    return float(np.mean(means))


@pytest.fixture
def sets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(41, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(33, 6, generator=g, dtype=torch.float64) * 1.3 + 0.4
    return real, fake


# ----------------------------------------------------------------------------- precision/recall, D/C


def test_knn_radii_match_sorted_distances_and_chunking(sets):
    real, _ = sets
    for k in (1, 3, 5):
        expected = _radii(real.numpy(), k)
        np.testing.assert_allclose(knn_radii(real, k).numpy(), expected, rtol=1e-10)
        np.testing.assert_allclose(knn_radii(real, k, chunk_size=4).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_brute_force(sets, k):
    real, fake = sets
    expected = _pr_brute(real.numpy(), fake.numpy(), k)
    got = improved_precision_recall(real, fake, k=k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a non-degenerate case
    assert improved_precision_recall(real, fake, k=k, chunk_size=5) == got


@pytest.mark.parametrize("k", [2, 5])
def test_density_coverage_match_brute_force(sets, k):
    real, fake = sets
    expected = _dc_brute(real.numpy(), fake.numpy(), k)
    got = density_coverage(real, fake, k=k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] and 0 < got[1] < 1
    assert density_coverage(real, fake, k=k, chunk_size=3) == pytest.approx(got, abs=1e-12)


def test_identical_sets_have_full_precision_recall_coverage(sets):
    real, _ = sets
    assert improved_precision_recall(real, real.clone(), chunk_size=8) == (1.0, 1.0)
    density, coverage = density_coverage(real, real.clone(), chunk_size=8)
    assert coverage == 1.0
    assert density == pytest.approx(_dc_brute(real.numpy(), real.numpy(), 5)[0], abs=1e-12)


def test_far_apart_sets_score_zero(sets):
    real, fake = sets
    assert improved_precision_recall(real, fake + 1e3) == (0.0, 0.0)
    assert density_coverage(real, fake + 1e3) == (0.0, 0.0)


def test_float32_inputs_and_validation(sets):
    real, fake = sets
    assert improved_precision_recall(real.float(), fake.float()) == pytest.approx(
        improved_precision_recall(real, fake), abs=0.05
    )
    with pytest.raises(CfgxError, match="at least 6"):
        density_coverage(real[:5], fake, k=5)
    with pytest.raises(CfgxError, match="dims differ"):
        improved_precision_recall(real, fake[:, :3])


# ----------------------------------------------------------------------------- Vendi


def test_vendi_known_cases():
    assert vendi_score(torch.ones(7, 5) * 3.0) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(torch.eye(6)) == pytest.approx(6.0, rel=1e-9)  # n orthogonal points
    assert vendi_score(torch.eye(4, 10)) == pytest.approx(4.0, rel=1e-9)
    # Two equal-size groups of identical, mutually orthogonal points: effective number 2.
    two = torch.cat([torch.eye(3)[:1].repeat(5, 1), torch.eye(3)[1:2].repeat(5, 1)])
    assert vendi_score(two) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("n,d", [(12, 30), (40, 5)])  # n <= d uses X X^T, n > d uses X^T X
def test_vendi_matches_n_by_n_eigendecomposition(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64).abs()
    assert vendi_score(x) == pytest.approx(_vendi_brute(x.numpy()), rel=1e-9)
    assert vendi_score(x * 5.0) == pytest.approx(vendi_score(x), rel=1e-9)  # scale-free (cosine)


def test_vendi_rejects_zero_vectors():
    x = torch.randn(4, 3)
    x[2] = 0
    with pytest.raises(CfgxError, match="all-zero"):
        vendi_score(x)


# ----------------------------------------------------------------------------- within-class distance


def test_within_class_pairwise_distance_brute_force_and_chunking():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (50,), generator=g)
    expected = _wcpd_brute(x.numpy(), labels.numpy())
    assert within_class_pairwise_distance(x, labels) == pytest.approx(expected, rel=1e-10)
    assert within_class_pairwise_distance(x, labels, chunk_size=3) == pytest.approx(expected, rel=1e-10)


def test_within_class_pairwise_distance_known_case():
    x = torch.tensor([[0.0], [3.0], [10.0], [10.0], [10.0], [99.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has one sample: skipped
    # Class 0: one pair at distance 3. Class 1: collapsed, distance 0. Mean of classes: 1.5.
    assert within_class_pairwise_distance(x, labels) == pytest.approx(1.5)
    assert math.isnan(within_class_pairwise_distance(x[:1], labels[:1]))
    with pytest.raises(CfgxError, match="one label per sample"):
        within_class_pairwise_distance(x, labels[:3])
