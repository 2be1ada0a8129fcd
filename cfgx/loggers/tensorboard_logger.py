"""``logger=tensorboard``: event files under ``<run>/logs/tensorboard`` (``tensorboard --logdir runs/``).

Scalars per key (train/* at the training step, sweep/* at the checkpoint step), images, the resolved
config in the HParams tab and as text, and the run dir's path as text. Every command of a run writes
its own event file into the same folder, so TensorBoard shows training and later sweeps together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfgx.loggers.base import Logger, flatten


class TensorBoardLogger(Logger):
    name = "tensorboard"
    package = "tensorboard"
    extra = "tensorboard"

    def log_config(self, config: dict[str, Any], run_dir: Path) -> None:
        # why: tensorboard is an optional extra, and torch.utils.tensorboard needs it at import
        import yaml
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(self.out_dir(run_dir)), filename_suffix=f".{self.job}")
        for summary in hparams(flatten(config), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("run_dir", str(Path(run_dir).resolve()))
        self.writer.add_text(f"config/{self.job}", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        # why: numpy and PIL only when an image is logged
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        self.writer.add_image(f"images/{name}", arr, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()
