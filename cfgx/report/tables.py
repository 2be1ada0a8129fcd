"""Turning sweep rows into tables: metrics.csv / .json hold every column (full provenance);
metrics.md and the console only the columns a reader compares. Figures are in plots.py."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from cfgx.store.atomic import atomic_write_json, atomic_write_text

# Key columns for the console (fits 80 columns); the files hold every column.
CONSOLE_COLUMNS = [("s", "s"), ("w_ho", "w"), ("accuracy", "acc"), ("fd_classifier", "FD(clf)"),
                   ("fid", "FID"), ("is_mean", "IS"), ("precision", "prec"), ("recall", "rec"),
                   ("diversity_within_class", "div"), ("margin", "margin"), ("samples_per_s", "smp/s")]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def columns_of(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


# metrics.md: what a reader compares. Columns that never vary (sampler, samples, ...) are left
# out there unless they differ between rows; the CSV/JSON keep all of them.
MD_COLUMNS = ["run_label", "method", "postprocess", "checkpoint_step", "sampler", "steps", "num_samples", "protocol",
              "extractor_classifier", "searched", "s",
              "w_ho", "nfe", "accuracy", "fd_classifier", "fid", "is_mean", "kid_mean", "precision", "recall",
              "density", "coverage", "vendi", "diversity_within_class", "margin", "near_boundary"]
MD_IF_VARIED = {"run_label", "method", "postprocess", "checkpoint_step", "sampler", "steps", "num_samples",
                "protocol", "extractor_classifier", "searched"}


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (str(r.get("run", "")), str(r.get("method", "")),
                                       str(r.get("postprocess", "")), str(r.get("sampler", "")),
                                       int(r.get("steps", 0)), int(r.get("checkpoint_step") or 0), float(r["s"])))


def reader_columns(rows: list[dict]) -> list[str]:
    """The columns of metrics.md: the compared metrics present, and the settings that vary."""
    out = []
    for c in MD_COLUMNS:
        vals = {json_key(r.get(c)) for r in rows}
        if vals == {json_key(None)}:
            continue
        if c in MD_IF_VARIED and len(vals) < 2:
            continue
        out.append(c)
    return out


def json_key(v: Any) -> str:
    return repr(v)


def write_tables(rows: list[dict], out_dir: Path, stem: str = "metrics") -> None:
    rows = sort_rows(rows)
    cols = columns_of(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(Path(out_dir) / f"{stem}.csv", buf.getvalue())
    atomic_write_json(Path(out_dir) / f"{stem}.json", rows)
    atomic_write_text(Path(out_dir) / f"{stem}.md", markdown_table(rows, reader_columns(rows)) +
                      f"\nKey columns only; {stem}.csv and {stem}.json hold all {len(cols)} (provenance included).\n"
                      + "".join(f"\nNote: {n}.\n" for n in notes(rows)))


def notes(rows: list[dict]) -> list[str]:
    """Why columns are empty (e.g. no evaluation classifier), once each."""
    return sorted({str(r["classifier_note"]) for r in rows if r.get("classifier_note")})


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def console_table(rows: list[dict], title: str = ""):
    rows = sort_rows(rows)
    present = [(k, h) for k, h in CONSOLE_COLUMNS if any(r.get(k) is not None for r in rows)]
    extra = [k for k in ("method", "postprocess") if len({r.get(k) for r in rows}) > 1]
    table = Table(title=title or None, title_justify="left", pad_edge=False, padding=(0, 1),
                  caption="\n".join(notes(rows)) or None, caption_justify="left")
    for k in extra:
        table.add_column(k)
    for _, h in present:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k)) for k in extra], *[_fmt(r.get(k)) for k, _ in present])
    return table


# ---------------------------------------------------------------- plots
