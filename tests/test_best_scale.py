"""Compare like with like (one frontier.md section per protocol) and the best s per FD metric (oracle)."""

from __future__ import annotations

import matplotlib
import pytest
from scipy.stats import t as student_t

from cfgx.protocol import split_by_protocol
from cfgx.report.best_scale import best_scale, best_scales, refined_min
from cfgx.report.frontier import frontier_table, write_frontier
from cfgx.sweep.rows import combine_blocks

matplotlib.use("Agg")


def _row(s, fd, sampler="dpmpp2m", steps=10, method="cfg", **kw):
    return {"s": s, "method": method, "postprocess": "none", "accuracy": min(1.0, 0.3 + 0.3 * s),
            "fd_classifier": fd, "recall": 1 - 0.1 * s, "coverage": 0.5, "precision": 0.5, "checkpoint_step": 1000,
            "eval_classifier_acc": 0.99, "nfe": 20, "num_samples": 500, "sampler": sampler, "steps": steps,
            "eta": 0.0, "real_reference": "digits:train (1438)", **kw}


def test_two_samplers_give_one_frontier_section_each_never_mixed(tmp_path):
    # Trained with s = 1 (DPM-Solver++ 10), then swept with DDIM 25: cfg used to list "1,1,3" and take
    # its best FD across both samplers.
    rows = [_row(1, 0.15), _row(1, 0.30, "ddim", 25), _row(3, 0.05, "ddim", 25)]
    assert len(split_by_protocol(rows)) == 2
    md = frontier_table(rows)
    sections = md.split("## Protocol ")[1:]
    assert len(sections) == 2
    by_sampler = {("ddim 25" in s): s for s in sections}
    ddim, dpm = by_sampler[True], by_sampler[False]
    assert "dpmpp2m" not in ddim and "ddim" not in dpm.split("\n")[0]
    cfg_ddim = next(ln for ln in ddim.splitlines() if ln.startswith("| cfg |"))
    cells = [c.strip() for c in cfg_ddim.split("|")[1:-1]]
    assert cells[1] == "1,3" and cells[2] == "0.05" and cells[3] == "3"
    cfg_dpm = next(ln for ln in dpm.splitlines() if ln.startswith("| cfg |"))
    assert [c.strip() for c in cfg_dpm.split("|")[1:-1]][1:4] == ["1", "0.15", "1"]
    assert "1,1" not in md
    paths = write_frontier(rows + [_row(2, 0.1)], tmp_path)  # two scales per protocol: both get figures
    names = {p.name for p in paths}
    assert {"frontier_fd_recall.png", "frontier_fd_recall_p2.png"} <= names


def test_refined_minimum_is_the_parabolas_vertex():
    grid = [0, 0.5, 1.5, 2, 3, 5]  # non-uniform spacing
    assert refined_min([(s, (s - 1.7) ** 2 + 0.1) for s in grid]) == (pytest.approx(1.7), True)
    assert refined_min([(s, 3 * (s - 0.4) ** 2) for s in grid]) == (pytest.approx(0.4), True)
    assert refined_min([(s, -s) for s in grid]) == (5, False)  # at the range's end: said so, not refined


def test_best_s_per_metric_with_a_seed_block_interval():
    minima = [1.2, 1.5, 1.35]  # each seed block's curve is a parabola with its own minimum
    rows = []
    for s in [0, 0.5, 1, 1.5, 2, 3, 4]:
        blocks = [{"s": s, "fd_classifier": (s - m) ** 2 + 0.2, "fid": 2 * (s - 3.1) ** 2 + 5, "accuracy": 0.9}
                  for m in minima]
        rows.append({"method": "cfg", "postprocess": "none", **combine_blocks(blocks)})
    found = {b.metric: b for b in best_scales(rows)}
    assert list(found) == ["fid", "fd_classifier"]  # known FD metrics in the README's order
    fid = found["fid"]
    assert fid.s == pytest.approx(3.1) and fid.grid_s == 3
    clf = found["fd_classifier"]
    m = sum(minima) / 3
    sd = (sum((x - m) ** 2 for x in minima) / 2) ** 0.5
    hw = student_t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert clf.blocks == 3 and clf.ci == (pytest.approx(m - hw), pytest.approx(m + hw))
    # The mean curve's minimum is the mean of the block minima here (equal curvatures).
    assert clf.s == pytest.approx(m)
    one = best_scale("cfg", [{"s": s, "fd_classifier": (s - 1) ** 2} for s in (0, 1, 2)], "fd_classifier")
    assert one.ci is None and one.blocks == 1


def test_best_s_takes_any_fd_column_and_appears_in_frontier_md():
    rows = [_row(s, (s - 1.4) ** 2 + 0.1, fd_dinov2=(s - 2.2) ** 2 + 50.0, sfid=None) for s in (0, 1, 2, 3)]
    found = {b.metric: b.s for b in best_scales(rows)}
    assert found == {"fd_dinov2": pytest.approx(2.2), "fd_classifier": pytest.approx(1.4)}
    md = frontier_table(rows)
    assert "| cfg | FD_DINOv2 | 2.20 | needs eval.seed_blocks>=2 |" in md
    assert "| cfg | FD(clf) | 1.40 |" in md
