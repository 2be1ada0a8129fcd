"""The ``cfgx`` command line: subcommands on top of Hydra-composed configs.

``cfgx train`` runs through ``hydra.main`` so multirun (``-m``), launchers and
``--cfg job`` work as Hydra users expect; cfgx only rewrites its shorthand
(``guidance=0,1,3,7``, ``cond_drop=0.1``) first and checks group choices, so a
typo fails as one line before anything is written.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cfgx.config import (
    GROUPS,
    TRAINING_KEYS,
    check_group_choices,
    compose,
    config_dir,
    config_hash,
    group_options,
    normalize_overrides,
    validate,
)
from cfgx.console import say
from cfgx.errors import CfgxError

SUBCOMMANDS = {
    "train": "train a joint conditional/unconditional model, then sweep guidance scales",
    "sweep": "evaluate an existing run at guidance scales: cfgx sweep guidance=0,1,3,7 [run=PATH] "
             "[guidance.method=[cfg,apg]] [checkpoint=all|last|STEP,...]",
    "report": "merge runs' tables, plots and frontier.md: cfgx report RUN [RUN ...] [out=DIR] "
              "[report.match_accuracy=0.99]",
    "prepare": "download a dataset and the Inception weights ahead of time: cfgx prepare dataset=X",
    "toy": "exact-score toys: trajectories and boundaries under CG/CFG: cfgx toy [dataset=gmm1d|gmm2d]",
    "train-classifier": "train the noise-conditional guidance classifier of a run: [run=PATH]",
    "postprocess": "train the flow-matching postprocessor of a run: cfgx postprocess [run=PATH]",
}
EVAL_KEYS = ("eval", "guidance", "sampler", "device", "paths", "postprocess", "dist", "launcher")
# Launcher options that come from a plugin (hydra-submitit-launcher), ours or its own.
PLUGIN_LAUNCHERS = ("submitit_local", "submitit_slurm", "slurm")


def usage() -> str:
    lines = ["usage: cfgx <command> [key=value ...]   (python -m cfgx works the same)", "", "commands:"]
    lines += [f"  {k:<18} {v}" for k, v in SUBCOMMANDS.items()]
    lines += ["", "config groups (pick with group=option; override any key with key=value):"]
    for g in GROUPS:
        opts = group_options(g)
        if opts:
            lines.append(f"  {g:<12} {', '.join(opts)}")
    lines += ["", "shorthand: guidance=0,1,3,7 sets guidance.scales; cond_drop=0.2 sets cond_drop.p;",
              "           cfgx train -m cond_drop=0,0.1,0.2 trains one run per rate (Hydra multirun)",
              f"configs: {config_dir()}"]
    return "\n".join(lines)


def _console():
    from rich.console import Console

    return Console(highlight=False)


# ---------------------------------------------------------------- train

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
    _check_launcher_plugin(overrides)
    nproc = 1
    if not any(a.startswith("--") and a not in ("--multirun",) for a in args):
        for combo in _expand_for_validation(overrides) if multirun else [overrides]:
            cfg = compose([o for o in combo if not o.startswith("hydra")])
            validate(cfg)
            nproc = int(cfg.launcher.nproc)
            from cfgx.distributed import check_backend, check_batch

            check_batch(int(cfg.train.batch_size), max(nproc, _launched_world()))
            if nproc > 1:
                check_backend(str(cfg.dist.backend))
    if nproc > 1 and _launched_world() == 1:
        from cfgx.distributed import relaunch

        return relaunch(nproc, ["train", *args])

    import hydra

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        try:
            train_task(cfg)
        except (CfgxError, OSError) as e:  # inside Hydra: convert here, or Hydra prints its own report
            _fail(_user_error(e))

    old = sys.argv
    sys.argv = ["cfgx train", *args]
    try:
        _task()
    finally:
        sys.argv = old
    return 0


def _launched_world() -> int:
    """WORLD_SIZE when torchrun (or submitit) started this process, else 1."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 1


def _check_launcher_plugin(overrides: list[str]) -> None:
    """A plugin launcher that is not installed fails as one line, before Hydra's long error."""
    import importlib.util

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
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _job_tag() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"job{hc.job.num}"
    except Exception:
        pass
    return ""


