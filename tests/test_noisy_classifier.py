"""The guidance classifier p_phi(c | x_t, t) behind ``guidance.method=classifier``.

Classifier guidance (Dhariwal & Nichol 2021) as studied by Zhao & Schwing 2025
(arXiv 2503.10638): the classifier must read noisy inputs at every t, guidance
through it at s = 0 must be exactly unguided sampling, and the run-dir cache must
round-trip and retrain when stale or corrupt.
"""

from __future__ import annotations

import pytest
import torch

from cfgx.backbones.noisy_classifier import (
    CACHE_NAME,
    NoisyImageClassifier,
    get_guidance_classifier,
    train_noisy_image_classifier,
)
from cfgx.backbones.toy_classifiers import MLPNoisyClassifier
from cfgx.backbones.unet import UNet
from cfgx.config import default_rule
from cfgx.data.base import stack_dataset
from cfgx.data.gmm import build_gmm_bundle
from cfgx.data.images import load_digits
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.sample import balanced_labels, generate

SCHEDULE = NoiseSchedule("linear", 1000)
CPU = torch.device("cpu")
TINY_CCFG = {"width": 8, "steps": 40, "batch_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits({"resolution": 8, "split_seed": 0})


@pytest.mark.parametrize("res", [8, 28, 32])
def test_shape_and_contract(res):
    clf = NoisyImageClassifier(3, res, 10, width=8)
    x = torch.randn(4, 3, res, res)
    t = torch.tensor([0, 10, 500, 999])
    logits = clf(x, t)
    assert logits.shape == (4, 10)
    # Time-conditioned: the same image at two noise levels must get different logits. ResBlocks
    # zero-initialise their output conv, which hides t at init, so perturb the weights first.
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(clf(x[:1].expand(2, -1, -1, -1), torch.tensor([0, 999]))[0],
                              clf(x[:1].expand(2, -1, -1, -1), torch.tensor([0, 999]))[1])
    # Differentiable in x_t, which is all classifier guidance needs.
    xg = x.clone().requires_grad_(True)
    clf(xg, t).logsumexp(1).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_trains_on_digits_above_chance(digits):
    x, y = stack_dataset(digits.train)
    torch.manual_seed(0)
    clf = NoisyImageClassifier(1, 8, 10, width=8)
    info = train_noisy_image_classifier(clf, x, y, SCHEDULE, CPU, steps=150, batch_size=64, lr=3e-3,
                                        val=stack_dataset(digits.test))
    acc = info["val_accuracy"]
    assert set(acc) == {"0", "250", "500", "750"}
    assert acc["0"] > 0.4 > info["chance"]  # chance is 0.1
    assert acc["0"] > acc["750"]  # heavier noise, less to classify
    assert not clf.training


def test_training_is_deterministic_and_splits_off_validation(digits):
    x, y = stack_dataset(digits.train)
    x, y = x[:300], y[:300]
    states, infos = [], []
    for _ in range(2):
        torch.manual_seed(1)
        clf = NoisyImageClassifier(1, 8, 10, width=8)
        infos.append(train_noisy_image_classifier(clf, x, y, SCHEDULE, CPU, steps=5, batch_size=16, lr=1e-3,
                                                  seed=3, val_fraction=0.2))
        states.append(clf.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert infos[0]["n_val"] == 60 and infos[0]["n_train"] == 240
    assert infos[0]["val_accuracy"] == infos[1]["val_accuracy"]


def test_classifier_guided_sampling_on_tiny_unet(digits, tmp_path):
    torch.manual_seed(0)
    model = UNet(1, 8, 10, ch=8).eval()
    # Give the zero-initialised output layer weights so eps actually depends on x, t and y.
    with torch.no_grad():
        model.out.weight.normal_(0, 0.05)
    clf, info = get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, TINY_CCFG)
    sampler = build_sampler("ddim", SCHEDULE, 6, clip_x0=digits.clip)
    labels = balanced_labels(20, 10)
    common = dict(shape=digits.shape, labels=labels, seed=7, batch_size=10, device=CPU)
    plain = generate(model, sampler, scale=0.0, rule="cfg", **common)
    cg0 = generate(model, sampler, scale=0.0, rule=default_rule("classifier"), classifier=clf, **common)
    assert torch.equal(plain.x, cg0.x)  # s = 0: exactly unguided unconditional sampling
    cg = generate(model, sampler, scale=4.0, rule=default_rule("classifier"), classifier=clf, **common)
    assert cg.x.shape == (20, 1, 8, 8) and torch.isfinite(cg.x).all()
    assert not torch.allclose(cg.x, plain.x)
    assert cg.nfe == 2 * len(sampler.timesteps) and cg0.nfe == len(sampler.timesteps)


def test_cache_round_trip_and_retrain(digits, tmp_path):
    clf1, info1 = get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, TINY_CCFG)
    path = tmp_path / CACHE_NAME
    assert path.is_file() and info1["cached"] is False
    assert info1["architecture"] == "NoisyImageClassifier"
    assert not any(p.requires_grad for p in clf1.parameters())

    clf2, info2 = get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, TINY_CCFG)
    assert info2["cached"] is True and info2["key"] == info1["key"]
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 999])
    assert torch.equal(clf1(x, t), clf2(x, t))

    # A corrupt cache is retrained (and, being seeded, reproduces the same weights).
    path.write_bytes(b"not a checkpoint")
    clf3, info3 = get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, TINY_CCFG)
    assert info3["cached"] is False and torch.equal(clf1(x, t), clf3(x, t))

    # Other options or another schedule make the cache stale.
    _, info4 = get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, {**TINY_CCFG, "steps": 41})
    assert info4["cached"] is False and info4["key"] != info1["key"]
    _, info5 = get_guidance_classifier(tmp_path, digits, NoiseSchedule("cosine", 1000), CPU,
                                       {**TINY_CCFG, "steps": 41})
    assert info5["cached"] is False and info5["key"] != info4["key"]

    with pytest.raises(CfgxError, match="valid"):
        get_guidance_classifier(tmp_path, digits, SCHEDULE, CPU, {"widht": 8})


def test_toy_data_gets_an_mlp(tmp_path):
    data = build_gmm_bundle("gmm1d", {"mu": 1.0, "n_train": 2000, "n_test": 500})
    clf, info = get_guidance_classifier(tmp_path, data, SCHEDULE, CPU, {"steps": 300})
    assert isinstance(clf, MLPNoisyClassifier)
    assert info["val_accuracy"]["0"] > 0.95  # well-separated classes at t = 0
    x = torch.tensor([[-1.0], [1.0]])
    assert clf(x, torch.zeros(2, dtype=torch.long)).argmax(1).tolist() == [0, 1]
    _, again = get_guidance_classifier(tmp_path, data, SCHEDULE, CPU, {"steps": 300})
    assert again["cached"] is True
