"""Sample grids: rows = classes, columns = the first samples of each class, same seeds at every scale."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from cfgx.data import to_uint8
from cfgx.report.plotting import pyplot
from cfgx.store.atomic import atomic_save_image, atomic_savefig


def save_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int, path: Path) -> torch.Tensor:
    """Rows = classes, columns = the first ``per_class`` samples of each class (same seeds at every s)."""
    idx: list[int] = []
    for c in range(num_classes):
        ids = (y == c).nonzero().flatten()[:per_class].tolist()
        idx += ids + [ids[-1]] * (per_class - len(ids)) if ids else []
    imgs = to_uint8(x[idx]).float() / 255.0
    scale = max(1, 64 // x.shape[-1])  # make 8 px digits visible
    if scale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(imgs, nrow=per_class, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(grid, path)
    return grid


def save_side_by_side(grids: dict[str, torch.Tensor], path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
