"""Feature extraction: input checks, batching, eval mode, weights handling, and the real FID net."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_fidelity_inception
from PIL import Image
from torch import nn

from cfgx.errors import CfgxError
from cfgx.metrics.inception import (
    FEATURE_PIPELINE_VERSION,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FeatureExtractor,
    images_to_uint8,
    logits_available,
    speed_up_for_inference,
    weights_sha256,
)
from cfgx.metrics.standard import fid_from_features, inception_score_from_logits


class NetWithHead(nn.Module):
    """Small random-init net with batch-norm, dropout and a classifier head, like Inception."""

    def __init__(self, zero_fc: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
        )
        self.fc = nn.Linear(6, 4)
        if zero_fc:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.body(x.float() / 255.0)
        return pool, self.fc(pool)


def _images(n: int = 10, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


# ----------------------------------------------------------------------------- extractor behaviour


def test_batching_and_iterable_inputs_give_identical_features():
    ext_small = FeatureExtractor(NetWithHead(), batch_size=3)
    ext_big = FeatureExtractor(NetWithHead(), batch_size=64)
    x = _images(10)
    a, b = ext_small(x), ext_big(x)
    torch.testing.assert_close(a.pool, b.pool, rtol=1e-6, atol=1e-7)
    c = ext_small([x[:4], x[4:]])
    # Different batch compositions may change float summation order, nothing more.
    torch.testing.assert_close(a.pool, c.pool, rtol=1e-6, atol=1e-7)
    assert a.pool.dtype == torch.float64 and a.pool.shape == (10, 6) and len(a) == 10
    assert a.logits is not None and a.logits.shape == (10, 4) and a.logits.dtype == torch.float64


def test_extractor_forces_eval_mode_and_no_grad():
    net = NetWithHead()
    ext = FeatureExtractor(net)
    net.train()  # e.g. a training loop sharing the module flipped it back
    x = _images(8)
    first, second = ext(x), ext(x)
    assert net.training  # the caller's mode is restored afterwards
    torch.testing.assert_close(first.pool, second.pool, rtol=0, atol=0)  # dropout would differ
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(first.pool, net(x)[0].double(), rtol=0, atol=0)  # batch-norm running stats
    assert not first.pool.requires_grad and not first.logits.requires_grad
    assert all(p.requires_grad for p in net.parameters())  # not frozen behind the caller's back


def test_grayscale_is_replicated_to_three_channels():
    ext = FeatureExtractor(NetWithHead())
    gray = _images(5, c=1)
    torch.testing.assert_close(ext(gray).pool, ext(gray.repeat(1, 3, 1, 1)).pool, rtol=0, atol=0)


def test_input_dtype_range_and_shape_checks():
    ext = FeatureExtractor(NetWithHead())
    x = _images(4)
    # Floats holding 0..255 integers are unambiguous and accepted.
    torch.testing.assert_close(ext(x.float()).pool, ext(x).pool, rtol=0, atol=0)
    with pytest.raises(CfgxError, match=r"uint8 images in \[0, 255\].*images_to_uint8"):
        ext(x.float() / 255.0)  # [0, 1] floats would otherwise become an all-black batch
    with pytest.raises(CfgxError, match="uint8"):
        ext(x.float() * 2 - 255)
    with pytest.raises(CfgxError, match="dtype torch.int64"):
        ext(x.long())
    with pytest.raises(CfgxError, match="C in"):
        ext(_images(4, c=2))
    with pytest.raises(CfgxError, match=r"\[N, C, H, W\]"):
        ext(x[0])
    with pytest.raises(CfgxError, match="no images"):
        ext([])


def test_images_to_uint8_rounds_model_range():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    assert images_to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    assert images_to_uint8(torch.tensor([0.0, 0.5, 1.0]), value_range=(0, 1)).tolist() == [0, 128, 255]


def test_zeroed_classifier_means_no_logits_and_no_inception_score():
    zero = FeatureExtractor(NetWithHead(zero_fc=True))
    assert not logits_available(zero) and not logits_available(zero.net)
    feats = zero(_images(20))
    assert feats.logits is None
    assert all(math.isnan(v) for v in inception_score_from_logits(feats.logits, splits=2))

    live = FeatureExtractor(NetWithHead())
    assert logits_available(live)
    assert math.isfinite(inception_score_from_logits(live(_images(20)).logits, splits=2)[0])

    declared = NetWithHead()
    declared.provides_logits = False
    assert FeatureExtractor(declared)(_images(3)).logits is None


class PoolOnlyNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_plain_tensor_net_and_provenance():
    ext = FeatureExtractor(PoolOnlyNet(), name="toy")
    x = _images(3)
    feats = ext(x)
    assert feats.logits is None
    torch.testing.assert_close(feats.pool, x.double().mean(dim=(2, 3)))
    assert ext.provenance() == {
        "extractor": "toy",
        "weights_sha256": None,
        "pipeline_version": FEATURE_PIPELINE_VERSION,
    }


# ----------------------------------------------------------------------------- weights


def test_missing_weights_error_is_one_line_with_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CfgxError) as err:
        FeatureExtractor.inception()
    msg = str(err.value)
    assert "\n" not in msg
    assert INCEPTION_WEIGHTS_URL in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME) in msg

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CfgxError, match="not found at") as err:
        FeatureExtractor.inception(missing)
    assert "\n" not in str(err.value) and INCEPTION_WEIGHTS_URL in str(err.value)


def test_corrupt_weights_file_is_a_clean_error(tmp_path):
    bad = tmp_path / INCEPTION_WEIGHTS_FILENAME
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CfgxError, match="could not be loaded") as err:
        FeatureExtractor.inception(bad)
    assert "\n" not in str(err.value)


def test_weights_sha256_is_short_and_tracks_changes(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc" * 1000)
    h = weights_sha256(f)
    assert h == hashlib.sha256(b"abc" * 1000).hexdigest()[:12]
    f.write_bytes(b"abd" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    assert weights_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()[:12] != h


# ----------------------------------------------------------------------------- the real FID network


def _shared_weights() -> Path | None:
    root = os.environ.get("CFGX_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = base / "inception" / INCEPTION_WEIGHTS_FILENAME
    return path if path.is_file() else None


def _fixed_sets(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    noise = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    # Structured set: per-image colour gradients plus mild noise.
    ramp = torch.linspace(0, 1, 32)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200
    grad = base + 55 * ramp.view(1, 1, 1, 32) * ramp.view(1, 1, 32, 1)
    structured = (grad + torch.randn(n, 3, 32, 32, generator=g) * 8).round().clamp(0, 255).to(torch.uint8)
    return noise, structured


def _write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


@pytest.mark.shared_data
def test_real_inception_fid_matches_torch_fidelity_and_is_unavailable(tmp_path):
    weights = _shared_weights()
    if weights is None:
        pytest.skip("shared FID Inception weights not present (set CFGX_SHARED_DATA)")
    import torch_fidelity
    from threadpoolctl import threadpool_limits

    n = 12  # ~6 img/s on 2 CPU cores; fewer samples than dims is fine for comparing implementations
    set_a, set_b = _fixed_sets(n)
    ext = FeatureExtractor.inception(weights, batch_size=n)
    assert ext.provenance()["weights_sha256"] == weights_sha256(weights)
    assert not logits_available(ext)
    fa, fb = ext(set_a), ext(set_b)
    assert fa.pool.shape == (n, 2048) and fa.logits is None
    assert all(math.isnan(v) for v in inception_score_from_logits(fa.logits))
    ours = fid_from_features(fa.pool, fb.pool)

    _write_pngs(set_a, tmp_path / "a")
    _write_pngs(set_b, tmp_path / "b")
    # torch-fidelity's numpy eigvals of a 2048^2 matrix is ~8x slower with 2 OpenBLAS threads than 1 here.
    with threadpool_limits(limits=1, user_api="blas"):
        ref = torch_fidelity.calculate_metrics(
            input1=str(tmp_path / "a"),
            input2=str(tmp_path / "b"),
            fid=True,
            cuda=False,
            batch_size=n,
            cache=False,
            save_cpu_ram=True,  # no DataLoader worker processes on a 2-core box
            verbose=False,
            feature_extractor_weights_path=str(weights),
        )["frechet_inception_distance"]
    assert ref > 1.0
    assert abs(ours - ref) / ref < 0.005, (ours, ref)
    assert np.isfinite(ours)


# ----------------------------------------------------------------------------- the fast path


def _tf_inception(weights: Path | None):
    """torch-fidelity's FID Inception as it ships (BN unfolded, NCHW); random init without weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights is not None:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    return random_fidelity_inception(("2048",), far_bn=True)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fast_inception_computes_the_plain_features():
    import copy

    plain = _tf_inception(None)
    fast = speed_up_for_inference(copy.deepcopy(plain))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert fast.Conv2d_2a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _images(3, size=32)
    with torch.no_grad():
        (ref,), (got,) = plain(x), fast(x)
    assert float(ref.abs().max()) > 0
    assert _rel_err(got, ref) < 1e-5


@pytest.mark.shared_data
def test_real_inception_features_and_fid_unchanged_by_the_fast_path():
    weights = _shared_weights()
    if weights is None:
        pytest.skip("shared FID Inception weights not present (set CFGX_SHARED_DATA)")
    set_a, set_b = _fixed_sets(12)
    plain = _tf_inception(weights).eval()
    ext = FeatureExtractor.inception(weights, batch_size=12)
    with torch.no_grad():
        ref_a, ref_b = plain(set_a)[0].double(), plain(set_b)[0].double()
    fa, fb = ext(set_a).pool, ext(set_b).pool
    assert _rel_err(fa, ref_a) < 1e-5 and _rel_err(fb, ref_b) < 1e-5
    fid_fast, fid_plain = fid_from_features(fa, fb), fid_from_features(ref_a, ref_b)
    assert abs(fid_fast - fid_plain) / fid_plain < 5e-5, (fid_fast, fid_plain)  # 4 significant digits