def train_task(cfg: DictConfig, overrides: list[str] | None = None, on_step=None, console=None) -> Path:
    """Everything ``cfgx train`` does for one config: train (or resume), then sweep. Returns the run dir."""
    from cfgx import distributed
    from cfgx.data import build_dataset
    from cfgx.store.locks import run_lock
    from cfgx.store.rundir import atomic_write_json, read_meta
    from cfgx.sweep.loop import run_sweep
    from cfgx.train import train

    validate(cfg)
    device = distributed.setup_from_config(cfg, batch_size=int(cfg.train.batch_size))
    console = (console or _console()) if distributed.is_main() else None  # one voice: rank 0
    with distributed.main_first():  # a download happens once, the other ranks then read its files
        data = build_dataset(cfg.dataset)
    if cfg.backbone.name != "exact":
        from cfgx.backbones import build_backbone, check_label_dependence
        from cfgx.diffusion.schedule import NoiseSchedule

        check_label_dependence(build_backbone(cfg.backbone, data, NoiseSchedule.from_config(cfg.diffusion)),
                               data.shape, device)
    h = config_hash(cfg)
    overrides = overrides if overrides is not None else _job_overrides()

    # Rank 0 alone finds the run to resume, or creates one, and locks it; every rank then trains that
    # one (or fails alike). What the sweep will need is checked before a run dir is made, on every
    # rank, because building the evaluation side is collective under torchrun.
    from cfgx.cli.preflight import check_before_training

    found = _on_main(lambda: _find_run_dir(cfg, data, h))
    check_before_training(cfg, data, device, None if found is None else Path(found), console)
    held: list = []

    def create_and_lock() -> str:
        run_dir = Path(found) if found is not None else _new_run_dir(cfg, data, h, overrides, device, console)
        held.append(run_lock(run_dir))  # a second identical 'cfgx train' finds this run and must not train it too
        return str(run_dir)

    run_dir = Path(_on_main(create_and_lock))
    lock = held[0] if held else None
    try:
        result = train(cfg, data, run_dir, device, on_step=on_step, console=console)
        if distributed.is_main():
            meta = read_meta(run_dir)
            meta.update({"train_finished": True, "checkpoint_step": result.step,
                         "train_img_per_s": round(result.img_per_s, 1),
                         "train_seconds_last_call": round(result.seconds, 2),
                         "train_processes": distributed.world_size()})
            atomic_write_json(run_dir / "meta.json", meta)
    finally:
        if lock is not None:
            lock.release()
    run_sweep(cfg, run_dir, data, result.model, result.step, device, console)
    return run_dir


def _on_main(fn):
    """``fn()`` on rank 0 (the only process under plain cfgx), its result or its error on every rank."""
    from cfgx import distributed

    out: object = None
    if distributed.is_main():
        try:
            out = fn()
        except CfgxError as e:
            out = e
    out = distributed.broadcast_object(out)
    if isinstance(out, CfgxError):
        raise distributed.agreed_error(str(out)) if distributed.active() else out
    return out


def _find_run_dir(cfg: DictConfig, data, h: str) -> str | None:
    """The run to continue: run=PATH, or the unfinished run of this config; None for a new run."""
    from cfgx.store.rundir import find_resumable, read_meta, resolve_run

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
    from cfgx.store.rundir import new_run_dir, provenance

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


# ---------------------------------------------------------------- sweep

def _override_key(o: str) -> str:
    """The config path an override sets: '+eval.seed=3' -> 'eval.seed'."""
    return o.lstrip("+~").split("=", 1)[0]


def _touches(overrides: list[str], key: str) -> bool:
    """Whether any override sets ``key`` or something under it."""
    return any(_override_key(o).split(".")[0] == key for o in overrides)


def _selects(overrides: list[str], group: str) -> bool:
    """Whether any override picks an option of ``group`` (``group=name``, not ``group.key=value``)."""
    return any(_override_key(o) == group for o in overrides)


