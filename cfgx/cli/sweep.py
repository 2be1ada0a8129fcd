"""``cfgx sweep``: evaluate an existing run's checkpoints at guidance scales."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.cli.common import console as make_console
from cfgx.cli.preflight import training_note
from cfgx.config import (
    check_eval_overrides,
    compose,
    merge_eval_overrides,
    normalize_overrides,
    override_key,
    validate,
)
from cfgx.console import say
from cfgx.data import build_dataset
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.loggers.hub import LoggerHub
from cfgx.postprocess.flow import ignored_settings
from cfgx.store.checkpoints import load_ema_model, load_snapshot_model, parse_checkpoints
from cfgx.store.rundir import default_run_line, load_run_config, resolve_run
from cfgx.sweep.search import scales_words


def sweep_config(args: list[str], verb: str = "sweeping") -> tuple[DictConfig, Path]:
    """The run's saved config with the user's evaluation overrides on top, and the run dir.

    Without run=PATH the run is the newest finished one, and a line (``verb`` ...) names it.
    """
    overrides = normalize_overrides(args)
    run_arg = None
    rest = []
    for o in overrides:
        if o.startswith("run="):
            run_arg = o.split("=", 1)[1] or None
        else:
            rest.append(o)
    check_eval_overrides(rest)
    fresh = compose(rest)
    run_dir = resolve_run(run_arg, Path(str(fresh.paths.runs)))
    if run_arg is None and distributed.is_main():
        make_console().print(default_run_line(verb, run_dir), markup=False, soft_wrap=True)
    cfg = merge_eval_overrides(OmegaConf.create(load_run_config(run_dir)), rest, fresh)
    cfg.run = str(run_dir)
    if any(override_key(o) == "guidance.scales" for o in rest) and not any(override_key(o) == "guidance.auto"
                                                                          for o in rest):
        cfg.guidance.auto = False  # scales on the command line beat a run trained with guidance=auto
    validate(cfg)
    return cfg, run_dir


def cmd_sweep(args: list[str]) -> int:
    # why: cfgx.sweep.loop loads the metrics stack (~3 s), so a bad sweep argument fails fast
    from cfgx.sweep.loop import run_sweep

    ckpt_args = [a for a in args if a.startswith("checkpoint=")]
    rest = [a for a in args if not a.startswith("checkpoint=")]
    cfg, run_dir = sweep_config(rest)
    nproc = int(OmegaConf.select(cfg, "launcher.nproc", default=1))
    if nproc > 1 and distributed.launched_world() == 1:
        # The ranks sweep the run picked here (the last run= wins), even if a newer one finishes meanwhile.
        return distributed.relaunch(nproc, ["sweep", *args, f"run={run_dir}"])
    device = distributed.setup_from_config(cfg)
    console = make_console() if distributed.is_main() else None
    if cfg.postprocess.name != "none" and console is not None:
        _print_ignored_postprocess_settings(cfg, run_dir, rest, console)
    with distributed.main_first():
        data = build_dataset(cfg.dataset)
    schedule = NoiseSchedule.from_config(cfg.diffusion)

    # checkpoint=all|last|STEP[,STEP...]: last.pt and/or EMA snapshots (train.snapshot_every)
    snaps = parse_checkpoints(ckpt_args[-1].split("=", 1)[1] if ckpt_args else "last", run_dir)
    with LoggerHub.from_config(cfg, job="sweep").start(run_dir, cfg) as hub:
        for snap in snaps:
            if snap is None:
                model, step = load_ema_model(run_dir, cfg, data, schedule, device)
                note = training_note(run_dir, step)
                if note and console is not None:
                    console.print(note, markup=False)
            else:
                model, step = load_snapshot_model(run_dir, cfg, data, schedule, device, snap), snap
            say(console, f"sweeping {run_dir} (checkpoint step {step}) " + scales_words(cfg))
            run_sweep(cfg, run_dir, data, model, step, device, console, hub=hub)
    return 0


def _print_ignored_postprocess_settings(cfg: DictConfig, run_dir: Path, args: list[str], console) -> None:
    """The postprocess.* settings given on the command line that the trained postprocessor does not use."""
    typed = {override_key(o).split(".", 1)[1]: OmegaConf.select(cfg, override_key(o))
             for o in normalize_overrides(args) if override_key(o).startswith("postprocess.")}
    for line in ignored_settings(run_dir, typed):
        console.print(line, markup=False)
