"""The loggers of one command, fanned out; a logger that fails never stops training or a sweep.

Rank 0 alone logs (the other ranks get an empty hub). Any exception of a logger, at any call, prints
one warning line on stderr and turns that logger off for the rest of the command; the others go on.
An empty hub (``LoggerHub()``, the default of the Python API) does nothing.

    hub = LoggerHub.from_config(cfg, job="train")
    with hub.start(run_dir, cfg):       # closes the loggers, marking a failed command as failed
        train(..., hub=hub)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.loggers import LOGGERS, logger_names
from cfgx.loggers.base import Logger


class LoggerHub:
    def __init__(self, loggers: list[Logger] | None = None) -> None:
        self.loggers: list[Logger] = list(loggers or [])
        self.started = False

    @classmethod
    def from_config(cls, cfg: DictConfig, job: str = "train") -> LoggerHub:
        """The loggers ``cfg.logger`` names (checked by validate()); empty on ranks other than 0."""
        if not distributed.is_main():
            return cls()
        return cls([LOGGERS[name](OmegaConf.to_container(cfg.logger[name], resolve=True), job=job)
                    for name in logger_names(cfg)])

    def __bool__(self) -> bool:
        return bool(self.loggers)

    # ------------------------------------------------------------------ what cfgx calls

    def start(self, run_dir: Path, cfg: DictConfig | dict[str, Any]) -> LoggerHub:
        """Record the resolved config and the run dir; returns the hub, a context manager that closes it."""
        config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        self.started = True
        self._each("log_config", config, Path(run_dir))
        return self

    def log_train(self, step: int, record: dict[str, Any]) -> None:
        self._each("log_train", step, record)

    def log_row(self, row: dict[str, Any]) -> None:
        self._each("log_row", row)

    def log_image(self, path: Path, step: int) -> None:
        self._each("log_image", Path(path).stem, Path(path), int(step))

    def close(self, ok: bool = True) -> None:
        self._each("close", ok)
        self.loggers = []

    def __enter__(self) -> LoggerHub:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    # ------------------------------------------------------------------ one logger's failure

    def _each(self, method: str, *args: Any) -> None:
        for lg in list(self.loggers):
            try:
                getattr(lg, method)(*args)
            except Exception as e:  # noqa: BLE001 - any failure of a logger is the logger's, never the run's
                self._drop(lg, method, e)

    def _drop(self, lg: Logger, method: str, e: Exception) -> None:
        self.loggers.remove(lg)
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"cfgx: warning: logger {lg.name} failed ({method}: {type(e).__name__}: {msg}); it logs nothing more "
              "for this command, which goes on", file=sys.stderr, flush=True)
        if method != "close":
            try:
                lg.close(ok=False)
            except Exception:  # noqa: BLE001 - already reported once
                pass
