"""Turning sweep rows into tables and figures.

metrics.csv / .json hold every column (full provenance); metrics.md and the console only the
columns a reader compares. Figures: the guidance trade-off, metrics vs s, metrics vs training
step (checkpoint sweeps) and, per guidance rule, fidelity-diversity frontiers with frontier.md.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from cfgx.report.plotting import curve_figure, dominated, wrap_title
from cfgx.store.atomic import atomic_savefig, atomic_write_json, atomic_write_text

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
MD_COLUMNS = ["run_label", "method", "postprocess", "checkpoint_step", "sampler", "steps", "num_samples", "s",
              "w_ho", "nfe", "accuracy", "fd_classifier", "fid", "is_mean", "kid_mean", "precision", "recall",
              "density", "coverage", "vendi", "diversity_within_class", "margin", "near_boundary"]
MD_IF_VARIED = {"run_label", "method", "postprocess", "checkpoint_step", "sampler", "steps", "num_samples"}


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
                      f"\nKey columns only; {stem}.csv and {stem}.json hold all {len(cols)} (provenance included).\n")


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def console_table(rows: list[dict], title: str = ""):
    from rich.table import Table

    rows = sort_rows(rows)
    present = [(k, h) for k, h in CONSOLE_COLUMNS if any(r.get(k) is not None for r in rows)]
    extra = [k for k in ("method", "postprocess") if len({r.get(k) for r in rows}) > 1]
    table = Table(title=title or None, title_justify="left", pad_edge=False, padding=(0, 1))
    for k in extra:
        table.add_column(k)
    for _, h in present:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k)) for k in extra], *[_fmt(r.get(k)) for k, _ in present])
    return table


# ---------------------------------------------------------------- plots

def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped into curves: one per (run, method, postprocess, sampler, steps, samples)."""
    groups: dict[str, list[dict]] = {}
    parts_of = [[str(r.get("run_label", "")), str(r.get("method", "cfg")),
                 "" if r.get("postprocess", "none") == "none" else f"+{r['postprocess']}",
                 f"{r.get('sampler')}{r.get('steps')}", f"n={r.get('num_samples')}"] for r in rows]
    # Name curves by what differs between them (legends stay short with many rules).
    varies = [len({p[i] for p in parts_of}) > 1 for i in range(5)]
    if not any(varies):
        varies[1] = True
    for r in sort_rows(rows):
        parts = [str(r.get("run_label", "")), str(r.get("method", "cfg")),
                 "" if r.get("postprocess", "none") == "none" else f"+{r['postprocess']}",
                 f"{r.get('sampler')}{r.get('steps')}", f"n={r.get('num_samples')}"]
        groups.setdefault(" ".join(p for p, v in zip(parts, varies) if p and v), []).append(r)
    return groups


def _quality_keys(rows: list[dict]) -> tuple[str, str, str, str]:
    """(x, y) of the trade-off plot: FID vs IS when IS exists, else FD(classifier) vs accuracy."""
    if any(r.get("is_mean") is not None for r in rows) and any(r.get("fid") is not None for r in rows):
        return "is_mean", "fid", "Inception Score", "FID"
    if any(r.get("fid") is not None for r in rows):
        return "accuracy", "fid", "sample class accuracy", "FID"
    return "accuracy", "fd_classifier", "sample class accuracy", "Fréchet distance (eval-classifier features)"


def plot_run(rows: list[dict], out_dir: Path, prefix: str = "plot") -> list[Path]:
    """Trade-off curve, precision/recall vs s and diversity vs s, as PNGs in ``out_dir``."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = plot_checkpoints(rows, out_dir, prefix)
    rows = latest_checkpoint_rows(rows)
    groups = _series(rows)
    xk, yk, xl, yl = _quality_keys(rows)

    series = {name: [(r[xk], r[yk], f"s={r['s']:g}") for r in rs if r.get(xk) is not None and r.get(yk) is not None]
              for name, rs in groups.items()}
    series = {k: v for k, v in series.items() if v}
    title = f"{yl.split(' (')[0]} vs {xl}: the guidance trade-off"
    if sum(len(v) for v in series.values()) > 30:
        # Dozens of s labels on one spot help no one: label the first curve, the frontier figures the rest.
        first = next(iter(series))
        series = {k: v if k == first else [(x, y, "") for x, y, _ in v] for k, v in series.items()}
        title += f" (s labels on {first}; per-rule labels in frontier_*.png)"
    if series:
        paths.append(out_dir / f"{prefix}_tradeoff.png")
        curve_figure(series, xl, yl, title, paths[-1], dpi=110)

    for fname, keys, title in [("precision_recall", ("precision", "recall", "density", "coverage"),
                                "Precision / recall / density / coverage vs s"),
                               ("diversity", ("vendi", "diversity_within_class", "diversity_within_class_inception"),
                                "Diversity vs s"),
                               ("boundary", ("accuracy", "confidence", "margin", "near_boundary"),
                                "Decision-boundary statistics vs s (eval classifier)")]:
        present = [k for k in keys if any(r.get(k) is not None for r in rows)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.4), squeeze=False)
        for ax, k in zip(axes[0], present):
            for name, rs in groups.items():
                pts = [(r["s"], r[k]) for r in rs if r.get(k) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            ax.set_xlabel("guidance scale s (w = s - 1)")
            ax.set_title(k)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(wrap_title(title, 28 * len(present)))
        fig.tight_layout()
        paths.append(out_dir / f"{prefix}_{fname}.png")
        atomic_savefig(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def latest_checkpoint_rows(rows: list[dict]) -> list[dict]:
    """Each run's rows at its newest checkpoint (older snapshots have their own per-step figure)."""
    newest: dict[str, int] = {}
    for r in rows:
        k = str(r.get("run", ""))
        newest[k] = max(newest.get(k, -1), int(r.get("checkpoint_step") or 0))
    return [r for r in rows if int(r.get("checkpoint_step") or 0) == newest[str(r.get("run", ""))]]