def sweep_config(args: list[str]) -> tuple[DictConfig, Path]:
    """The run's saved config with the user's evaluation overrides on top, and the run dir."""
    from cfgx.store.rundir import load_run_config, resolve_run

    overrides = normalize_overrides(args)
    run_arg = None
    rest = []
    for o in overrides:
        if o.startswith("run="):
            run_arg = o.split("=", 1)[1] or None
        else:
            rest.append(o)
    for o in rest:
        if _override_key(o).split(".")[0] in TRAINING_KEYS:
            raise CfgxError(f"'{o}' changes training, but sweep evaluates an existing run; train a new run "
                            f"with 'cfgx train {o}' instead")
    fresh = compose(rest)
    run_dir = resolve_run(run_arg, Path(str(fresh.paths.runs)))
    saved = OmegaConf.create(load_run_config(run_dir))
    for key in EVAL_KEYS:
        if key not in saved or _selects(rest, key):
            saved[key] = fresh[key]  # a new group choice replaces the run's whole block
    for o in rest:  # dotted overrides land on top of the run's own settings
        path = _override_key(o)
        if "." in path and path.split(".")[0] in EVAL_KEYS:
            OmegaConf.update(saved, path, OmegaConf.select(fresh, path), merge=False, force_add=True)
    saved.run = str(run_dir)
    validate(saved)
    return saved, run_dir


def cmd_sweep(args: list[str]) -> int:
    from cfgx import distributed
    from cfgx.data import build_dataset
    from cfgx.diffusion.schedule import NoiseSchedule
    from cfgx.store.checkpoints import load_snapshot_model, parse_checkpoints
    from cfgx.sweep.loop import run_sweep
    from cfgx.train import load_ema_model

    ckpt_args = [a for a in args if a.startswith("checkpoint=")]
    rest = [a for a in args if not a.startswith("checkpoint=")]
    cfg, run_dir = sweep_config(rest)
    nproc = int(OmegaConf.select(cfg, "launcher.nproc", default=1))
    if nproc > 1 and _launched_world() == 1:
        return distributed.relaunch(nproc, ["sweep", *args])
    device = distributed.setup_from_config(cfg)
    console = _console() if distributed.is_main() else None
    if cfg.postprocess.name != "none" and console is not None:
        from cfgx.postprocess.flow import ignored_settings

        typed = {_override_key(o).split(".", 1)[1]: OmegaConf.select(cfg, _override_key(o))
                 for o in normalize_overrides(rest) if _override_key(o).startswith("postprocess.")}
        for line in ignored_settings(run_dir, typed):
            console.print(line, markup=False)
    with distributed.main_first():
        data = build_dataset(cfg.dataset)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    from cfgx.cli.preflight import training_note

    # checkpoint=all|last|STEP[,STEP...]: last.pt and/or EMA snapshots (train.snapshot_every)
    for snap in parse_checkpoints(ckpt_args[-1].split("=", 1)[1] if ckpt_args else "last", run_dir):
        if snap is None:
            model, step = load_ema_model(run_dir, cfg, data, schedule, device)
            note = training_note(run_dir, step)
            if note and console is not None:
                console.print(note, markup=False)
        else:
            model, step = load_snapshot_model(run_dir, cfg, data, schedule, device, snap), snap
        say(console, f"sweeping {run_dir} (checkpoint step {step}) at s = "
                      f"{', '.join('%g' % s for s in cfg.guidance.scales)}")
        run_sweep(cfg, run_dir, data, model, step, device, console)
    return 0


# ---------------------------------------------------------------- report

def cmd_report(args: list[str]) -> int:
    from cfgx.report.frontier import MATCH_ACCURACY, write_frontier
    from cfgx.report.tables import console_table, plot_cond_drop_heatmap, plot_run, write_tables
    from cfgx.store.rundir import is_run_dir, load_run_config, resolve_run
    from cfgx.sweep.loop import load_rows

    out = None
    runs = []
    match = MATCH_ACCURACY
    for a in args:
        if a.startswith("out="):
            out = Path(a.split("=", 1)[1])
        elif a.startswith("report.match_accuracy="):
            match = _fraction(a)
        elif "=" in a:
            raise CfgxError(f"cfgx report takes run dirs and out=DIR, not {a!r}; e.g. cfgx report runs/digits/*")
        elif not is_run_dir(Path(a).expanduser()):
            raise CfgxError(f"{a} is not a cfgx run dir (no config.yaml/meta.json there); pass folders made by "
                            "'cfgx train', e.g. cfgx report runs/digits/*")
        else:
            runs.append(resolve_run(a, Path("runs")))
    if not runs:
        raise CfgxError("cfgx report needs at least one run dir; e.g. cfgx report runs/digits/*")
    rows = []
    for r in runs:
        cfg = load_run_config(r)
        rs = load_rows(r, _console())
        if not rs:
            raise CfgxError(f"{r} has no sweep rows yet; run 'cfgx sweep run={r}' first")
        for row in rs:
            row = {"run": str(r), "run_label": f"{r.name} cd={cfg['cond_drop']['p']:g}",
                   "cond_drop": cfg["cond_drop"]["p"], "dataset": cfg["dataset"]["name"], **row}
            rows.append(row)
    out = out or (runs[0].parent / f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_run_dir(out):
        raise CfgxError(f"out={out} is a run dir; pick a new folder for the merged report")
    out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, out, stem="report")
    paths = plot_run(rows, out)
    heat = plot_cond_drop_heatmap(rows, out / "plot_cond_drop_heatmap.png")
    front = write_frontier(rows, out, match)
    console = _console()
    console.print(console_table(rows, title=f"{len(runs)} run(s), {len(rows)} rows"))
    console.print(f"wrote {out}/report.csv, report.json, report.md{', frontier.md' if front else ''} and "
                  f"{len(paths) + bool(heat) + max(len(front) - 1, 0)} plots")
    return 0


