"""Small matplotlib helpers that keep figures readable: labels apart, one point not dominating.

No extra dependency: labels are nudged apart in display space by a few rounds of pairwise
repulsion (what adjustText does, reduced to the few dozen labels a sweep has).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cfgx.store.atomic import atomic_savefig


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    # Loaded when a figure is drawn: matplotlib is heavy (keeps 'cfgx --help' fast), and choosing a
    # backend at import would impose Agg on whoever imports cfgx.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], fontsize: float = 7.5,
                 color: str | Sequence[str] = "0.25", rounds: int = 60) -> None:
    """Annotate points (xs[i], ys[i]) with texts[i], nudging labels so their boxes do not overlap.

    Call after the axis limits and scales are final (the nudging works in pixels).
    """
    if not texts:
        return
    fig = ax.figure
    fig.canvas.draw()  # limits and transforms settled
    pts = ax.transData.transform(list(zip(xs, ys)))
    char_w, h = 0.6 * fontsize * fig.dpi / 72, 1.2 * fontsize * fig.dpi / 72
    widths = [char_w * len(t) for t in texts]
    # Start up-right of each point; labels then repel each other and their own points' neighbours.
    pos = [[p[0] + 4, p[1] + 4] for p in pts]
    for _ in range(rounds):
        moved = False
        for i in range(len(pos)):
            for j in range(i + 1, len(pos)):
                dx = (pos[i][0] + widths[i] / 2) - (pos[j][0] + widths[j] / 2)
                dy = (pos[i][1] + h / 2) - (pos[j][1] + h / 2)
                ox = (widths[i] + widths[j]) / 2 + 1 - abs(dx)
                oy = h + 1 - abs(dy)
                if ox > 0 and oy > 0:  # boxes overlap: push apart along the cheaper axis
                    moved = True
                    if oy <= ox:
                        step = (oy / 2 + 0.5) * (1 if dy >= 0 else -1)
                        if dy == 0:
                            step = oy / 2 + 0.5 if i < j else -(oy / 2 + 0.5)
                        pos[i][1] += step
                        pos[j][1] -= step
                    else:
                        step = (ox / 2 + 0.5) * (1 if dx >= 0 else -1)
                        pos[i][0] += step
                        pos[j][0] -= step
        for k in range(len(pts)):  # a label must not cover other points either
            for q in pts:
                if pos[k][0] - 2 < q[0] < pos[k][0] + widths[k] and pos[k][1] - 2 < q[1] < pos[k][1] + h:
                    pos[k][1] += 2
                    moved = True
        if not moved:
            break
    colors = [color] * len(texts) if isinstance(color, str) else list(color)
    inv = ax.transData.inverted()
    for x, y, (px, py), (lx, ly), t, c in zip(xs, ys, pts, pos, texts, colors):
        far = math.hypot(lx - px, ly - py) > 14  # a leader line once a label has moved away
        ax.annotate(t, xy=(x, y), xytext=tuple(inv.transform((lx, ly))), fontsize=fontsize, color=c,
                    va="bottom", ha="left", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if far else None)


def dominated(values: Sequence[float], ratio: float = 8.0) -> bool:
    """True when some positive values sit so far above the median that a linear axis squashes the rest."""
    vals = sorted(v for v in values if v is not None and v > 0 and math.isfinite(v))
    if len(vals) < 3:
        return False
    return vals[-1] / vals[len(vals) // 2] > ratio


def outliers(values: Sequence[float], gap: float = 0.6) -> list[bool]:
    """Points cut off from the rest by one gap wider than ``gap`` of the whole span (e.g. the
    unguided s = 0 points among guided scales): the smaller side of that gap is flagged."""
    n = len(values)
    vals = sorted(values)
    if n < 3 or vals[-1] == vals[0]:
        return [False] * n
    gaps = [b - a for a, b in zip(vals, vals[1:])]
    i = max(range(len(gaps)), key=gaps.__getitem__)
    if gaps[i] < gap * (vals[-1] - vals[0]):
        return [False] * n
    low, high = vals[:i + 1], vals[i + 1:]
    if len(low) == len(high):
        return [False] * n
    cut = vals[i]
    return [(v <= cut) if len(low) < len(high) else (v > cut) for v in values]


def curve_figure(series: dict[str, list[tuple[float, float, str]]], xlabel: str, ylabel: str, title: str,
                 path, colors: dict[str, Any] | None = None, hline: tuple[float, str] | None = None,
                 dpi: int = 120) -> None:
    """Curves of (x, y, point label) per series on one figure, labels kept apart.

    When a few points (typically s = 0) dominate y, a second panel zooms onto the others at a
    linear scale, and the full view uses a log y axis, so neither hides the comparison.
    """
    plt = pyplot()

    ys = [p[1] for pts in series.values() for p in pts]
    flags = outliers(ys)
    zoom = any(flags)
    drop = {y for y, f in zip(ys, flags) if f}
    log_full = zoom and min(ys) > 0 and min(drop) > max(y for y in ys if y not in drop)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11.5 if zoom else 6.6, 4.9), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = colors or {name: cmap(i % 10) for i, name in enumerate(series)}
    for k, ax in enumerate(axes[0]):
        lx, ly, lt, lc = [], [], [], []
        for name, pts in series.items():
            pts = [p for p in pts if k == 0 or p[1] not in drop]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1.2, color=colors[name], label=name)
            for x, y, t in pts:
                if t:
                    lx.append(x), ly.append(y), lt.append(t), lc.append(colors[name])
        ax.margins(x=0.1, y=0.08)  # room for the labels of edge points
        if log_full and k == 0:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline[0], color="0.5", lw=0.8, ls="--", label=hline[1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (log scale)" if ax.get_yscale() == "log" else ""))
        if zoom:
            ax.set_title("all scales" if k == 0 else "zoom: without the dominating points", fontsize=9)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
        ax._cfgx_labels = (lx, ly, lt, lc)  # placed once the layout is final
    fig.suptitle(wrap_title(title, 100 if zoom else 62), fontsize=10)
    fig.tight_layout()
    for ax in axes[0]:
        lx, ly, lt, lc = ax._cfgx_labels
        place_labels(ax, lx, ly, lt, color=lc)
    atomic_savefig(fig, path, dpi=dpi)
    plt.close(fig)


def wrap_title(text: str, width: int = 60) -> str:
    """Break a long title at spaces so it fits the figure instead of being cut off."""
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)
