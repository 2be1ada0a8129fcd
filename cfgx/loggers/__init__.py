"""Experiment loggers: the ``logger=`` group (configs/logger/), one module per tracker.

``logger=tensorboard`` or several at once, ``logger=[tensorboard,mlflow]``: Hydra merges each option's
block into ``cfg.logger``, so the keys of that block are the loggers in use. This module knows which
exist and which package each needs (checked by ``cfgx.config.validate`` before any work starts); the hub
that fans out to them, rank 0 only, is ``cfgx.loggers.hub.LoggerHub``.
"""

from __future__ import annotations

import importlib.util

from omegaconf import OmegaConf

from cfgx.errors import CfgxError
from cfgx.loggers.base import Logger
from cfgx.loggers.csv_logger import CsvLogger
from cfgx.loggers.mlflow_logger import MlflowLogger
from cfgx.loggers.tensorboard_logger import TensorBoardLogger
from cfgx.loggers.wandb_logger import WandbLogger

LOGGERS: dict[str, type[Logger]] = {c.name: c for c in (CsvLogger, TensorBoardLogger, MlflowLogger, WandbLogger)}
WANDB_MODES = ("offline", "online", "disabled")


def logger_names(cfg) -> list[str]:
    """The loggers ``cfg`` asks for, in the order given (``logger=none`` or a config without the key: [])."""
    block = OmegaConf.select(cfg, "logger") if cfg is not None else None
    return [str(k) for k in block.keys()] if OmegaConf.is_dict(block) else []


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def check_loggers(cfg) -> None:
    """Unknown loggers, loggers whose package is missing and bad options: one line each (CfgxError)."""
    for name in logger_names(cfg):
        cls = LOGGERS.get(name)
        if cls is None:
            raise CfgxError(f"unknown logger {name!r}; valid: none, {', '.join(sorted(LOGGERS))} "
                            f"(add cfgx/loggers/{name}_logger.py and configs/logger/{name}.yaml for a new one)")
        if cls.package is not None and not installed(cls.package):
            raise CfgxError(f"logger={name} needs the {cls.package} package, which is not installed; "
                            f'pip install "cfgx[{cls.extra}]" (or drop logger={name})')
    mode = OmegaConf.select(cfg, "logger.wandb.mode", default=None)
    if "wandb" in logger_names(cfg) and mode not in WANDB_MODES:
        raise CfgxError(f"logger.wandb.mode={mode!r}; valid: {', '.join(WANDB_MODES)}")