CHECKPOINT_METRICS = [("fd_classifier", "FD (eval-classifier features)"), ("fid", "FID"), ("accuracy", "accuracy"),
                      ("precision", "precision"), ("recall", "recall"), ("coverage", "coverage")]


def plot_checkpoints(rows: list[dict], out_dir: Path, prefix: str = "plot") -> list[Path]:
    """Each metric against training step, one line per s, per rule with several checkpoints swept:
    does the best s drift as training goes on? (``cfgx sweep checkpoint=all`` with snapshots.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    series: dict[str, list[dict]] = {}
    several_runs = len({r.get("run_label") for r in rows}) > 1
    for r in rows:
        if r.get("postprocess", "none") == "none" and r.get("checkpoint_step") is not None:
            key = " ".join(p for p in (str(r.get("run_label", "")) if several_runs else "",
                                       str(r.get("method", "cfg"))) if p)
            series.setdefault(key, []).append(r)
    for name, rs in series.items():
        steps = sorted({int(r["checkpoint_step"]) for r in rs})
        if len(steps) < 2:
            continue
        ns = max({r.get("num_samples") for r in rs}, key=lambda n: sum(r.get("num_samples") == n for r in rs))
        rs = [r for r in rs if r.get("num_samples") == ns]  # one sample budget per figure
        present = [(k, lab) for k, lab in CHECKPOINT_METRICS if any(r.get(k) is not None for r in rs)]
        scales = sorted({r["s"] for r in rs})
        fig, axes = plt.subplots(1, len(present), figsize=(3.3 * len(present), 3.4), squeeze=False)
        cmap = plt.get_cmap("viridis")
        for ax, (k, lab) in zip(axes[0], present):
            for i, sc in enumerate(scales):
                pts = sorted((int(r["checkpoint_step"]), r[k]) for r in rs if r["s"] == sc and r.get(k) is not None)
                if len(pts) > 1 or (pts and len(steps) == 1):
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3,
                            color=cmap(i / max(len(scales) - 1, 1)), label=f"s={sc:g}")
            if k in ("fd_classifier", "fid") and dominated([r[k] for r in rs if r.get(k) is not None]):
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title(lab, fontsize=9)
            ax.grid(alpha=0.25)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(wrap_title(f"{name}: metrics vs training step, one line per s ({ns} samples)",
                                30 * len(present)), fontsize=10)
        fig.tight_layout()
        safe = name.replace(" ", "_").replace("@", "_").replace("=", "")
        stem = f"{prefix}_checkpoints" + ("" if name == "cfg" else f"_{safe}")
        paths.append(Path(out_dir) / f"{stem}.png")
        atomic_savefig(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_cond_drop_heatmap(rows: list[dict], out_path: Path) -> Path | None:
    """cond_drop x s heat-map of FID (or FD in classifier features when FID is absent)."""
    key = "fid" if any(r.get("fid") is not None for r in rows) else "fd_classifier"
    cells = {(r.get("cond_drop"), r["s"]): r.get(key) for r in rows
             if r.get("cond_drop") is not None and r.get(key) is not None and r.get("postprocess", "none") == "none"}
    drops = sorted({d for d, _ in cells})
    scales = sorted({s for _, s in cells})
    if len(drops) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(drops), len(scales)), np.nan)
    for (d, s), v in cells.items():
        grid[drops.index(d), scales.index(s)] = v
    fig, ax = plt.subplots(figsize=(1.1 * len(scales) + 2, 0.7 * len(drops) + 1.8))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
    ax.set_yticks(range(len(drops)), [f"{d:g}" for d in drops])
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel("cond_drop")
    for i in range(len(drops)):
        for j in range(len(scales)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label=key)
    ax.set_title(f"{key} by cond_drop and s (lower is better)")
    fig.tight_layout()
    atomic_savefig(fig, out_path, dpi=110)
    plt.close(fig)
    return out_path
