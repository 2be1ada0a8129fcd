"""sFID (Nash et al. 2021, "Generating Images with Sparse Representations"), as ADM's evaluator computes it.

ADM (openai/guided-diffusion ``evaluations/evaluator.py``) reads the TF Inception graph's
``mixed_6/conv:0`` tensor, keeps its first 7 channels and flattens the NHWC ``[N, 17, 17, 7]``
block to 2,023 dimensions; sFID is the Fréchet distance of those vectors.

Which tensor that is in torch-fidelity's port: the TF graph names its 17x17 blocks ``mixed_3``
(the grid reduction, torch ``Mixed_6a``) to ``mixed_7`` (``Mixed_6e``), so ``mixed_6`` is
``Mixed_6d``; its ``conv`` is the 1x1 branch (``mixed_6/conv/conv2d_params`` and
``mixed_6/conv/batchnorm`` are ``Mixed_6d.branch1x1.conv``/``.bn`` in the weight port), and the
tensor named ``mixed_6/conv`` itself is that unit's ReLU output (its conv and batchnorm ops are
``mixed_6/conv/Conv2D`` and ``mixed_6/conv/batchnorm``). So the tap is the output of the
``Mixed_6d.branch1x1`` BasicConv2d module: conv -> BN -> ReLU, 192 channels, of which 0..6 are kept.
Folding BatchNorm (``inception.speed_up_for_inference``) changes the conv inside that module, not
the module, so the hooked output is the same function before and after (tests/test_sfid.py pins it).
The tap is a forward hook: the features come from the same forward pass as pool3, no second pass.
"""

from __future__ import annotations

import torch
from torch import nn

from cfgx.metrics.standard import fid_from_features

SPATIAL_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2,023


def spatial_vectors(act: torch.Tensor) -> torch.Tensor:
    """``[N, C, 17, 17]`` activations -> ``[N, 2023]`` in ADM's order (NHWC, channels 0..6 innermost)."""
    return act[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(act.shape[0], -1)


class SpatialTap:
    """Forward hook on the sFID layer of a torch-fidelity Inception: keeps the last batch's vectors."""

    def __init__(self, net: nn.Module) -> None:
        self.last: torch.Tensor | None = None
        net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # float32 holds the activations exactly (the net computes in float32); float64 comes in the stats.
        self.last = spatial_vectors(output.detach()).float().contiguous()

    def take(self) -> torch.Tensor:
        """The vectors of the forward that just ran (and forget them)."""
        out, self.last = self.last, None
        if out is None:
            raise RuntimeError(f"the sFID hook on {SPATIAL_MODULE} did not fire during the forward pass")
        return out


def sfid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """sFID between two ``[N, 2023]`` sets of :func:`spatial_vectors`: their Fréchet distance, in float64."""
    return fid_from_features(real.double(), fake.double())
