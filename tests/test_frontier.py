"""The comparison view: frontier.md at matched accuracy, frontier and per-step figures, metrics.md."""

from __future__ import annotations

import matplotlib
import pytest

from cfgx.report.frontier import frontier_table, matched_point, write_frontier
from cfgx.report.plots import plot_run
from cfgx.report.plotting import dominated, place_labels
from cfgx.report.tables import reader_columns, write_tables

matplotlib.use("Agg")


def _row(method, s, acc, fd, rec, cov, step=100, ref=0.98, nfe=50):
    return {"s": s, "w_ho": s - 1, "method": method, "postprocess": "none", "accuracy": acc, "fd_classifier": fd,
            "precision": 0.5 + 0.05 * s, "recall": rec, "coverage": cov, "checkpoint_step": step,
            "eval_classifier_acc": ref, "nfe": nfe, "num_samples": 500, "sampler": "ddim", "steps": 25,
            "config_hash": "abc", "device": "cpu", "seconds": 1.0}


ROWS = [_row("cfg", 0, 0.10, 3.0, 0.98, 0.3), _row("cfg", 1, 0.96, 0.15, 0.93, 0.7),
        _row("cfg", 3, 0.975, 0.25, 0.40, 0.6), _row("cfg", 7, 1.0, 0.31, 0.29, 0.5),
        _row("apg", 0, 0.10, 3.0, 0.98, 0.3), _row("apg", 1, 0.96, 0.15, 0.93, 0.7),
        _row("apg", 3, 0.985, 0.18, 0.60, 0.72), _row("apg", 7, 0.99, 0.20, 0.55, 0.70)]


def test_matched_point_is_relative_to_the_classifiers_real_accuracy():
    # 0.99 x 0.98 = 0.9702: cfg first reaches it at s = 3, apg also at s = 3 (0.985).
    assert matched_point([r for r in ROWS if r["method"] == "cfg"], 0.99)["s"] == 3
    m = matched_point([r for r in ROWS if r["method"] == "apg"], 0.99)
    assert m["s"] == 3 and m["recall"] == 0.60 and m["coverage"] == 0.72
    assert matched_point([r for r in ROWS if r["method"] == "cfg"], 1.0)["s"] == 7  # target 0.98: only s = 7
    never = matched_point([_row("x", 1, 0.5, 1, 1, 1), _row("x", 2, 0.6, 1, 1, 1)], 0.99)
    assert never["s"] is None and never["best_s"] == 2


def test_frontier_md_lists_best_fd_and_matched_recall_per_method():
    md = frontier_table(ROWS, 0.99)
    lines: dict[str, str] = {}
    for ln in md.splitlines():  # the first table (the best-s table below it starts its lines alike)
        if ln.startswith("| ") and "---" not in ln:
            lines.setdefault(ln.split("|")[1].strip(), ln)
    cells = [c.strip() for c in lines["apg"].split("|")[1:-1]]
    assert cells[:9] == ["apg", "0,1,3,7", "0.15", "1", "3", "0.985", "0.6", "0.72", "50"]
    assert [c.strip() for c in lines["cfg"].split("|")[1:-1]][4:7] == ["3", "0.975", "0.4"]
    # Older checkpoints (snapshot sweeps) do not enter the comparison.
    md2 = frontier_table(ROWS + [_row("cfg", 3, 0.99, 0.01, 0.99, 0.99, step=50)], 0.99)
    assert md2 == md


def test_frontier_and_checkpoint_figures_and_reader_table(tmp_path):
    rows = ROWS + [_row("cfg", s, 0.9, fd, 0.5, 0.5, step=50) for s, fd in ((1, 0.3), (3, 0.4), (7, 0.5))]
    paths = write_frontier(rows, tmp_path)
    assert {p.name for p in paths} == {"frontier.md", "frontier_fd_recall.png", "frontier_precision_recall.png",
                                       "frontier_accuracy_coverage.png"}
    made = plot_run(rows, tmp_path)
    assert tmp_path / "plot_checkpoints.png" in made and (tmp_path / "plot_tradeoff.png").is_file()
    write_tables(rows, tmp_path)
    header = (tmp_path / "metrics.md").read_text().splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["method", "checkpoint_step", "s"] and "recall" in cols and "coverage" in cols
    assert "config_hash" not in cols and "device" not in cols and "sampler" not in cols  # provenance: CSV only
    assert "config_hash" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert reader_columns([ROWS[0]])[0] == "s"


def test_labels_are_kept_apart_and_log_view_when_one_point_dominates():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    xs, ys = [1.0, 1.0, 1.0, 1.0], [0.300, 0.301, 0.302, 0.303]  # four labels on one spot
    ax.plot(xs, ys, "o")
    place_labels(ax, xs, ys, ["s=1", "s=2", "s=3", "s=5"])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]) or boxes[i].intersection(boxes[i], boxes[j]).height < 1.5
    plt.close(fig)
    assert dominated([2.76, 0.14, 0.24, 0.31]) and not dominated([0.14, 0.24, 0.31, 0.2])


@pytest.mark.parametrize("bad", ["report.match_accuracy=1.5", "report.match_accuracy=x"])
def test_bad_match_accuracy_is_one_line(bad, tmp_path, capsys):
    from cfgx.cli import main

    assert main(["report", bad, str(tmp_path)]) == 2
    assert "fraction" in capsys.readouterr().err
