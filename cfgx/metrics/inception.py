"""Inception-v3 feature extraction for FID / KID / IS / precision-recall.

One forward pass per image yields the pool3 features (2048-d: FID, KID, precision/recall,
density/coverage, Vendi), the classifier logits (1008-d, torch-fidelity's layout: Inception Score)
and the sFID spatial features (2023-d, tapped by a hook: :mod:`cfgx.metrics.sfid`).

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` ('inception-v3-compat'):
a port of the TF 2015-12-05 graph used by the original FID code (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").
It resizes to 299x299 with TF1-compatible bilinear interpolation *without*
antialiasing. That matters: torchmetrics >= 1.8 defaults to an antialiased resize,
which shifts FID away from published numbers, so we never go through it.

Any small ``nn.Module`` can stand in for Inception (tests, toy data): it takes
uint8 images ``[N, 3, H, W]`` and returns ``pool`` ``[N, D]`` or a tuple
``(pool [N, D], logits [N, K] | None[, spatial [N, S]])``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cfgx.errors import CfgxError
from cfgx.metrics.sfid import SpatialTap
from cfgx.store.digest import sha256_of_file
from cfgx.store.safeload import UnsafeFileError, safe_load

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_NAME = "inception-v3-compat"
# Bump when anything between "uint8 image" and "feature vector" changes (resize,
# channel handling, layers read out): cached features keyed on it then go stale.
FEATURE_PIPELINE_VERSION = 1


_Maybe = torch.Tensor | None


@runtime_checkable
class FeatureNet(Protocol):
    """What :class:`FeatureExtractor` drives: uint8 ``[N, 3, H, W]`` -> pool features (and logits)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class Features:
    """Features of a set of images, on CPU in float64.

    ``logits`` is None when the net gives none or its classifier is known to be
    degenerate (see :func:`logits_available`); the Inception Score is then unavailable.
    """

    pool: torch.Tensor
    logits: torch.Tensor | None
    spatial: torch.Tensor | None = None  # sFID's [N, 2023] (float32: exact), when the net gives them

    def __len__(self) -> int:
        return self.pool.shape[0]


# ----------------------------------------------------------------------------- weights


def default_weights_path() -> Path:
    """Where torch hub keeps the FID Inception weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_weights_path(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The Inception weights file to load; never downloads.

    Uses ``weights_path`` when given, else the torch hub cache. A missing file is a
    :class:`CfgxError` naming where to put it and the URL to fetch it from, because
    machines running experiments are often offline and a silent download attempt
    would hang or fail with an unrelated network traceback.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise CfgxError(
                f"Inception weights not found at {path}: fetch {INCEPTION_WEIGHTS_URL} on a machine with "
                f"internet and copy it to {path} (or point weights_path at an existing copy)"
            )
        return path
    path = default_weights_path()
    if not path.is_file():
        raise CfgxError(
            f"Inception weights missing: fetch {INCEPTION_WEIGHTS_URL} on a machine with internet and put it "
            f"at {path} (or pass its location as weights_path)"
        )
    return path


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """First 12 hex chars of the file's SHA-256 (cache keys, provenance); hashed once per (path, mtime, size)."""
    p = Path(path).expanduser().resolve()
    with open(p, "rb") as f:
        return _sha256_of_open(f, p)


