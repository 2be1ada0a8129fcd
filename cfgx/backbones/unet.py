"""A DDPM-style U-Net (Ho et al. 2020) with time and class conditioning.

The class embedding has ``num_classes + 1`` rows: the last row is the reserved
*null* label used for the unconditional branch of classifier-free guidance
(Ho & Salimans 2022). A zero vector would do too, but a learned row cannot
collide with a real class and costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer or real) timesteps, as in the Transformer/DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device).float() / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in DDPM where the width allows; otherwise the largest divisor keeping >= 4 ch a group.
    groups = next(g for g in range(min(32, max(ch // 4, 1)), 0, -1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        # Scale-and-shift conditioning (improved DDPM): the embedding modulates the
        # normalised activations, which conditions more strongly than adding a bias.
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The 1x1 convs run as linear maps on (b, hw, c) tokens: q, k, v then reach SDPA with a
        # unit-stride head dimension, which its CPU flash kernel needs (strided inputs fall back to
        # the unfused math path). Same weights, same function; a channels_last x flattens for free.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)
        q, k, v = qkv.view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """eps(x_t, t, y); ``y == num_classes`` is the null (unconditional) label.

    ``model.to(memory_format=torch.channels_last)`` makes it run NHWC (``forward`` follows the
    weights' layout), the layout cuDNN's tensor cores want; the function is the same
    (``tests/test_unet_fast_path.py``). Built NCHW: on the 2-core CPU NHWC trained the peer_bench
    sizes 1-4% slower (README, "Speed").
    """

    def __init__(self, in_channels: int, resolution: int, num_classes: int, ch: int = 64,
                 ch_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, heads: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.ch = ch
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blk = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, dropout)])
                cur = ch * mult
                if res in attn_resolutions:
                    blk.append(Attention(cur, heads))
                self.down.append(blk)
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout), Attention(cur, heads),
                                  ResBlock(cur, cur, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, dropout)])
                cur = ch * mult
                if res in attn_resolutions:
                    blk.append(Attention(cur, heads))
                self.up.append(blk)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out_norm = _norm(cur)
        self.out = nn.Conv2d(cur, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.ch)) + self.label_emb(y)
        if self.out.weight.is_contiguous(memory_format=torch.channels_last):  # conv_in may have 1 input ch
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            if isinstance(blk[0], ResBlock):
                h = blk[0](h, emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[0](h)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = blk[0](torch.cat([h, hs.pop()], dim=1), emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[1](blk[0](h))
        return self.out(F.silu(self.out_norm(h)))
