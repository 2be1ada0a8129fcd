"""``cfgx export [run=PATH] [out=DIR]``: a run's EMA weights as safetensors plus model.json (cfgx.store.export)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from cfgx.cli.common import console as make_console
from cfgx.cli.preflight import training_note
from cfgx.config import compose
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.store.export import INFO, WEIGHTS, export_run, safetensors_torch
from cfgx.store.rundir import default_run_line, load_run_config, read_meta, resolve_run

OPTIONS = ("run", "out", "paths.runs")


def _parse(args: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or key not in OPTIONS:
            raise CfgxError(f"cfgx export takes {', '.join(k + '=...' for k in OPTIONS)}; got {a!r} "
                            "(e.g. cfgx export run=runs/digits/<timestamp> out=exported/)")
        opts[key] = value
    return opts


def cmd_export(args: list[str]) -> int:
    opts = _parse(args)
    safetensors_torch()  # a missing package is one line before any work
    runs_root = opts.get("paths.runs") or str(compose([]).paths.runs)
    run_dir = resolve_run(opts.get("run") or None, Path(runs_root))
    console = make_console()
    if not opts.get("run"):
        console.print(default_run_line("exporting", run_dir), markup=False, soft_wrap=True)
    cfg = OmegaConf.create(load_run_config(run_dir))
    meta = read_meta(run_dir)
    out = Path(opts["out"]).expanduser() if opts.get("out") else run_dir / "export"
    data = build_dataset(cfg.dataset)
    info = export_run(run_dir, cfg, data, meta, out)
    note = training_note(run_dir, info["source"]["checkpoint_step"])
    if note:
        console.print(note, markup=False)
    console.print(f"exported {run_dir} (EMA, checkpoint step {info['source']['checkpoint_step']}) to {out}: "
                  f"{WEIGHTS} ({info['parameters']:,} parameters, sha256 {info['sha256'][:12]}) and {INFO}; "
                  f"load it with cfgx.store.export.load_exported('{out}') or safetensors.torch.load_file",
                  markup=False)
    return 0
