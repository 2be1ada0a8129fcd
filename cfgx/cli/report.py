"""``cfgx report``: merge several runs' rows into one table, plots and frontier.md."""

from __future__ import annotations

import time
from pathlib import Path

from cfgx.cli.common import console as make_console
from cfgx.errors import CfgxError
from cfgx.report.frontier import MATCH_ACCURACY, write_frontier
from cfgx.report.plots import plot_cond_drop_heatmap, plot_run
from cfgx.report.tables import console_table, write_tables
from cfgx.store.rundir import is_run_dir, load_run_config, resolve_run
from cfgx.sweep.rows import load_rows


def cmd_report(args: list[str]) -> int:
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
        rs = load_rows(r, make_console())
        if not rs:
            raise CfgxError(f"{r} has no sweep rows yet; run 'cfgx sweep run={r}' first")
        for row in rs:
            row = {"run": str(r), "run_label": f"{r.name} cd={cfg['cond_drop']['p']:g}",
                   "cond_drop": cfg["cond_drop"]["p"], "dataset": cfg["dataset"]["name"], **row}
            rows.append(row)
    out = out or (runs[0].parent / f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, out, stem="report")
    paths = plot_run(rows, out)
    heat = plot_cond_drop_heatmap(rows, out / "plot_cond_drop_heatmap.png")
    front = write_frontier(rows, out, match)
    console = make_console()
    console.print(console_table(rows, title=f"{len(runs)} run(s), {len(rows)} rows"))
    console.print(f"wrote {out}/report.csv, report.json, report.md{', frontier.md' if front else ''} and "
                  f"{len(paths) + bool(heat) + max(len(front) - 1, 0)} plots")
    return 0


def _check_out(out: Path) -> None:
    """The report folder: a folder (or none yet) outside every run dir, so no run's files are overwritten."""
    if is_run_dir(out):
        raise CfgxError(f"out={out} is a run dir; pick a new folder for the merged report")
    if out.exists() and not out.is_dir():
        raise CfgxError(f"out={out} is a file, not a folder; pick a new folder for the merged report")
    for parent in out.resolve().parents:
        if is_run_dir(parent):
            raise CfgxError(f"out={out} lies inside the run dir {parent} (its rows, tables and plots would mix "
                            "with the report's); pick a folder outside it")


def _fraction(arg: str) -> float:
    key, _, v = arg.partition("=")
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not 0 < x <= 1:
        raise CfgxError(f"{key}={v!r} must be a fraction in (0, 1]; e.g. {key}=0.99")
    return x
