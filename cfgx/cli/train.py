"""``cfgx train``: check every job up front, hand the rest to Hydra, then train (or resume) and sweep."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.backbones import build_backbone, check_label_dependence
from cfgx.cli.common import console as make_console
from cfgx.cli.common import fail, user_error
from cfgx.cli.preflight import check_before_training
from cfgx.config import check_group_choices, compose, config_dir, config_hash, normalize_overrides, validate
from cfgx.data import build_dataset
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.loggers.hub import LoggerHub
from cfgx.schema import check_output_dirs
from cfgx.store.atomic import atomic_write_json
from cfgx.store.locks import acquire, holder, run_lock
from cfgx.store.rundir import find_resumable, new_run_dir, provenance, read_meta, resolve_run
from cfgx.train import train

# Launcher options that come from a plugin (hydra-submitit-launcher), ours or its own.
PLUGIN_LAUNCHERS = ("submitit_local", "submitit_slurm", "slurm")


def _expand_for_validation(overrides: list[str], limit: int = 32) -> list[list[str]]:
    """Each combination of a multirun's comma lists (capped), so every job is validated up front."""
    choices = []
    for a in overrides:
        key, eq, value = a.partition("=")
        if eq and "," in value and not value.strip().startswith("["):
            choices.append([f"{key}={v.strip()}" for v in value.split(",")])
        else:
            choices.append([a])
    return [list(c) for c in itertools.islice(itertools.product(*choices), limit)]


