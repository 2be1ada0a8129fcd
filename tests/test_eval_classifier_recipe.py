"""The ResNet evaluation-classifier recipe (CIFAR/MNIST-class judges): shapes, augmentation, learning.

The recipe's real target (CIFAR-10 >= 90% held-out) needs GPU minutes; here it is
trained briefly on the bundled digits, which it must still learn well.
"""

from __future__ import annotations

import pytest
import torch

from cfgx.config import compose
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.metrics.eval_classifier import EvalResNet, _augment, build_eval_classifier, train_eval_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(3, 32), (1, 32), (1, 8)])
def test_resnet_shapes(shape):
    c, r = shape
    m = EvalResNet(c, r, 10, width=8).eval()
    x = torch.randn(4, c, r, r)
    assert m.features(x).shape == (4, 64) and m(x).shape == (4, 10) and m.feature_dim == 64


def test_crop_flip_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = _augment(x, g, hflip=False, pad=1)
    assert out.shape == x.shape
    # Every crop is a shifted window of the reflect-padded image: the centre 4x4 of x survives
    # somewhere in each output (a shift of at most one pixel).
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(3) for dx in range(3))
    flipped = _augment(x, torch.Generator().manual_seed(1), hflip=True, pad=1)
    assert flipped.shape == x.shape


def test_dataset_configs_pick_the_resnet_recipe():
    for name, width in (("cifar10", 64), ("svhn", 64)):
        c = compose([f"dataset={name}"]).eval.classifier
        assert c.arch == "resnet" and c.width == width
    for name in ("digits", "mnist"):  # the CNN stays (and so do their cache keys)
        assert "arch" not in compose([f"dataset={name}"]).eval.classifier
    with pytest.raises(CfgxError, match="arch"):
        build_eval_classifier(build_dataset(compose([]).dataset), {"arch": "vit", "width": 8})


def test_resnet_recipe_learns_digits():
    data = build_dataset(compose([]).dataset)
    model, acc = train_eval_classifier(data, {"arch": "resnet", "width": 8, "steps": 120, "batch_size": 128,
                                              "lr": 0.1, "hflip": False}, torch.device("cpu"))
    assert isinstance(model, EvalResNet) and acc > 0.9, acc
