"""Dataset registry: the bundled default, class-per-folder trees, and the offline error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cfgx.config import compose
from cfgx.data import build_dataset, stack_dataset, to_uint8
from cfgx.errors import CfgxError


def test_digits_is_bundled_split_and_scaled():
    data = build_dataset(compose([]).dataset)
    x, y = stack_dataset(data.train)
    xt, yt = stack_dataset(data.test)
    assert data.shape == (1, 8, 8) and data.num_classes == 10
    assert len(y) + len(yt) == 1797 and abs(len(yt) - 0.2 * 1797) < 10
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x).float() / 127.5 - 1, x)  # exactly invertible
    assert sorted(torch.bincount(yt).tolist())[0] >= 35      # stratified


def test_imagefolder_reads_a_class_per_folder_tree(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = compose(["dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.resolution=16"]).dataset
    data = build_dataset(cfg)
    x, y = stack_dataset(data.train)
    assert data.shape == (3, 16, 16) and data.class_names == ["cat", "dog", "eel"]
    assert x.shape == (12, 3, 16, 16) and torch.bincount(y).tolist() == [4, 4, 4]


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_offline_dataset_is_one_line_with_the_fix(tmp_path, name):
    cfg = compose([f"dataset={name}", f"dataset.root={tmp_path}"]).dataset
    with pytest.raises(CfgxError) as e:
        build_dataset(cfg)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and f"cfgx prepare dataset={name}" in msg


def test_failed_download_says_download_not_missing(tmp_path, monkeypatch):
    """Offline with download=true (what cfgx prepare does), torchvision raises RuntimeError as well."""
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://example/, got: ...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    cfg = compose(["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=true"]).dataset
    with pytest.raises(CfgxError) as e:
        build_dataset(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not download 'mnist'") and "Error downloading" in msg


def test_imagefolder_without_root_is_a_clear_error(tmp_path):
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path / "nope"), "resolution": 8})
    with pytest.raises(CfgxError, match="not a directory"):
        build_dataset(cfg)


def test_mnist_from_shared_data(shared_data):
    if not (shared_data / "MNIST" / "raw").is_dir():
        pytest.skip("no shared MNIST")
    data = build_dataset(compose(["dataset=mnist", f"dataset.root={shared_data}"]).dataset)
    assert data.shape == (1, 32, 32) and len(data.train) == 60000 and len(data.test) == 10000
