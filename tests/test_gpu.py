"""CUDA paths: bf16 training and sampling, CUDA generators. Skipped on CPU (marker ``gpu``).

CI has no GPU; run these on a CUDA machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

from cfgx.backbones.unet import UNet
from cfgx.cli.train import train_task
from cfgx.config import compose
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.sample import generate
from cfgx.sweep.loop import load_rows

pytestmark = pytest.mark.gpu


def test_train_and_sweep_on_cuda_with_bf16(tmp_path, cache_dir):
    cfg = compose(TINY + [f"paths.runs={tmp_path}", "device=cuda"])
    run = train_task(cfg, overrides=TINY)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["checkpoint_step"] == 12
    assert meta["device"] == torch.cuda.get_device_name(0)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    rows = load_rows(run)
    assert sorted(r["s"] for r in rows) == [0.0, 1.0, 3.0]
    for r in rows:
        assert r["device"] == meta["device"]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd_classifier"] >= 0


class FirstNoise(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_classes, self.first = inner, inner.num_classes, None

    def forward(self, x, t, y):
        if self.first is None:
            self.first = x[:8].clone()  # at s not in {0, 1} the batch is [x; x] for cond and null
        return self.inner(x, t, y)


def test_paired_seeds_on_cuda_generators():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = UNet(in_channels=1, resolution=8, num_classes=10, ch=8, ch_mult=(1, 2)).to(dev).eval()
    sampler = build_sampler("ddim", NoiseSchedule("linear", 1000), 3, 0.0)
    labels = torch.arange(8) % 10
    first = {}
    for s in (0.0, 1.0, 3.0):
        rec = FirstNoise(net)
        out = generate(rec, sampler, (1, 8, 8), labels, s, seed=5, batch_size=8, device=dev, autocast_bf16=True)
        assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all()
        first[s] = rec.first
    assert torch.equal(first[0.0], first[1.0]) and torch.equal(first[0.0], first[3.0])


def test_flow_postprocessor_resumes_on_cuda(tmp_path):
    """The checkpoint is loaded onto the GPU; the generator state must still go back as a CPU tensor."""
    from cfgx.postprocess import VelocityMLP, train_flow

    g = torch.Generator().manual_seed(0)
    x_hat, target = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    y = torch.zeros(64, dtype=torch.long)

    def run(path, on_step=None):
        torch.manual_seed(0)
        return train_flow(VelocityMLP(2, 1, hidden=16, depth=2), x_hat, target, y, steps=10, batch_size=16,
                          lr=1e-3, device="cuda", seed=1, ckpt_path=path, ckpt_every=4, on_step=on_step)

    def crash(step):
        if step == 6:
            raise RuntimeError("simulated crash")

    straight = run(tmp_path / "a.pt")
    with pytest.raises(RuntimeError):
        run(tmp_path / "b.pt", crash)
    resumed = run(tmp_path / "b.pt")
    assert resumed["resumed_from"] == 4 and resumed["step"] == 10
    for k, v in straight["ema"].state_dict().items():
        torch.testing.assert_close(resumed["ema"].state_dict()[k], v)
