"""Dataset registry: to add a dataset, write a loader returning a DatasetBundle and list it here.

The config group ``configs/dataset/`` has one YAML per entry (its ``name`` picks
the loader).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import OmegaConf

from cfgx.data.base import DatasetBundle, stack_dataset
from cfgx.data.gmm import build_gmm_bundle
from cfgx.data.images import load_digits, load_imagefolder, load_torchvision, to_uint8
from cfgx.data.npz import load_npz
from cfgx.errors import CfgxError


def _load_gmm(cfg) -> DatasetBundle:
    # Keys every dataset entry carries; the mixture builder takes only its own.
    opts = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("name", "root", "download", "resolution", "hflip") and v is not None}
    return build_gmm_bundle(cfg.name, opts)


LOADERS: dict[str, Callable[..., DatasetBundle]] = {
    "digits": load_digits,
    "mnist": load_torchvision,
    "fashion_mnist": load_torchvision,
    "cifar10": load_torchvision,
    "cifar100": load_torchvision,
    "svhn": load_torchvision,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
    "gmm1d": _load_gmm,
    "gmm2d": _load_gmm,
}


def build_dataset(cfg) -> DatasetBundle:
    """Load the dataset named by ``cfg.name`` (a ``dataset`` config group entry)."""
    if cfg.name not in LOADERS:
        raise CfgxError(f"unknown dataset {cfg.name!r}; valid: {', '.join(sorted(LOADERS))}")
    data = LOADERS[cfg.name](cfg)
    if data.num_classes < 2:  # one class: "conditional" training and guidance would mean nothing
        where = f" under {cfg.root}" if cfg.get("root") else ""
        raise CfgxError(f"dataset {data.name!r}{where} has {data.num_classes} class; classifier-free guidance "
                        "needs at least two (one subfolder of images per class)")
    return data


__all__ = ["DatasetBundle", "build_dataset", "stack_dataset", "to_uint8", "LOADERS"]
