"""Image datasets: the embedded digits default, torchvision sets and class-per-folder trees.

Every image dataset is materialised once as an in-memory float tensor in
[-1, 1]: the training loop then indexes batches with its own seeded generator,
which keeps resume bit-exact and avoids DataLoader worker overhead for the
small resolutions CFG studies use.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cfgx.data.base import DatasetBundle
from cfgx.errors import CfgxError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]


def _to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [-1, 1]; exactly invertible by ``to_uint8``."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range images in [-1, 1] -> uint8, as metrics and PNGs want them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if not resolution or x.shape[-1] == resolution:
        return x
    out = torch.nn.functional.interpolate(x.float(), size=(resolution, resolution), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_digits(cfg) -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images; ships in the wheel, no download).

    There is no official split: a fixed, stratified 80/20 split (seeded) gives the
    held-out set the evaluation classifier is scored on.
    """
    from sklearn.datasets import load_digits as sk_digits  # why: scikit-learn (~0.7 s) only for these digits

    d = sk_digits()
    # Pixel values are 0..16; map to 0..255 so every image dataset shares one uint8 path.
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(int(cfg.get("split_seed", 0)))
    test_idx = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(perm[: round(0.2 * len(idx))])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    x = _resize(x, cfg.get("resolution"))
    return DatasetBundle(
        name="digits",
        train=TensorDataset(_to_unit_range(x[~test_mask]), y[~test_mask]),
        test=TensorDataset(_to_unit_range(x[test_mask]), y[test_mask]),
        num_classes=10, shape=tuple(x.shape[1:]), class_names=[str(i) for i in range(10)],
    )


_TORCHVISION = {
    # name: (torchvision class, split kwarg style, raw folder torchvision expects, channels)
    "mnist": ("MNIST", "train", "MNIST/raw", 1),
    "fashion_mnist": ("FashionMNIST", "train", "FashionMNIST/raw", 1),
    "cifar10": ("CIFAR10", "train", "cifar-10-batches-py", 3),
    "cifar100": ("CIFAR100", "train", "cifar-100-python", 3),
    "svhn": ("SVHN", "split", "svhn (train_32x32.mat, test_32x32.mat)", 3),
}


def _tv_to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    data = torch.as_tensor(np.asarray(data))
    if data.dim() == 3:  # MNIST-like [N, H, W]
        data = data.unsqueeze(1)
    elif data.shape[-1] == 3:  # CIFAR [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = ds.labels  # SVHN
    return data.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(targets), dtype=torch.long)


def load_torchvision(cfg) -> DatasetBundle:
    import torchvision  # why: torchvision import is slow (~1 s) and only these datasets need it

    name = cfg.name
    cls_name, split_style, expected, _ = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(str(cfg.root)).expanduser()
    splits = {}
    for split in ("train", "test"):
        kwargs = {"train": split == "train"} if split_style == "train" else {"split": split}
        try:
            splits[split] = cls(root=str(root), download=bool(cfg.download), **kwargs)
        except RuntimeError as e:
            if not cfg.download:
                raise CfgxError(
                    f"dataset {name!r} not found under {root}/ (expected {expected}); run "
                    f"'cfgx prepare dataset={name}' on a machine with internet, or set "
                    f"dataset.root=PATH to where it is, or dataset.download=true") from e
            # torchvision reports a failed download (offline, mirror down) as RuntimeError too.
            raise CfgxError(
                f"could not download {name!r} into {root}/ ({str(e).splitlines()[0][:120]}); fetch it on a "
                f"machine with internet ('cfgx prepare dataset={name}') and copy it there") from e
        except Exception as e:  # other network errors when download=true offline
            raise CfgxError(
                f"could not download {name!r} into {root}/ ({type(e).__name__}); fetch it on a "
                f"machine with internet ('cfgx prepare dataset={name}') and copy it there") from e
    xtr, ytr = _tv_to_tensors(splits["train"])
    xte, yte = _tv_to_tensors(splits["test"])
    res = cfg.get("resolution")
    xtr, xte = _resize(xtr, res), _resize(xte, res)
    classes = list(getattr(splits["train"], "classes", None) or [str(i) for i in range(10)])
    if name == "cifar100":
        classes = list(splits["train"].classes)
    return DatasetBundle(name=name, train=TensorDataset(_to_unit_range(xtr), ytr),
                         test=TensorDataset(_to_unit_range(xte), yte),
                         num_classes=int(ytr.max()) + 1, shape=tuple(xtr.shape[1:]),
                         class_names=[str(c) for c in classes])


def load_imagefolder(cfg) -> DatasetBundle:
    """Any ``root/<class>/<image>`` tree (and optionally ``root/test/<class>/...`` via test_root)."""
    # why: torchvision import is slow (~1 s) and only image-folder datasets need it
    import torchvision
    from torchvision.transforms import functional as TF

    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise CfgxError(f"imagefolder root {root} is not a directory; set dataset.root=PATH to a "
                        "folder with one subfolder of images per class")
    res = int(cfg.resolution)
    channels = int(cfg.get("channels", 3))

    def load(path: Path):
        for cdir in sorted(path.iterdir()):
            if cdir.is_dir():
                check_class_tree(cdir)
        try:
            ds = torchvision.datasets.ImageFolder(str(path))
        except (FileNotFoundError, OSError):  # no class folders, or none holding an image file
            ds = None
        if ds is None or len(ds) == 0:
            raise CfgxError(f"no images found under {path}; expected <root>/<class>/<image>.png|jpg")
        xs, ys = [], []
        for p, label in ds.samples:
            try:
                img = ds.loader(p).convert("L" if channels == 1 else "RGB")
            except Exception as e:  # PIL's UnidentifiedImageError, truncated files, unreadable files
                raise CfgxError(f"{p} is not a readable image ({type(e).__name__}); remove it from {path} or "
                                "replace it with a valid image") from None
            img = TF.resize(img, res, antialias=True)
            img = TF.center_crop(img, res)
            xs.append(TF.pil_to_tensor(img))
            ys.append(label)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long), ds.classes

    xtr, ytr, classes = load(root)
    test = None
    if cfg.get("test_root"):
        xte, yte, _ = load(Path(str(cfg.test_root)).expanduser())
        test = TensorDataset(_to_unit_range(xte), yte)
    return DatasetBundle(name="imagefolder", train=TensorDataset(_to_unit_range(xtr), ytr), test=test,
                         num_classes=len(classes), shape=tuple(xtr.shape[1:]), class_names=classes)


def check_class_tree(cdir: Path) -> None:
    """Every folder below the class folder ``cdir`` lies inside it and is reached once.

    torchvision's ImageFolder follows symlinked folders: a link back to the root made class 0
    take class 1's images, and a loop repeats images until the path length gives out (16 files
    became 656 samples). The class folder itself may be a link (to where the images live).
    """
    top = cdir.resolve()
    seen: set[tuple[int, int]] = set()
    stack = [cdir]
    while stack:
        d = stack.pop()
        try:
            real = d.resolve(strict=True)
            st = real.stat()
        except (RuntimeError, OSError):  # Python's "Symlink loop", ELOOP
            st = None
        if st is None or (st.st_dev, st.st_ino) in seen:
            raise CfgxError(f"{d} is a symlink loop (or a second link to one folder) under class folder {cdir}; "
                            "remove the link so each image is read once")
        if real != top and top not in real.parents:
            raise CfgxError(f"{d} links to {real}, outside its class folder {cdir}; each class's images must lie "
                            "under its own folder: remove the link or copy the images in")
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as entries:
            stack.extend(Path(e.path) for e in entries if e.is_dir())