def _hydra_overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def cmd_train(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    args = normalize_overrides(args, multirun=multirun)
    overrides = _hydra_overrides(args)
    check_group_choices(overrides)
    check_output_dirs(overrides)
    _check_launcher_plugin(overrides)
    nproc = 1
    if not any(a.startswith("--") and a not in ("--multirun",) for a in args):
        for combo in _expand_for_validation(overrides) if multirun else [overrides]:
            cfg = compose([o for o in combo if not o.startswith("hydra")])
            validate(cfg)
            nproc = int(cfg.launcher.nproc)
            distributed.check_batch(int(cfg.train.batch_size), max(nproc, distributed.launched_world()))
            if nproc > 1:
                distributed.check_backend(str(cfg.dist.backend))
    if nproc > 1 and distributed.launched_world() == 1:
        return distributed.relaunch(nproc, ["train", *args])

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        try:
            train_task(cfg)
        except (CfgxError, OSError) as e:  # inside Hydra: convert here, or Hydra prints its own report
            fail(user_error(e))

    old = sys.argv
    sys.argv = ["cfgx train", *args]
    try:
        _task()
    finally:
        sys.argv = old
    return 0


def _check_launcher_plugin(overrides: list[str]) -> None:
    """A plugin launcher that is not installed fails as one line, before Hydra's long error."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or value not in PLUGIN_LAUNCHERS:
            continue
        try:
            found = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise CfgxError(f"hydra/launcher={value} needs the hydra-submitit-launcher plugin, which is not "
                            'installed; install it with pip install -e ".[cluster]"')


def _job_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _job_tag() -> str:
    try:
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"job{hc.job.num}"
    except Exception:
        pass
    return ""


def train_task(cfg: DictConfig, overrides: list[str] | None = None, on_step=None, console=None,
               hub: LoggerHub | None = None) -> Path:
    """Everything ``cfgx train`` does for one config: train (or resume), then sweep. Returns the run dir.

    ``hub``: the experiment loggers (default: those ``cfg.logger`` names, rank 0 only).
    """
    # why: cfgx.sweep.loop loads the metrics stack (~3 s), so cfgx train's argument errors stay fast
    from cfgx.sweep.loop import run_sweep

    validate(cfg)
    device = distributed.setup_from_config(cfg, batch_size=int(cfg.train.batch_size))
    console = (console or make_console()) if distributed.is_main() else None  # one voice: rank 0
    with distributed.main_first():  # a download happens once, the other ranks then read its files
        data = build_dataset(cfg.dataset)
    h = config_hash(cfg)
    overrides = overrides if overrides is not None else _job_overrides()
    # Rank 0 takes this config's start lock before the minutes of checks below, and holds it until training
    # ends: a second identical 'cfgx train' started meanwhile is refused at once instead of training too.
    with _start_guard(cfg, data.name, h) as held:
        if cfg.backbone.name != "exact":
            check_label_dependence(build_backbone(cfg.backbone, data, NoiseSchedule.from_config(cfg.diffusion)),
                                   data.shape, device)

        # Rank 0 alone finds the run to resume, or creates one, and locks it; every rank then trains that
        # one (or fails alike). What the sweep will need is checked before a run dir is made, on every
        # rank, because building the evaluation side is collective under torchrun.
        found = distributed.on_main(lambda: _find_run_dir(cfg, data, h))
        check_before_training(cfg, data, device, None if found is None else Path(found), console)

        def create_and_lock() -> str:
            run_dir = Path(found) if found is not None else _new_run_dir(cfg, data, h, overrides, device, console)
            held.append(run_lock(run_dir))  # a second identical 'cfgx train' finds this run and must not train it too
            return str(run_dir)

        run_dir = Path(distributed.on_main(create_and_lock))
        with (LoggerHub.from_config(cfg, job="train") if hub is None else hub).start(run_dir, cfg) as hub:
            try:
                result = train(cfg, data, run_dir, device, on_step=on_step, console=console, hub=hub)
                if distributed.is_main():
                    meta = read_meta(run_dir)
                    meta.update({"train_finished": True, "checkpoint_step": result.step,
                                 "train_img_per_s": round(result.img_per_s, 1),
                                 "train_seconds_last_call": round(result.seconds, 2),
                                 "train_processes": distributed.world_size()})
                    atomic_write_json(run_dir / "meta.json", meta)
            finally:
                _release(held)
            run_sweep(cfg, run_dir, data, result.model, result.step, device, console, hub=hub)
    return run_dir


def _start_lock(cfg: DictConfig, dataset: str, h: str):
    """The lock ``<runs>/<dataset>/.train-<config hash>.lock``, or a one-line error naming its holder.

    None with train.resume=false and no run=: that asks for a separate run, which may train beside another.
    """
    if not cfg.train.resume and not cfg.run:
        return None
    path = Path(str(cfg.paths.runs)) / dataset / f".train-{h}.lock"
    lock = acquire(path, wait=False)
    if lock is None:
        raise CfgxError(f"an identical 'cfgx train' is already running ({holder(path) or 'another process'}); wait "
                        "for it to finish (its sweep follows), or pass train.resume=false to train a separate run")
    return lock


@contextmanager
def _start_guard(cfg: DictConfig, dataset: str, h: str) -> Iterator[list]:
    """Rank 0 holds the start lock (``_start_lock``) for the block; the block appends the run-dir lock.

    Every lock in the yielded list is released on leaving (and may be released before, ``_release``); the
    folders made only for the lock file are removed again when no run dir went into them.
    """
    held: list = []
    runs_root = Path(str(cfg.paths.runs))
    made: list[Path] = []

    def start() -> None:
        made.extend(d for d in (runs_root / dataset, runs_root) if not d.exists())
        held.append(_start_lock(cfg, dataset, h))

    distributed.on_main(start)
    try:
        yield held
    finally:
        _release(held)
        for d in made:
            try:
                os.rmdir(d)  # an empty folder only: a run dir in it keeps it
            except OSError:
                pass


def _release(locks: list) -> None:
    for lock in reversed(locks):
        if lock is not None:
            lock.release()
    locks.clear()


def _find_run_dir(cfg: DictConfig, data, h: str) -> str | None:
    """The run to continue: run=PATH, or the unfinished run of this config; None for a new run."""
    runs_root = Path(str(cfg.paths.runs))
    if cfg.run:
        run_dir = resolve_run(str(cfg.run), runs_root)
        if read_meta(run_dir).get("config_hash") != h:
            raise CfgxError(f"run={cfg.run} was trained with a different config; drop run= to start a new "
                            "run, or repeat that run's options (see its overrides.yaml)")
        return str(run_dir)
    if cfg.train.resume:
        found = find_resumable(runs_root, data.name, h)
        return None if found is None else str(found)
    return None


def _new_run_dir(cfg: DictConfig, data, h: str, overrides: list[str], device, console) -> Path:
    """A new run dir with its config, overrides and meta, made whole or not at all (rank 0 only)."""
    meta = {"config_hash": h, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": int(cfg.seed),
            "eval_seed": int(cfg.eval.seed), "dataset": data.name, "train_finished": False,
            **provenance(device)}
    run_dir = new_run_dir(Path(str(cfg.paths.runs)), data.name, _job_tag(), files={
        "config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(overrides)),
        "meta.json": json.dumps(meta, indent=2, default=str) + "\n"})
    if console is not None:
        console.print(f"run dir: {run_dir}")
    return run_dir