def _fraction(arg: str) -> float:
    key, _, v = arg.partition("=")
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not 0 < x <= 1:
        raise CfgxError(f"{key}={v!r} must be a fraction in (0, 1]; e.g. {key}=0.99")
    return x


# ---------------------------------------------------------------- prepare

def cmd_prepare(args: list[str]) -> int:
    """Fetch a dataset and the Inception weights while a network is available."""
    from cfgx.data import build_dataset
    from cfgx.metrics.inception import INCEPTION_WEIGHTS_URL, default_weights_path

    cfg = compose(normalize_overrides(args) + ["dataset.download=true"])
    console = _console()
    data = build_dataset(cfg.dataset)
    console.print(f"dataset {data.name}: {len(data.train)} training images ready")
    weights = Path(str(cfg.eval.inception_weights)) if cfg.eval.get("inception_weights") else default_weights_path()
    if weights.is_file():
        console.print(f"Inception weights present: {weights}")
    else:
        import torch

        weights.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(weights), progress=True)
        except Exception as e:
            raise CfgxError(f"could not download the Inception weights ({type(e).__name__}); fetch "
                            f"{INCEPTION_WEIGHTS_URL} on a machine with internet and put it at {weights}") from None
        console.print(f"Inception weights saved to {weights}")
    return 0


# ---------------------------------------------------------------- toy

