"""``logger=csv``: the keys every logger gets, as plain files (no extra package).

``<run>/logs/csv/metrics.csv`` holds one line per number (time, job, step, key, value) in long form,
``images.csv`` one line per image (time, job, step, name, path), ``config_<job>.json`` the resolved
config and the run dir. A later command (``cfgx sweep``) appends to the same files.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from cfgx.loggers.base import Logger
from cfgx.store.atomic import AppendLog, atomic_write_text


class CsvLogger(Logger):
    name = "csv"

    def log_config(self, config: dict[str, Any], run_dir: Path) -> None:
        self.dir = self.out_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / f"config_{self.job}.json",  # replaces a link there, never writes through it
                          json.dumps({"run_dir": str(Path(run_dir).resolve()), "config": config}, indent=2,
                                     default=str) + "\n")
        self.metrics = self._open("metrics.csv", ["time", "job", "step", "key", "value"])
        self.images = self._open("images.csv", ["time", "job", "step", "name", "path"])

    def _open(self, name: str, header: list[str]):
        f = AppendLog(self.dir / name, newline="")  # a symlink or non-regular file there: refused in one line
        if f.new:
            csv.writer(f).writerow(header)
        return f

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        w, now = csv.writer(self.metrics), round(time.time(), 3)
        for k, v in metrics.items():
            w.writerow([now, self.job, step, k, repr(v)])
        self.metrics.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        csv.writer(self.images).writerow([round(time.time(), 3), self.job, step, name, str(path)])
        self.images.flush()

    def close(self, ok: bool = True) -> None:
        for f in (getattr(self, "metrics", None), getattr(self, "images", None)):
            if f is not None:
                f.close()
