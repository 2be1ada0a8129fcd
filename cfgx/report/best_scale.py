"""The best guidance scale per Fréchet-distance metric, with a 95% interval from seed blocks.

Per rule and protocol, for each FD-type column present (FID, FD_DINOv2, sFID, FD in the evaluation
classifier's features): the swept s with the lowest mean, refined by the vertex of the parabola through
it and its two neighbours (the grid's resolution is otherwise the answer's). With ``eval.seed_blocks=K``
(K >= 2) each block's curve is minimised the same way and the interval is a Student-t interval over
the K block minima; with one block there is no interval (say so rather than guess one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from cfgx.report.columns import BLOCKS_SUFFIX, is_fd_metric
from cfgx.sweep.rows import mean_ci

# Known FD-type columns and their names for a reader; any other fd_* column is taken too (lower is better).
FD_LABELS = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "sfid": "sFID", "fd_classifier": "FD(clf)"}


def fd_metrics(rows: list[dict]) -> list[str]:
    """The FD-type columns with a value in some row: known ones first, in FD_LABELS order."""
    present = {k for r in rows for k, v in r.items() if is_fd_metric(k) and isinstance(v, (int, float))}
    return [k for k in FD_LABELS if k in present] + sorted(present - set(FD_LABELS))


def metric_label(key: str) -> str:
    return FD_LABELS.get(key, key)


def refined_min(points: list[tuple[float, float]]) -> tuple[float, bool]:
    """(s at the minimum, whether it is inside the range): the lowest point, moved to the vertex of the
    parabola through it and its neighbours when that parabola is convex. ``points`` sorted by s."""
    i = min(range(len(points)), key=lambda j: points[j][1])
    if i == 0 or i == len(points) - 1:
        return points[i][0], False
    (x0, y0), (x1, y1), (x2, y2) = points[i - 1:i + 2]
    # Vertex of the interpolating parabola (non-uniform spacing): x1 - num / (2 den).
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return x1, True
    return min(max(x1 - 0.5 * num / den, x0), x2), True


@dataclass(frozen=True)
class BestScale:
    """One rule's best s for one metric under one protocol."""

    method: str
    metric: str
    s: float                   # refined minimum of the mean curve
    value: float               # the metric at the best swept s
    grid_s: float              # the best swept (or searched) s
    inside: bool               # False: the minimum is at an end of the range swept
    ci: tuple[float, float] | None   # 95% interval over seed blocks' minima
    blocks: int
    points: int


def best_scale(method: str, rows: list[dict], metric: str) -> BestScale | None:
    """The best s of ``metric`` over one rule's rows (one protocol); None when no row has it."""
    pts = sorted((float(r["s"]), float(r[metric])) for r in rows if isinstance(r.get(metric), (int, float)))
    pts = [p for k, p in enumerate(pts) if k == 0 or p[0] != pts[k - 1][0]]  # one value per s
    if not pts:
        return None
    s, inside = refined_min(pts)
    grid = min(pts, key=lambda p: p[1])
    by_s = {float(r["s"]): r.get(metric + BLOCKS_SUFFIX) for r in rows}
    per_block = [by_s.get(x) for x, _ in pts]
    ok = all(isinstance(b, list) and all(isinstance(v, (int, float)) for v in b) for b in per_block)
    k = len(per_block[0]) if ok else 1
    ci = None
    if k >= 2 and len(pts) >= 2 and all(len(b) == k for b in per_block):
        minima = [refined_min([(x, float(b[j])) for (x, _), b in zip(pts, per_block)])[0] for j in range(k)]
        m, hw = mean_ci(minima)
        ci = (m - hw, m + hw) if m is not None and hw is not None else None
    return BestScale(method, metric, s, grid[1], grid[0], inside, ci, k, len(pts))


def best_scales(rows: list[dict]) -> list[BestScale]:
    """Every rule's best s for every FD metric present, in rows of ONE protocol (postprocessed rows aside)."""
    per_rule: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("postprocess", "none") == "none":
            per_rule.setdefault(str(r.get("method", "cfg")), []).append(r)
    out = []
    for metric in fd_metrics(rows):
        for method, rs in per_rule.items():
            b = best_scale(method, rs, metric)
            if b is not None:
                out.append(b)
    return out


def _interval(b: BestScale) -> str:
    if b.ci is not None:
        return f"[{b.ci[0]:.2f}, {b.ci[1]:.2f}] ({b.blocks} blocks)"
    return "needs eval.seed_blocks>=2"


def _where(b: BestScale) -> str:
    return f"{b.s:.2f}" if b.inside else f"{b.s:g} (range end: widen it)"


def best_scale_markdown(rows: list[dict]) -> str:
    """frontier.md's best-s table for rows of one protocol ('' when no FD metric is present)."""
    found = best_scales(rows)
    if not found:
        return ""
    lines = ["Best s per FD metric: the lowest swept s, refined by a parabola through it and its neighbours; "
             "95% interval over the seed blocks' minima.\n",
             "| method | metric | best s | 95% interval | value at best swept s | best swept s | points |",
             "|---|---|---|---|---|---|---|"]
    for b in found:
        lines.append(f"| {b.method} | {metric_label(b.metric)} | {_where(b)} | {_interval(b)} | {b.value:.4g} | "
                     f"{b.grid_s:g} | {b.points} |")
    return "\n".join(lines) + "\n"


def best_scale_console(rows: list[dict], title: str = "") -> Any:
    """The same table for the console at the end of a sweep (None when no FD metric is present)."""
    found = best_scales(rows)
    if not found:
        return None
    table = Table(title=title or "best s per FD metric", title_justify="left", pad_edge=False, padding=(0, 1))
    for h in ("method", "metric", "best s", "95% interval", "value", "swept s"):
        table.add_column(h, justify="left" if h in ("method", "metric", "95% interval") else "right")
    for b in found:
        table.add_row(b.method, metric_label(b.metric), _where(b), _interval(b), f"{b.value:.4g}", f"{b.grid_s:g}")
    return table