def cmd_toy(args: list[str]) -> int:
    """Zhao & Schwing's 1D/2D analysis on analytic mixtures, into a new folder under runs/."""
    from cfgx.store.rundir import atomic_write_json, atomic_write_text, new_run_dir, provenance
    from cfgx.toy.analysis import run_toy

    overrides = normalize_overrides(args)
    if not _touches(overrides, "dataset"):
        overrides = ["dataset=gmm1d", *overrides]
    cfg = compose(overrides)
    if cfg.dataset.name not in ("gmm1d", "gmm2d"):
        raise CfgxError(f"cfgx toy runs on the analytic mixtures; dataset={cfg.dataset.name} is not one: use "
                        "dataset=gmm1d or dataset=gmm2d")
    scales = [float(s) for s in cfg.guidance.scales] if _touches(overrides, "guidance") else [1.0, 2.0, 4.0, 8.0]
    steps = int(cfg.sampler.steps) if _touches(overrides, "sampler") else 100
    out = new_run_dir(Path(str(cfg.paths.runs)), cfg.dataset.name, "toy")
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    import torch

    atomic_write_json(out / "toy_meta.json", {"scales": scales, "sampler": cfg.sampler.name, "steps": steps,
                                              "seed": int(cfg.seed), **provenance(torch.device("cpu"))})
    console = _console()
    t0 = time.perf_counter()
    run_toy(cfg.dataset.name, out, scales=scales, sampler=str(cfg.sampler.name), steps=steps, seed=int(cfg.seed),
            console=console)
    console.print(f"toy analysis written to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


# ---------------------------------------------------------------- guidance classifier, postprocessor

def _load_run(args: list[str], extra: list[str] | None = None):
    from cfgx.data import build_dataset
    from cfgx.diffusion.schedule import NoiseSchedule
    from cfgx.store.rundir import pick_device

    cfg, run_dir = sweep_config(args + (extra or []))
    device = pick_device(str(cfg.device))
    data = build_dataset(cfg.dataset)
    return cfg, run_dir, device, data, NoiseSchedule.from_config(cfg.diffusion)


def cmd_train_classifier(args: list[str]) -> int:
    from cfgx.backbones.noisy_classifier import get_guidance_classifier
    from cfgx.sweep.loop import guidance_classifier_options

    cfg, run_dir, device, data, schedule = _load_run(args)
    console = _console()
    _, info = get_guidance_classifier(run_dir, data, schedule, device, guidance_classifier_options(cfg), console)
    console.print(f"guidance classifier for {run_dir}: noisy held-out accuracy by t "
                  f"{json.dumps(info.get('val_accuracy'))} ({'cached' if info.get('cached') else 'trained'})")
    return 0


def cmd_postprocess(args: list[str]) -> int:
    from cfgx.diffusion.samplers import build_sampler
    from cfgx.postprocess import train_postprocessor
    from cfgx.train import load_ema_model

    extra = [] if _selects(normalize_overrides(args), "postprocess") else ["postprocess=flow"]
    cfg, run_dir, device, data, schedule = _load_run(args, extra)
    if cfg.postprocess.name == "none":
        raise CfgxError("postprocess=none trains nothing; use postprocess=flow (the default of this command)")
    console = _console()
    model, step = load_ema_model(run_dir, cfg, data, schedule, device)
    sampler = build_sampler(cfg.sampler.name, schedule, int(cfg.sampler.steps), float(cfg.sampler.eta),
                            clip_x0=data.clip)
    post = OmegaConf.to_container(cfg.postprocess, resolve=True)
    feature_fn = None
    if post.get("nn_space") in ("classifier", "inception"):
        from cfgx.metrics.suite import EvalSuite

        suite = EvalSuite(cfg, data, device, console)
        space = post["nn_space"]
        if space == "inception" and suite.inception is None:
            raise CfgxError("postprocess.nn_space=inception needs Inception features; add "
                            "eval.features=[classifier,inception]")
        feature_fn = lambda x: suite.features_in(space, x)  # noqa: E731
    info = train_postprocessor(post, run_dir, data, model, schedule, sampler, device, console, feature_fn)
    console.print(f"postprocessor for {run_dir} (checkpoint step {step}) ready: "
                  f"{info.get('train_seconds', 0):.0f}s training; evaluate with "
                  f"'cfgx sweep postprocess=flow run={run_dir}'")
    return 0


# ---------------------------------------------------------------- entry

COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "report": cmd_report, "prepare": cmd_prepare, "toy": cmd_toy,
            "train-classifier": cmd_train_classifier, "postprocess": cmd_postprocess}


def _report(e: CfgxError) -> None:
    """Print the one-line error; under torchrun, once.

    Most errors happen alike on every rank. Rank 0 reports at once; the others wait
    briefly, and torchrun stops them when rank 0 exits, so the line appears once. An
    error only one rank saw (its GPU, its files) still gets printed after the wait.
    """
    from cfgx.distributed import rank

    r = rank()
    if r and getattr(e, "rank0_only", False):
        return
    if r:
        time.sleep(3)
    print(f"cfgx: error: {f'[rank {r}] ' if r else ''}{e}", file=sys.stderr, flush=True)


def _user_error(e: BaseException) -> CfgxError:
    """``e`` as the one line a user sees; errors that are not the user's (bugs) are re-raised."""
    from cfgx.errors import DISK_ERRNOS, disk_error

    if isinstance(e, CfgxError):
        return e
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return disk_error(None, e, verb="access")
    raise e


def _fail(e: CfgxError) -> None:
    _report(e)
    sys.exit(e.exit_code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import cfgx

        print(f"cfgx {cfgx.__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"cfgx: error: unknown command {cmd!r}; valid: {', '.join(COMMANDS)} (see cfgx --help)",
              file=sys.stderr)
        return 2
    if cmd != "train" and any(a in ("-h", "--help") for a in rest):
        print(usage())
        return 0
    from cfgx.distributed import shutdown

    if cmd not in ("train", "sweep") and _launched_world() > 1:
        print(f"cfgx: error: cfgx {cmd} runs as one process; start it without torchrun (only train and sweep "
              "use several)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest) or 0
    except (CfgxError, OSError) as e:
        err = _user_error(e)
        _report(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("cfgx: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
