"""Turning sweep rows into tables: metrics.csv / .json / .md and the console table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from cfgx.runs import atomic_savefig, atomic_write_json, atomic_write_text

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


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (str(r.get("run", "")), str(r.get("method", "")),
                                       str(r.get("postprocess", "")), str(r.get("sampler", "")),
                                       int(r.get("steps", 0)), float(r["s"])))


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
    atomic_write_text(Path(out_dir) / f"{stem}.md", markdown_table(rows, cols))


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
    for r in sort_rows(rows):
        parts = [str(r.get("run_label", "")), str(r.get("method", "cfg")),
                 "" if r.get("postprocess", "none") == "none" else f"+{r['postprocess']}",
                 f"{r.get('sampler')}{r.get('steps')}", f"n={r.get('num_samples')}"]
        groups.setdefault(" ".join(p for p in parts if p), []).append(r)
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
    paths = []
    groups = _series(rows)
    xk, yk, xl, yl = _quality_keys(rows)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, rs in groups.items():
        pts = [(r.get(xk), r.get(yk), r["s"]) for r in rs if r.get(xk) is not None and r.get(yk) is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for x, y, s in pts:
            ax.annotate(f"s={s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(f"{yl.split(' (')[0]} vs {xl}: the guidance trade-off")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_tradeoff.png")
    atomic_savefig(fig, paths[-1], dpi=110)
    plt.close(fig)

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
        fig.suptitle(title)
        fig.tight_layout()
        paths.append(out_dir / f"{prefix}_{fname}.png")
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
