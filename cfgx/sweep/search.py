"""Which scales a sweep evaluates: the scales given (a grid), or ``guidance=auto``'s search for each
rule's best s.

The search minimises one FD-type column (``guidance.auto_metric``) over s in ``guidance.auto_range``:
it brackets the minimum by stepping up from the range's low end with golden-ratio growing steps, then
narrows the bracket by golden-section search (Kiefer 1953) until the best s is known to within
``guidance.auto_tol``. Every evaluation is an ordinary sweep row on the same paired seeds as a grid sweep
(scales snapped to tol/10, so reruns reuse rows), kept in the table and marked ``searched: true``.

The planners run on rank 0 only (the sweep loop asks them through ``distributed.on_main`` and broadcasts
the next scale, so every rank evaluates the same one); they read no tensors and need no torch.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cfgx.errors import CfgxError
from cfgx.report.columns import is_fd_metric

DEFAULT_RANGE = (0.0, 8.0)
INVGOLD = (math.sqrt(5) - 1) / 2   # 0.618...: the golden-section shrink factor per evaluation
BRACKET_STEPS = 8                  # the first step up from the low end is 1/8 of the range


def auto_overrides(value: str) -> list[str]:
    """``auto`` or ``auto:LO:HI`` (the command line's ``guidance=``) -> Hydra overrides."""
    parts = value.split(":")
    if parts[0] != "auto" or len(parts) not in (1, 3):
        raise CfgxError(f"guidance={value!r}: write guidance=auto or guidance=auto:LO:HI, e.g. guidance=auto:0:8")
    if len(parts) == 1:
        return ["guidance.auto=true"]
    try:
        lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
        raise CfgxError(f"guidance={value!r}: LO and HI must be numbers, e.g. guidance=auto:0:8") from None
    return ["guidance.auto=true", f"guidance.auto_range=[{lo!r},{hi!r}]"]


def auto_settings(cfg: DictConfig) -> tuple[float, float, float, str] | None:
    """(lo, hi, tol, metric) when ``guidance.auto`` is on, else None; raises CfgxError on bad values."""
    if not OmegaConf.select(cfg, "guidance.auto", default=False):
        return None
    rng = OmegaConf.select(cfg, "guidance.auto_range", default=list(DEFAULT_RANGE))
    tol = OmegaConf.select(cfg, "guidance.auto_tol", default=0.1)
    metric = str(OmegaConf.select(cfg, "guidance.auto_metric", default="auto"))
    ok = (rng is not None and len(rng) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and math.isfinite(v) for v in rng) and rng[0] < rng[1])
    if not ok:
        raise CfgxError(f"guidance.auto_range={list(rng) if rng is not None else None!r} must be [LO, HI] with "
                        "LO < HI, finite; e.g. guidance=auto:0:8")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < rng[1] - rng[0]:
        raise CfgxError(f"guidance.auto_tol={tol!r} must be > 0 and below the range's width; e.g. 0.1")
    if metric != "auto" and not is_fd_metric(metric):
        raise CfgxError(f"guidance.auto_metric={metric!r} is not an FD column; valid: auto, fd_classifier, fid, "
                        "or another FD column of the rows (fd_dinov2, sfid)")
    return float(rng[0]), float(rng[1]), float(tol), metric


def search_metric(metric: str, spaces: list[str]) -> str:
    """``auto``: FID where Inception features are computed, else the classifier FD, else FD_DINOv2; a metric
    whose features this sweep does not compute fails."""
    if metric == "auto":
        auto = next((m for m, space in (("fid", "inception"), ("fd_classifier", "classifier"),
                                        ("fd_dinov2", "dinov2")) if space in spaces), None)
        if auto is None:
            raise CfgxError("guidance=auto needs an FD to minimise, and this sweep computes none; add "
                            "eval.features=[inception] or name a classifier (eval.classifier.source)")
        return auto
    if metric == "fd_classifier" and "classifier" not in spaces:
        raise CfgxError("guidance.auto_metric=fd_classifier needs an evaluation classifier, and "
                        "eval.classifier.source=none; use guidance.auto_metric=auto or name one with "
                        "eval.classifier.source=torchvision:ARCH:PATH")
    if metric in ("fid", "sfid") and "inception" not in spaces:
        raise CfgxError(f"guidance.auto_metric={metric} needs Inception features, which this sweep does not "
                        "compute; use guidance.auto_metric=fd_classifier or eval.features=[classifier,inception]")
    return metric


def _evaluate(f: dict[float, float], s: float) -> Generator[float, float, float]:
    if s not in f:
        f[s] = yield s
    return f[s]


