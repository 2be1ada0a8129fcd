"""The run's figures: trade-off curves, metrics vs s and vs training step, the cond_drop x s heat-map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfgx.report.plotting import curve_figure, dominated, pyplot, wrap_title
from cfgx.report.tables import sort_rows
from cfgx.store.atomic import atomic_savefig


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
    plt = pyplot()

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
    plt = pyplot()

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
    plt = pyplot()

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
