"""The fast path computes what the plain path computes (issue 10: same math, only faster).

The U-Net runs its attention's 1x1 convs as token-wise linear maps, can run NHWC (channels_last),
and training steps AdamW fused. Each is checked here against the plain formulation: DDPM's
conv-based attention written out below as an oracle, NCHW convolutions, AdamW's for-loop update.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cfgx.backbones.unet import Attention, UNet


def _random_unet(heads: int = 1, in_channels: int = 3, channels_last: bool = False) -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels, 16, 10, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               dropout=0.0, heads=heads)
    with torch.no_grad():  # the constructor zero-initialises conv2/proj/out; make every path matter
        for p in net.parameters():
            p.normal_(0.0, 0.1)  # in memory order: draw NCHW, then convert, so both nets hold the same weights
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _batch(in_channels: int = 3, n: int = 6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, in_channels, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 11, (n,), generator=g))


def _reference_attention(a: Attention, x: torch.Tensor) -> torch.Tensor:
    """DDPM's self-attention as 1x1 convs on NCHW maps and an explicit softmax(QK^T/sqrt d)V."""
    b, c, h, w = x.shape
    d = c // a.heads
    qkv = F.conv2d(a.norm(x.contiguous()), a.qkv.weight.contiguous(), a.qkv.bias)
    q, k, v = qkv.reshape(b, 3, a.heads, d, h * w).unbind(1)  # (b, heads, d, hw)
    att = torch.softmax(q.transpose(-1, -2) @ k / d ** 0.5, dim=-1)  # (b, heads, hw, hw)
    out = (v @ att.transpose(-1, -2)).reshape(b, c, h, w)
    return x + F.conv2d(out, a.proj.weight.contiguous(), a.proj.bias)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_equals_the_conv_formulation(heads):
    torch.manual_seed(0)
    a = Attention(32, heads)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(3, 32, 6, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(a(x.contiguous(memory_format=layout)), _reference_attention(a, x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_nhwc_unet_computes_what_the_nchw_net_computes(in_channels):
    fast = _random_unet(heads=2, in_channels=in_channels, channels_last=True)
    plain = _random_unet(heads=2, in_channels=in_channels)
    conv = fast.down[0][0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.down[0][0].conv1.weight.is_contiguous()
    x, t, y = _batch(in_channels)
    # Activations really run NHWC in the fast net and NCHW in the plain one.
    seen = {}
    for name, net in (("fast", fast), ("plain", plain)):
        net.down[0][0].conv1.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        out_fast, out_plain = fast.eval()(x, t, y), plain.eval()(x, t, y)
    assert seen["fast"].is_contiguous(memory_format=torch.channels_last) and not seen["fast"].is_contiguous()
    assert seen["plain"].is_contiguous()
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    # Gradients of a training loss agree too (dropout is 0, so train mode is deterministic).
    for net in (fast, plain):
        net.train()
        F.mse_loss(net(x, t, y), torch.ones_like(x)).backward()
    for (name, pf), pp in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pf.grad, pp.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_adamw_steps_like_the_for_loop_update():
    fast, plain = _random_unet(), _random_unet()
    opts = [torch.optim.AdamW(fast.parameters(), lr=1e-3, weight_decay=0.01, fused=True),
            torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)]
    x, t, y = _batch()
    for _ in range(3):
        for net, opt in zip((fast, plain), opts):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(net(x, t, y), torch.zeros_like(x)).backward()
            opt.step()
    for pf, pp in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(pf, pp, rtol=1e-4, atol=1e-5)
    assert opts[0].param_groups[0]["fused"] is True


def test_train_uses_the_fused_optimizer(tmp_path, one_thread):
    from cfgx.config import compose
    from cfgx.data import build_dataset
    from cfgx.store.checkpoints import load_checkpoint
    from cfgx.store.rundir import new_run_dir
    from cfgx.train import train

    cfg = compose(["backbone.ch=8", "train.steps=2", "train.batch_size=8", "train.ckpt_every=2"])
    run = new_run_dir(tmp_path, "r")
    train(cfg, build_dataset(cfg.dataset), run, torch.device("cpu"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]["fused"] is True
