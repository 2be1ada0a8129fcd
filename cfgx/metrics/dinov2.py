"""DINOv2 ViT-L/14 features for FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics and their unfair treatment of diffusion models"), preprocessed as EDM2 does.

The network is timm's ``VisionTransformer`` in DINOv2's configuration (patch 14, LayerScale 1e-5,
LayerNorm eps 1e-6, head dim 64), holding the *official* facebookresearch state dict
(``dinov2_vitl14_pretrain.pth``), read weights-only by :func:`cfgx.store.safeload.safe_load`. The
official names are timm's except ``mask_token`` (used only for masked training: dropped) and
``pos_embed``, stored for 37x37 patches (518 px). The hub model resamples it at every forward
(``DinoVisionTransformer.interpolate_pos_encoding``: bicubic, no antialias, ``scale_factor =
(16 + 0.1) / 37``, the "interpolate_offset" kludge); :func:`official_to_timm` does the same
computation once at load time for 224 px (16x16 patches), so the tokens match the hub model's
exactly; timm's own checkpoint filter resamples by output size instead, which differs.

Preprocessing (EDM2 ``calculate_metrics.py``): uint8 -> float, bicubic antialiased resize to
224x224, /255, ImageNet mean/std; grayscale replicated to 3 channels. The feature is the CLS token
after the final norm (what the hub model returns with its identity head).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cfgx.console import say
from cfgx.errors import CfgxError
from cfgx.metrics.feature_cache import FeatureCache
from cfgx.metrics.inception import FeatureExtractor, _sha256_of_open
from cfgx.store.locks import locked
from cfgx.store.safeload import UnsafeFileError, safe_load

DINOV2_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILENAME
DINOV2_NAME = "dinov2-vitl14-edm2"
IMG_SIZE, PATCH = 224, 14
INTERPOLATE_OFFSET = 0.1  # the hub model's default
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_dinov2_path() -> Path:
    """Where torch hub keeps it (``$TORCH_HOME/hub/checkpoints/dinov2_vitl14_pretrain.pth``), as EDM2 finds it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_FILENAME


def resolve_dinov2_path(path: str | os.PathLike[str] | None) -> Path:
    if importlib.util.find_spec("timm") is None:  # checked with the weights: before any sampling
        raise CfgxError('eval.features=dinov2 needs the timm package, which is not installed; '
                        'pip install "cfgx[dinov2]"')
    """The weights file; missing: one line naming it and how to get it (never downloads)."""
    p = Path(path).expanduser() if path is not None else default_dinov2_path()
    if not p.is_file():
        raise CfgxError(f"DINOv2 weights not found at {p}: run 'cfgx prepare dinov2' on a machine with internet, "
                        f"or fetch {DINOV2_URL} and put it there (or set eval.dinov2_weights=PATH)")
    return p


def official_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``pos_embed [1, 1 + M*M, D]`` resampled to ``grid x grid`` patches as the official hub model does."""
    n = pos_embed.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"pos_embed of {n} patches is not a square grid")
    if m == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    scale = (grid + INTERPOLATE_OFFSET) / m
    patch_pos = F.interpolate(patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=False, scale_factor=(scale, scale))
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"resampling gave {tuple(patch_pos.shape[-2:])} patches, not {grid}x{grid}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls_pos, patch_pos], dim=1).to(pos_embed.dtype)


def official_to_timm(state: dict[str, torch.Tensor], img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """The official state dict under timm's names for a ``img_size`` model (same tensors otherwise)."""
    out = {k: v for k, v in state.items() if k != "mask_token"}
    out["pos_embed"] = official_pos_embed(state["pos_embed"], img_size // PATCH)
    return out


def vit_for(state: dict[str, torch.Tensor], img_size: int = IMG_SIZE) -> nn.Module:
    """timm's ViT in DINOv2's configuration, sized from the state dict (width, depth; head dim 64)."""
    # why: timm (~1 s to import) is needed only when the DINOv2 space is on
    from timm.models.vision_transformer import VisionTransformer

    dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    return VisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=dim, depth=depth,
                             num_heads=max(dim // 64, 1), init_values=1e-5, num_classes=0)


def edm2_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> the normalised 224x224 float batch EDM2 feeds DINOv2."""
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bicubic", antialias=True) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2FeatureNet(nn.Module):
    """uint8 images -> DINOv2 CLS features ``[N, D]`` (after the final norm)."""

    provides_logits = False

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.vit = vit_for(state)
        self.vit.load_state_dict(official_to_timm(state), strict=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(edm2_preprocess(images))


def dinov2_extractor(weights: str | os.PathLike[str] | None, *, device: str | torch.device = "cpu",
                     batch_size: int = 64) -> FeatureExtractor:
    """The FD_DINOv2 extractor from the official ViT-L/14 file (read once, weights-only, hashed)."""
    path = resolve_dinov2_path(weights)
    fix = f"replace it with a fresh download of {DINOV2_URL}"
    try:
        with open(path, "rb") as f:
            digest = _sha256_of_open(f, path)
            f.seek(0)
            state = safe_load(path, fix=fix, file=f)
        if not isinstance(state, dict) or "cls_token" not in state or "pos_embed" not in state:
            raise ValueError("not a DINOv2 state dict (no cls_token/pos_embed)")
        net = DinoV2FeatureNet(state)
    except UnsafeFileError:
        raise
    except Exception as exc:  # wrong keys or shapes: not the official checkpoint
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CfgxError(f"DINOv2 weights at {path} could not be loaded ({first}): {fix}") from exc
    return FeatureExtractor(net, name=DINOV2_NAME, weights_hash=digest, device=device, batch_size=batch_size)


def real_dinov2_features(ext: FeatureExtractor, real: torch.Tensor, cache_root: str, console=None,
                         **identity: object) -> torch.Tensor:
    """DINOv2 features of the uint8 reference images, cached like Inception's (keyed by the weights' hash).

    Computed by one process: only rank 0 scores, and a ViT-L pass is not worth the sharding code here.
    """
    cache = FeatureCache(cache_root)
    key = cache.key(**identity, **ext.provenance())
    with locked(cache.root / f".{key}.lock", f"real DINOv2 features {cache.path(key)}", console):
        hit = cache.load(key)
        if hit is None or "cls" not in hit:
            say(console, f"computing DINOv2 features of {len(real)} real images (cached: {cache.path(key)})")
            hit = {"cls": ext(real).pool}
            cache.save(key, hit)
    return hit["cls"]