def _sha256_of_open(f: BinaryIO, path: str | os.PathLike[str]) -> str:
    """``weights_sha256`` of the file open as ``f`` (cached by the open file's own mtime and size)."""
    st = os.fstat(f.fileno())
    key = (str(Path(path).expanduser().resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of_file(f)[:12]
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------- networks


def _fidelity_inception(state_dict: dict) -> nn.Module:
    """torch-fidelity's FID Inception-v3 holding ``state_dict``: built without reading any file.

    torch-fidelity's constructor always loads weights itself (``torch.load(path, weights_only=False)``,
    or a download when the path is None). It is handed an in-memory placeholder instead (an empty
    dict cfgx serialises itself, so it holds nothing but that dict), its own ``load_state_dict`` of
    the placeholder is skipped, and the tensors cfgx read with ``safe_load`` are loaded strictly after.
    """
    # why: torch_fidelity loads torchvision (~1 s); only the real Inception net needs it, not stand-in nets
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class TensorsIn(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            if not state_dict:  # torch-fidelity's call with the placeholder, inside its __init__
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    net = TensorsIn(INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=placeholder)
    if not isinstance(state_dict, dict) or not state_dict:
        raise CfgxError(f"expected a state dict of tensors, got {type(state_dict).__name__}")
    net.load_state_dict(state_dict)
    return net


class InceptionV3FeatureNet(nn.Module):
    """torch-fidelity's FID Inception-v3, read out at pool3 and the unbiased logits in one pass."""

    def __init__(self, weights_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = resolve_weights_path(weights_path)
        self.weights_path = path
        # Read once, weights-only, and the tensors handed to the network: no path ever reaches
        # torch-fidelity, which would re-open the file and unpickle it with weights_only=False.
        try:
            with open(path, "rb") as f:  # hashed and loaded from one open file: no swap in between
                self.weights_hash = _sha256_of_open(f, path)
                f.seek(0)
                state_dict = safe_load(path, fix=f"replace it with a fresh download of {INCEPTION_WEIGHTS_URL}",
                                       file=f)
            self.model = _fidelity_inception(state_dict)
        except UnsafeFileError:
            raise
        except Exception as exc:  # not a dict, missing keys, wrong shapes: the file is not the checkpoint
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CfgxError(
                f"Inception weights at {path} could not be loaded ({first}): replace the file with a fresh "
                f"download of {INCEPTION_WEIGHTS_URL}"
            ) from exc
        self.requires_grad_(False)
        self.eval()
        speed_up_for_inference(self.model)
        self.tap = SpatialTap(self.model)

    @property
    def fc(self) -> nn.Linear:
        return self.model.fc

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits = self.model(images)
        return pool, logits, self.tap.take()


def speed_up_for_inference(net: nn.Module) -> nn.Module:
    """The same eval-mode function, faster: BatchNorm folded into its conv, NHWC weights.

    oneDNN's convolutions are faster on NHWC, and the folded net is all convs, pools and ReLUs.
    Only for a frozen net: folding bakes in the running statistics.
    """
    _fold_batchnorm(net)
    return net.to(memory_format=torch.channels_last)


def _fold_batchnorm(net: nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the conv before it: one pass over the activations fewer.

    Inception's blocks are conv -> BN(running stats) -> ReLU, and BN then is an affine map per
    channel, so ``conv'(x) = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is the same conv
    with rescaled weights and a bias. Features move by float rounding only (``tests/test_inception``
    pins them to 1e-5 relative of the unfolded net).
    """
    for module in net.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, bn)
            module.bn = nn.Identity()


def _classifier_of(net: nn.Module) -> nn.Linear | None:
    fc = getattr(net, "fc", None)
    return fc if isinstance(fc, nn.Linear) else None


def logits_available(extractor: FeatureExtractor | nn.Module) -> bool:
    """False when the net's classifier cannot give a meaningful Inception Score.

    The offline copy of the FID weights ships an all-zeros final fc layer: every
    image then gets uniform class probabilities and IS comes out as exactly 1.0,
    which looks like a (terrible) result rather than a missing one. A net may also
    declare ``provides_logits = False``. Nets without an ``fc`` attribute are
    trusted; if they return ``None`` logits, IS is unavailable anyway.
    """
    net = extractor.net if isinstance(extractor, FeatureExtractor) else extractor
    declared = getattr(net, "provides_logits", None)
    if declared is not None:
        return bool(declared)
    fc = _classifier_of(net)
    if fc is None:
        return True
    with torch.no_grad():
        return bool(fc.weight.abs().sum() > 0)


# ----------------------------------------------------------------------------- inputs


def images_to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` -> uint8 [0, 255], rounding like PNG export does.

    Rounding (not truncation) keeps features identical to those of the same
    images saved as PNG and read back, which is what reference FID tools see.
    """
    lo, hi = value_range
    x = (images.detach().float() - lo) / (hi - lo) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a batch and return it as uint8 [N, 3, H, W]."""
    if not isinstance(images, torch.Tensor):
        raise CfgxError(
            f"feature extraction expects a torch.Tensor of images, got {type(images).__name__}: "
            "pass a uint8 tensor [N, C, H, W]"
        )
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise CfgxError(
            f"feature extraction expects images [N, C, H, W] with C in {{1, 3}}, got shape "
            f"{tuple(images.shape)}: reshape to [N, C, H, W] (channels first)"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise CfgxError(
                f"feature extraction expects uint8 images in [0, 255], got dtype {images.dtype}: "
                "convert with cfgx.metrics.inception.images_to_uint8 or .to(torch.uint8)"
            )
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            # A float batch is only unambiguous if it already holds 0..255 integers;
            # [0, 1] or [-1, 1] floats would silently collapse to a black image.
            if lo < 0 or hi > 255 or not bool((images == images.round()).all()):
                raise CfgxError(
                    f"feature extraction expects uint8 images in [0, 255], got {images.dtype} values in "
                    f"[{lo:.3g}, {hi:.3g}]: convert with cfgx.metrics.inception.images_to_uint8(x, "
                    "value_range=(lo, hi))"
                )
        images = images.to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images


# ----------------------------------------------------------------------------- extractor


class FeatureExtractor:
    """Batched, gradient-free, eval-mode feature extraction with a :class:`FeatureNet`.

    Use :meth:`inception` for the standard FID network; pass any module as ``net``
    for offline tests or toy data. ``name`` and ``weights_hash`` end up in
    :meth:`provenance`, which is what feature caches should be keyed on.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str | None = None,
        weights_hash: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise CfgxError(
                f"feature extraction batch_size must be >= 1, got {batch_size}: set a positive value"
            )
        self.device = torch.device(device)
        # No requires_grad_(False): the module may be shared with a training loop;
        # torch.no_grad() during extraction is enough.
        self.net = net.to(self.device)
        self.name = name or type(net).__name__
        self.weights_hash = weights_hash
        self.batch_size = batch_size

    @classmethod
    def inception(
        cls,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> FeatureExtractor:
        """The FID Inception-v3 from ``weights_path`` or the torch hub cache (never downloads)."""
        net = InceptionV3FeatureNet(weights_path)
        # weights_hash: of the bytes loaded, not of whatever the path holds now
        return cls(net, name=INCEPTION_NAME, weights_hash=net.weights_hash, device=device, batch_size=batch_size)

    def provenance(self) -> dict[str, str | int | None]:
        """What the features depend on besides the images: put it in cache keys and reports."""
        v = FEATURE_PIPELINE_VERSION
        return {"extractor": self.name, "weights_sha256": self.weights_hash, "pipeline_version": v}

    def _run(self, batch: torch.Tensor, use_logits: bool) -> tuple[torch.Tensor, _Maybe, _Maybe]:
        out = self.net(batch.to(self.device, non_blocking=True))
        pool, logits, spatial = (*out, None)[:3] if isinstance(out, tuple) else (out, None, None)
        if pool.dim() != 2 or pool.shape[0] != batch.shape[0]:
            raise CfgxError(
                f"feature net {self.name} returned pool features of shape {tuple(pool.shape)} for "
                f"{batch.shape[0]} images: it must return [N, D]"
            )
        pool = pool.detach().to("cpu", torch.float64)
        if logits is not None and use_logits:
            logits = logits.detach().to("cpu", torch.float64)
        else:
            logits = None
        return pool, logits, None if spatial is None else spatial.detach().to("cpu", torch.float32)

    def extract(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Features:
        """Features of uint8 images ``[N, C, H, W]`` (C in {1, 3}) or of an iterable of such batches.

        The net runs in eval mode on every call, because a caller (or a training
        loop sharing the module) may have flipped it to train mode, which would
        change batch-norm and dropout behaviour silently; its previous mode is
        restored afterwards.
        """
        was_training = self.net.training
        self.net.eval()
        try:
            return self._extract(images)
        finally:
            self.net.train(was_training)

    def _extract(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Features:
        batches = [images] if isinstance(images, torch.Tensor) else images
        pools: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        spatial: list[torch.Tensor] = []
        # Checked per call, not at construction: a shared classifier may have been trained since.
        use_logits = logits_available(self.net)
        no_logits = not use_logits
        with torch.no_grad():
            for big in batches:
                big = _check_images(big)
                for start in range(0, big.shape[0], self.batch_size):
                    p, lg, sp = self._run(big[start : start + self.batch_size], use_logits)
                    pools.append(p)
                    spatial += [] if sp is None else [sp]
                    if lg is None:
                        no_logits = True
                    else:
                        logits.append(lg)
        if not pools:
            raise CfgxError("feature extraction got no images: pass at least one image")
        return Features(pool=torch.cat(pools), logits=None if no_logits else torch.cat(logits),
                        spatial=torch.cat(spatial) if len(spatial) == len(pools) else None)

    __call__ = extract
