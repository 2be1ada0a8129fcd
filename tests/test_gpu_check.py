"""scripts/gpu_check.py: its CPU behaviour and the FLOP count behind its MFU figure."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from cfgx.backbones.unet import UNet

SCRIPT = REPO / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_says_one_line_and_fails_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("gpu-check needs a CUDA device and this machine has none; run make gpu-check "
                                   "on a GPU machine")


def test_training_flops_are_about_three_forwards_and_peaks_are_known():
    from torch.utils.flop_counter import FlopCounterMode

    gc = _module()
    torch.manual_seed(0)
    net = UNet(in_channels=1, resolution=8, num_classes=10, ch=8, ch_mult=(1, 2))
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.arange(4)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        net(x, t, y)
    train = gc.train_step_flops(net, x, t, y)
    assert 2.5 * fwd.get_total_flops() < train < 3.5 * fwd.get_total_flops()
    assert all(p.grad is None for p in net.parameters())
    assert gc.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gc.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gc.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and gc.bf16_peak_tflops("Tesla T4") is None
