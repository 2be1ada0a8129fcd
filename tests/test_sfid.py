"""sFID (issue 19 item 2): ADM's tensor, from the FID forward pass, and an oracle for its value."""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg
import torch
from conftest import random_fidelity_inception
from torch import nn

from cfgx.metrics import inception
from cfgx.metrics.inception import FeatureExtractor
from cfgx.metrics.sfid import SPATIAL_DIM, SPATIAL_MODULE, SpatialTap, sfid_from_features, spatial_vectors


def _random_inception() -> nn.Module:
    """torch-fidelity's FID Inception as it ships (BN unfolded), random weights, BN stats far from (0, 1)."""
    return random_fidelity_inception(far_bn=True)


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_tap_is_the_mixed_6d_1x1_relu_output_before_and_after_folding():
    plain = _random_inception()
    raw = {}
    # The unit TF calls mixed_6/conv: Mixed_6d's 1x1 branch, conv -> BN -> ReLU (192 channels, 17x17).
    plain.get_submodule(SPATIAL_MODULE).register_forward_hook(lambda m, i, o: raw.setdefault("act", o.clone()))
    fast = inception.speed_up_for_inference(copy.deepcopy(plain))
    assert isinstance(fast.get_submodule(SPATIAL_MODULE).bn, nn.Identity)  # folded
    tap = SpatialTap(fast)
    x = _images(3)
    with torch.no_grad():
        plain(x)
        fast(x)
    act = raw["act"]
    assert act.shape == (3, 192, 17, 17) and float(act.min()) >= 0 and float(act.max()) > 0  # post-ReLU
    got = tap.take()
    # ADM: spatial[..., :7] of the NHWC tensor, reshaped to [N, -1].
    adm = act.permute(0, 2, 3, 1).numpy()[..., :7].reshape(3, -1)
    assert got.shape == (3, SPATIAL_DIM) == (3, 2023)
    assert float((got - torch.from_numpy(adm)).abs().max() / abs(adm).max()) < 1e-5


def test_one_inception_forward_gives_pool_logits_and_spatial(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({k: v.clone() for k, v in _random_inception().state_dict().items()}, weights)
    ext = FeatureExtractor.inception(weights, batch_size=4)
    calls = {"net": 0, "stem": 0}
    ext.net.model.register_forward_hook(lambda *a: calls.__setitem__("net", calls["net"] + 1))
    ext.net.model.Conv2d_1a_3x3.register_forward_hook(lambda *a: calls.__setitem__("stem", calls["stem"] + 1))
    f = ext(_images(6))  # batches of 4 and 2
    assert calls == {"net": 2, "stem": 2}  # one forward per batch: pool3 and sFID features together
    assert f.pool.shape == (6, 2048) and f.spatial.shape == (6, 2023) and f.spatial.dtype == torch.float32
    assert f.logits.shape[0] == 6


def test_sfid_equals_brute_force_numpy_frechet_distance():
    g = torch.Generator().manual_seed(0)
    n = 2100  # more samples than the 2,023 dimensions: both covariances full rank
    real_act = torch.rand(n, 9, 17, 17, generator=g).relu()  # 9 channels: the slice to 7 is exercised
    fake_act = (torch.rand(n, 9, 17, 17, generator=g) * 1.2 - 0.05).relu()
    real, fake = spatial_vectors(real_act), spatial_vectors(fake_act)
    ours = sfid_from_features(real, fake)

    a = real_act.permute(0, 2, 3, 1).numpy()[..., :7].reshape(n, -1).astype(np.float64)
    b = fake_act.permute(0, 2, 3, 1).numpy()[..., :7].reshape(n, -1).astype(np.float64)
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2: symmetric eigendecompositions, no shared code with ours
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T
    tr_covmean = np.sqrt(scipy.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    assert ref > 1.0
    assert abs(ours - ref) / ref < 1e-6, (ours, ref)
