"""Shared fixtures: a tiny trained run reused by the CLI and sweep tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CFGX_SHARED_DATA", REPO.parent / "shared" / "data"))

# Small enough to train and sweep in seconds on 2 CPU cores, but every real code path.
TINY = ["backbone.ch=8", "train.steps=12", "train.batch_size=16", "train.ckpt_every=5", "train.log_every=4",
        "eval.num_samples=40", "eval.batch_size=20", "sampler.steps=4", "eval.classifier.steps=150",
        "eval.classifier.width=8", "guidance=0,1,3", "train.snapshot_every=6"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors (8x8, 2-D toys): intra-op threads only add contention on a 2-core box."""
    from cfgx.cpu import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cfgx_cache")
    os.environ["CFGX_CACHE"] = str(d)
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch, cache_dir) -> Path:
    """Run the CLI from a fresh folder so runs/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """One tiny digits run trained through the real `cfgx train` path."""
    from cfgx.cli.train import train_task
    from cfgx.config import compose

    root = tmp_path_factory.mktemp("runs")
    cfg = compose(TINY + [f"paths.runs={root}"])
    return train_task(cfg, overrides=TINY)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED


def private_copy(run: Path, tmp_path_factory, tag: str) -> Path:
    """A copy of ``run`` for one test module, so its rows do not leak into other tests' assertions."""
    dst = tmp_path_factory.mktemp(tag) / "digits" / run.name
    shutil.copytree(run, dst)
    return dst


def table_rows(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def random_fidelity_inception(features: tuple[str, ...] = ("2048", "logits_unbiased"), far_bn: bool = False):
    """torch-fidelity's FID Inception as it ships (BN unfolded) with seeded random weights: no weights file needed.

    ``far_bn``: BatchNorm statistics far from (0, 1), so that folding them into the convs is not a no-op.
    """
    import io

    # why: torch_fidelity's import is slow and only the Inception tests need it
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from cfgx.metrics.inception import INCEPTION_NAME

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    net = RandomInit(INCEPTION_NAME, list(features), feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if far_bn and isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()