def golden_search(lo: float, hi: float, tol: float) -> Generator[float, float, None]:
    """Yields the scales to evaluate; is sent each one's metric (lower is better). Stops when the lowest
    point lies in a bracket [a, c] with c - a <= 2 tol, or the range's end is best."""
    q = tol / 10
    f: dict[float, float] = {}

    def snap(s: float) -> float:
        return round(min(max(round(s / q) * q, lo), hi), 9)

    a, b = lo, snap(lo + (hi - lo) / BRACKET_STEPS)
    fa = yield from _evaluate(f, a)
    fb = yield from _evaluate(f, b)
    if fb >= fa:  # uphill from the low end: the minimum is in [lo, b]
        yield from _narrow(f, a, None, b, tol, snap)
        return
    while True:  # downhill: step up with golden-ratio growing steps until the metric rises again
        c = snap(b + (b - a) / INVGOLD)
        fc = yield from _evaluate(f, c)
        if fc >= fb:
            yield from _narrow(f, a, b, c, tol, snap)
            return
        if c >= hi:  # still falling at the high end: search [b, hi] (the best-s table says "range end")
            yield from _narrow(f, b, None, c, tol, snap)
            return
        a, b, fb = b, c, fc


def _narrow(f: dict[float, float], a: float, x: float | None, c: float, tol: float, snap) -> Generator:
    """Golden-section search on [a, c] with its lowest interior point x (None: none evaluated yet)."""
    if x is None:
        x = snap(a + (1 - INVGOLD) * (c - a)) if f.get(a, math.inf) <= f.get(c, math.inf) else \
            snap(c - (1 - INVGOLD) * (c - a))
        if x in (a, c):
            return
        yield from _evaluate(f, x)
    while c - a > 2 * tol:
        u = snap(x - (1 - INVGOLD) * (x - a)) if x - a > c - x else snap(x + (1 - INVGOLD) * (c - x))
        if u in (a, x, c):
            return  # the snapping grid is as fine as the bracket
        fu = yield from _evaluate(f, u)
        if fu < f[x]:
            a, c = (a, x) if u < x else (x, c)
            x = u
        else:
            a, c = (u, c) if u < x else (a, u)


class ScalePlanner:
    """The scales of one rule, one at a time: the grid given, or a search's next point (rank 0 only)."""

    def __init__(self, scales: list[float], search: tuple[float, float, float, str] | None = None) -> None:
        self.scales, self.search = list(scales), search
        self.metric = search[3] if search else ""
        self.gen = golden_search(*search[:3]) if search else None
        self.pending: float | None = None
        self.seen: dict[float, float] = {}

    @property
    def searched(self) -> bool:
        return self.gen is not None

    def next(self, new_rows: list[dict[str, Any]]) -> float | None:
        """The next scale to evaluate, given the rows the previous one gave (None: this rule is done)."""
        if self.gen is None:
            return self.scales.pop(0) if self.scales else None
        try:
            if self.pending is None:
                s = next(self.gen)
            else:
                s = self.gen.send(self._value(new_rows))
        except StopIteration:
            return None
        self.pending = s
        return s

    def _value(self, rows: list[dict[str, Any]]) -> float:
        row = next((r for r in rows if r.get("postprocess", "none") == "none"), None)
        if row is None or self.metric not in row:
            have = sorted(k for k in (row or {}) if is_fd_metric(k))
            raise CfgxError(f"guidance.auto_metric={self.metric} is not a column of this sweep's rows; "
                            f"valid here: {', '.join(have) or 'none'}")
        v = row[self.metric]
        self.seen[float(row["s"])] = math.inf if v is None else float(v)  # non-finite (null) ranks last
        return self.seen[float(row["s"])]

    def best(self) -> tuple[float, float] | None:
        """(s, value) of the lowest point the search evaluated."""
        return min(self.seen.items(), key=lambda kv: kv[1]) if self.seen else None


def search_line(rule: str, planner: ScalePlanner, search: tuple[float, float, float, str]) -> str:
    """The console's line after a rule's search."""
    best = planner.best()
    lo, hi, tol, metric = search
    where = "none finite" if best is None else f"s={best[0]:g} ({metric} {best[1]:.4g})"
    return (f"guidance=auto:{lo:g}:{hi:g} for {rule}: best {metric} at {where} after {len(planner.seen)} evaluations "
            f"(tolerance {tol:g}; rows marked searched)")


def scales_words(cfg: DictConfig) -> str:
    """'at s = 0, 1, 3' or 'searching s in [0, 8] for the lowest fd_classifier' (the sweep's first line)."""
    auto = auto_settings(cfg)
    if auto is None:
        return "at s = " + ", ".join(f"{float(s):g}" for s in cfg.guidance.scales)
    metric = auto[3] if auto[3] != "auto" else "FD (fid with Inception features, else fd_classifier, else fd_dinov2)"
    return f"searching s in [{auto[0]:g}, {auto[1]:g}] for the lowest {metric} (tolerance {auto[2]:g})"
