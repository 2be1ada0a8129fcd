"""What every experiment logger does, and the one naming of what it logs.

A logger is started once per command (``log_config``: the resolved config and the run dir), then
gets training records (``log_train``), sweep rows (``log_row``) and images (``log_image``), and is
closed. The keys are the same in every logger:

- ``train/<field>`` for each number of a ``train_log.jsonl`` line (loss, lr, img_per_s, elapsed_s),
  at that line's ``step``;
- ``sweep/<method>[+<postprocess>]/s=<s>/<column>`` for each measured number of a sweep row (the
  columns of ``metrics.csv``), at the row's ``checkpoint_step``;
- ``images/<file stem>`` for sample grids and figures, at the checkpoint step.

Loggers only read what cfgx already computed: they draw no random numbers and write nothing outside
their own folder, so a run's tables are the same with or without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Row columns that say how a row was produced (its key and settings), not what it measured.
ROW_SETTINGS = frozenset({"s", "w_ho", "checkpoint_step", "steps", "eta", "num_samples", "seed", "seed_blocks",
                          "batch_size"})
TRAIN_STEP = "step"              # the x axis of train/* keys
SWEEP_STEP = "checkpoint_step"   # the x axis of sweep/* and images/* keys


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def train_metrics(record: dict[str, Any]) -> dict[str, float]:
    """``train/<field>`` for each number of a train_log.jsonl record (its step aside)."""
    return {f"train/{k}": v for k, v in record.items() if k != TRAIN_STEP and _number(v) is not None}


def row_prefix(row: dict[str, Any]) -> str:
    post = row.get("postprocess") or "none"
    return f"sweep/{row['method']}{'' if post == 'none' else '+' + str(post)}/s={float(row['s']):g}"


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """``sweep/<method>/s=<s>/<column>`` for each measured number of a sweep row."""
    prefix = row_prefix(row)
    return {f"{prefix}/{k}": v for k, v in row.items() if k not in ROW_SETTINGS and _number(v) is not None}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.lr": 0.001, ...}``; lists and nulls as JSON text, for hyperparameter tables."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class Logger:
    """One experiment tracker. Subclasses set ``name`` (the ``logger=`` option), ``package`` (the module it
    imports; None = none) and ``extra`` (the pip extra that installs it), and implement the hooks below."""

    name = "logger"
    package: str | None = None
    extra: str | None = None

    def __init__(self, opts: dict[str, Any] | None = None, job: str = "train") -> None:
        self.opts = dict(opts or {})
        self.job = job  # the cfgx command this logger records: train | sweep

    def out_dir(self, run_dir: Path) -> Path:
        """``<name>.dir`` when set, else ``<run>/logs/<name>``."""
        return Path(self.opts.get("dir") or Path(run_dir) / "logs" / self.name)

    def run_name(self, run_dir: Path) -> str:
        return str(self.opts.get("name") or self.opts.get("run_name") or f"{Path(run_dir).name}-{self.job}")

    # ------------------------------------------------------------------ the hooks

    def log_config(self, config: dict[str, Any], run_dir: Path) -> None:
        """Open the logger; record the resolved config (hyperparameters) and the run dir's path."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        """Numbers at ``step`` of ``axis`` (TRAIN_STEP or SWEEP_STEP)."""
        raise NotImplementedError

    def log_image(self, name: str, path: Path, step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool = True) -> None:
        """Flush and close; ``ok`` is False when the command failed or was interrupted."""

    # ------------------------------------------------------------------ what cfgx hands over

    def log_train(self, step: int, record: dict[str, Any]) -> None:
        self.log_metrics(train_metrics(record), int(step), TRAIN_STEP)

    def log_row(self, row: dict[str, Any]) -> None:
        metrics = row_metrics(row)
        if metrics:
            self.log_metrics(metrics, int(row.get("checkpoint_step") or 0), SWEEP_STEP)
