"""ADM-format image batches (``.npz``: ``arr_0`` uint8 images N x H x W x C, ``arr_1`` integer labels).

The format openai/guided-diffusion's sample scripts and evaluator exchange, the class-conditional reference
batches published with it (e.g. ``VIRTUAL_imagenet256_labeled.npz``), and what ``eval.save_npz`` writes.
It serves as a labelled dataset where no image folder exists: ``dataset=npz dataset.root=FILE.npz``, or a
``cfgx import`` whose reference is such a file. Read with ``allow_pickle=False``: an object array (which
would need pickle) is refused, not loaded. Images are used at the file's resolution; a reference set is
never resampled behind the user's back (FID moves with the resize filter).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cfgx.data.base import DatasetBundle
from cfgx.data.images import _to_unit_range
from cfgx.errors import CfgxError

FIX = "give an ADM-format .npz: arr_0 uint8 [N, H, W, C] (C = 1 or 3) and arr_1 integer class labels [N]"


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files or "arr_1" not in f.files:
                have = ", ".join(f.files) or "nothing"
                raise CfgxError(f"{path} holds {have}; a labelled batch needs arr_0 and arr_1: {FIX}")
            return f["arr_0"], f["arr_1"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CfgxError(f"{path} is not a readable .npz ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                        f"{FIX}") from None


def load_npz(cfg) -> DatasetBundle:
    """``dataset.root`` = the .npz; ``dataset.num_classes`` (null: largest label + 1, e.g. 1000 for ImageNet
    only when label 999 occurs); ``dataset.resolution`` (null: the file's; else it must match)."""
    path = Path(str(cfg.root)).expanduser()
    if not path.is_file():
        raise CfgxError(f"dataset.root={path} is not a file; {FIX}")
    x, y = _arrays(path)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[1] != x.shape[2]:
        raise CfgxError(f"{path}: arr_0 is {x.dtype} {list(x.shape)}, not square uint8 images [N, H, W, C]; {FIX}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise CfgxError(f"{path}: arr_1 is {y.dtype} {list(y.shape)}, not one label >= 0 per image ({len(x)}); "
                        f"{FIX}")
    n_cls = int(cfg.get("num_classes") or (int(y.max()) + 1 if len(y) else 0))
    if len(y) and int(y.max()) >= n_cls:
        raise CfgxError(f"{path}: label {int(y.max())} is outside dataset.num_classes={n_cls}; raise it or drop "
                        "the key (then the largest label + 1)")
    res = cfg.get("resolution")
    if res and int(res) != x.shape[1]:
        raise CfgxError(f"{path} holds {x.shape[1]}x{x.shape[2]} images, not {int(res)}x{int(res)}; give a batch at "
                        "the model's resolution (cfgx does not resample a reference set: FID moves with the filter)")
    if cfg.get("channels") and int(cfg.channels) != x.shape[-1]:
        raise CfgxError(f"{path} holds {x.shape[-1]}-channel images, not dataset.channels={int(cfg.channels)}")
    xt = _to_unit_range(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return DatasetBundle(name="npz", train=TensorDataset(xt, torch.from_numpy(y.astype(np.int64))), test=None,
                         num_classes=n_cls, shape=tuple(xt.shape[1:]), class_names=[str(c) for c in range(n_cls)])
