"""What every dataset hands to the rest of cfgx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset


@dataclass
class DatasetBundle:
    """A labelled dataset, already scaled to the model's range.

    ``train``/``test`` yield ``(x, y)`` with ``x`` float32 of ``shape`` (images in
    [-1, 1]) and ``y`` an int class index in [0, num_classes). ``clip`` is the
    range samplers clamp predicted x0 to (None for unbounded toy data).
    ``extra`` carries dataset-specific objects, e.g. the analytic mixture of the
    toy datasets that ``backbone=exact`` needs.
    """

    name: str
    train: Dataset
    test: Dataset | None
    num_classes: int
    shape: tuple[int, ...]
    class_names: list[str]
    is_image: bool = True
    clip: float | None = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.shape[0] if self.is_image else 1

    @property
    def resolution(self) -> int:
        return self.shape[-1] if self.is_image else 0


def stack_dataset(ds: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a dataset as two tensors; uses the tensors directly when it holds them."""
    if hasattr(ds, "tensors"):
        x, y = ds.tensors[0], ds.tensors[1]
        return (x[:limit], y[:limit]) if limit else (x, y)
    n = len(ds) if limit is None else min(limit, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=512)
    xs, ys = zip(*[(xb, yb) for xb, yb in loader])
    return torch.cat(xs), torch.cat(ys).long()
