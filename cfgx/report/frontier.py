"""The comparison view: guidance rules at matched fidelity, not at equal s.

Per rule (a row's ``method``, e.g. cfg, apg, cfg@linear) the fidelity-diversity frontier on one
figure per pair of metrics (FD or FID vs recall, precision vs recall, accuracy vs coverage),
points labelled by s, and ``frontier.md``: each rule's best FD over the swept scales with its
s, and its recall and coverage at the first s whose sample accuracy reaches
``report.match_accuracy`` times the evaluation classifier's accuracy on real held-out images
(so "matched" means "as recognisable as real data", whatever the classifier's own ceiling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfgx.protocol import split_by_protocol
from cfgx.report.best_scale import best_scale_markdown
from cfgx.report.plots import latest_checkpoint_rows
from cfgx.report.plotting import curve_figure, pyplot
from cfgx.store.atomic import atomic_write_text

MATCH_ACCURACY = 0.99


def latest_rows(rows: list[dict]) -> list[dict]:
    """Rows of each run's newest checkpoint, without postprocessing: one curve per rule."""
    return [r for r in latest_checkpoint_rows(rows) if r.get("postprocess", "none") == "none"]


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per rule, sorted by s; with several runs or sample counts the label says which."""
    out: dict[str, list[dict]] = {}
    runs = {r.get("run_label") for r in rows}
    ns = {r.get("num_samples") for r in rows}
    for r in sorted(rows, key=lambda r: float(r["s"])):
        name = str(r.get("method", "cfg"))
        if len(runs) > 1:
            name = f"{r.get('run_label')} {name}"
        if len(ns) > 1:
            name += f" n={r.get('num_samples')}"
        out.setdefault(name, []).append(r)
    return out


def fd_key(rows: list[dict]) -> tuple[str, str]:
    if any(r.get("fid") is not None for r in rows):
        return "fid", "FID"
    if not any(r.get("fd_classifier") is not None for r in rows) and any(r.get("fd_dinov2") is not None for r in rows):
        return "fd_dinov2", "FD_DINOv2"  # no evaluation classifier and no Inception
    return "fd_classifier", "FD (eval-classifier features)"


def matched_point(rs: list[dict], match: float) -> dict[str, Any]:
    """The first s (ascending) whose accuracy reaches ``match`` x the classifier's real-test accuracy."""
    for r in rs:
        ref = r.get("eval_classifier_acc") or 1.0
        if r.get("accuracy") is not None and r["accuracy"] >= match * ref:
            return {"s": r["s"], "recall": r.get("recall"), "coverage": r.get("coverage"),
                    "accuracy": r["accuracy"], "target": match * ref}
    best = max((r for r in rs if r.get("accuracy") is not None), key=lambda r: r["accuracy"], default=None)
    ref = (best or {}).get("eval_classifier_acc") or 1.0
    return {"s": None, "target": match * ref, "best_accuracy": best and best["accuracy"], "best_s": best and best["s"]}


def _f(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}g}"


def frontier_table(rows: list[dict], match: float = MATCH_ACCURACY) -> str:
    """frontier.md: one section per evaluation protocol (never mixing samplers, sample counts or
    references); per rule, best FD and its s, recall and coverage at matched accuracy, best s per FD metric."""
    parts = split_by_protocol(latest_rows(rows))
    lines = ["# Guidance rules compared at matched fidelity\n"]
    if len(parts) > 1:
        lines.append(f"{len(parts)} evaluation protocols: each has its own section; rows of different protocols "
                     "are never compared.\n")
    for label, rs in parts:
        lines += [f"## Protocol {label}\n", _protocol_section(rs, match), best_scale_markdown(rs)]
    return "\n".join(lines)


def _protocol_section(rows: list[dict], match: float) -> str:
    fk, fl = fd_key(rows)
    groups = by_method(rows)
    ref = next((r.get("eval_classifier_acc") for r in rows if r.get("eval_classifier_acc")), None)
    # cfgx's own classifier is scored on held-out images; a named (torchvision) one on the reference set itself.
    named = any(str(r.get("extractor_classifier", "")).startswith("torchvision:") for r in rows)
    on = "the reference images" if named else "real held-out images"
    lines = [f"Matched accuracy: the first swept s whose sample accuracy reaches {match:g} x the evaluation "
             f"classifier's accuracy on {on} ({_f(ref, 4)}), i.e. >= {_f(match * (ref or 1), 4)}. "
             f"Best {fl.split(' (')[0]}: lowest over the swept s. Same paired seeds for every rule.\n",
             f"| method | scales | best {fk} | at s | matched s | accuracy | recall | coverage | nfe at matched s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        scored = [r for r in rs if r.get(fk) is not None]
        best = min(scored, key=lambda r: r[fk]) if scored else None
        m = matched_point(rs, match)
        scales = ",".join(f"{s:g}" for s in sorted({float(r["s"]) for r in rs}))
        if m["s"] is None and m["best_accuracy"] is None:  # eval.classifier.source=none: no accuracy to match
            tail = "n/a (no evaluation classifier) | | | | |"
        elif m["s"] is None:
            tail = f"not reached (max {_f(m['best_accuracy'])} at s={_f(m['best_s'])}) | | | | |"
        else:
            nfe = next((r.get("nfe") for r in rs if r["s"] == m["s"]), None)
            tail = (f"{m['s']:g} | {_f(m['accuracy'])} | {_f(m['recall'])} | {_f(m['coverage'])} | "
                    f"{_f(nfe)} |")
        lines.append(f"| {name} | {scales} | {_f(best and best[fk])} | {_f(best and best['s'])} | {tail}")
    return "\n".join(lines) + "\n"


PAIRS = [("fd", "recall", "frontier_fd_recall"), ("precision", "recall", "frontier_precision_recall"),
         ("accuracy", "coverage", "frontier_accuracy_coverage")]


def plot_frontiers(rows: list[dict], out_dir: Path, match: float = MATCH_ACCURACY) -> list[Path]:
    """One figure per metric pair and protocol (a suffix _p2, _p3 ... after the first); one curve per rule,
    points labelled by s."""
    paths = []
    for i, (label, rs) in enumerate(split_by_protocol(latest_rows(rows))):
        paths += _plot_protocol(rs, out_dir, match, "" if i == 0 else f"_p{i + 1}", label)
    return paths


def _plot_protocol(rows: list[dict], out_dir: Path, match: float, suffix: str, protocol: str) -> list[Path]:
    plt = pyplot()
    groups = by_method(rows)
    if not groups:
        return []
    fk, fl = fd_key(rows)
    labels = {"fd": fl, "recall": "recall (diversity)", "precision": "precision (fidelity)",
              "coverage": "coverage (diversity)", "accuracy": "sample class accuracy (fidelity)"}
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(groups)}
    ref = next((r.get("eval_classifier_acc") for r in rows if r.get("eval_classifier_acc")), None)
    paths = []
    for ykey, xkey, fname in PAIRS:
        yk = fk if ykey == "fd" else ykey
        series = {name: [(r[xkey], r[yk], f"{r['s']:g}") for r in rs
                         if r.get(xkey) is not None and r.get(yk) is not None] for name, rs in groups.items()}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        hline = (match * ref, f"matched: {match:g} x real-test accuracy") if ykey == "accuracy" and ref else None
        better = "lower is better" if ykey == "fd" else "up-right is better"
        paths.append(Path(out_dir) / f"{fname}{suffix}.png")
        curve_figure(series, labels[xkey], labels[ykey],
                     f"{labels[ykey].split(' (')[0]} vs {xkey} per guidance rule ({better}); point labels: s; "
                     f"protocol {protocol}",
                     paths[-1], colors={k: colors[k] for k in series}, hline=hline)
    return paths


def write_frontier(rows: list[dict], out_dir: Path, match: float = MATCH_ACCURACY) -> list[Path]:
    """frontier.md and the frontier figures, when the rows compare at least one rule over several s."""
    rows_l = latest_rows(rows)
    if not rows_l or len({r["s"] for r in rows_l}) < 2:
        return []
    atomic_write_text(Path(out_dir) / "frontier.md", frontier_table(rows, match))
    return [Path(out_dir) / "frontier.md", *plot_frontiers(rows, out_dir, match)]
