"""`cfgx toy`: the 1D/2D guidance analysis of Zhao & Schwing 2025 (arXiv 2503.10638).

Run once per dataset at reduced size; the assertions are the paper's qualitative
claims made numeric: the true conditional lands on the class means, CFG/CG push
final samples away from the decision boundary more as s grows, and relative to
the class separation the push is larger when the classes overlap (mu = 0.1).
"""

from __future__ import annotations

import json

import pytest

from cfgx.errors import CfgxError
from cfgx.toy.analysis import run_toy

SCALES = [1.0, 2.0, 8.0]


def _row(rows, **match):
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, match
    return hits[0]


@pytest.fixture(scope="module")
def toy1d(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy1d")
    summary = run_toy("gmm1d", out, scales=SCALES, steps=40, n_paths=96, seed=0, classifier_steps=150,
                      mus=(1.0, 0.1))
    return out, summary


@pytest.fixture(scope="module")
def toy2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d")
    summary = run_toy("gmm2d", out, scales=[1.0, 4.0], steps=40, n_paths=150, seed=0, classifier_steps=400)
    return out, summary


def test_gmm1d_files_and_summary(toy1d):
    out, summary = toy1d
    for mu in ("1", "0.1"):
        assert (out / f"trajectories_1d_mu{mu}.png").stat().st_size > 10_000
    on_disk = json.loads((out / "toy_summary.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    # 2 mus x (true conditional + 3 scales x (CFG + CG with 3 classifiers)).
    assert len(summary["rows"]) == 2 * (1 + len(SCALES) * 4)
    assert {r["classifier"] for r in summary["rows"] if r["method"] == "cg"} == {"exact", "linear", "mlp"}


def test_gmm1d_true_conditional_lands_on_class_means(toy1d):
    rows = toy1d[1]["rows"]
    for mu in (1.0, 0.1):
        r = _row(rows, mu=mu, method="true_conditional")
        assert r["accuracy"] >= 0.97
        assert abs(r["median_signed_distance"] - mu) < 0.15 * mu
        # Final samples scatter about +-mu with the data std 0.05 (E|N(0, 0.05^2)| = 0.04).
        assert r["mean_abs_error_to_class_mean"] < 0.06


def test_gmm1d_guidance_pushes_away_from_boundary(toy1d):
    rows = toy1d[1]["rows"]
    for mu in (1.0, 0.1):
        cfg = [_row(rows, mu=mu, method="cfg", s=s) for s in SCALES]
        dists = [r["mean_signed_distance"] for r in cfg]
        assert dists == sorted(dists) and dists[-1] > dists[0], dists
        assert cfg[-1]["near_boundary_frac"] <= cfg[0]["near_boundary_frac"]
        # With the exact classifier, CG is CFG (the exact posterior's gradient is the CFG difference).
        for s in SCALES:
            cg = _row(rows, mu=mu, method="cg", classifier="exact", s=s)
            assert cg["mean_signed_distance"] == pytest.approx(_row(rows, mu=mu, method="cfg", s=s)
                                                               ["mean_signed_distance"], abs=1e-3)
        for clf in ("linear", "mlp"):
            lo = _row(rows, mu=mu, method="cg", classifier=clf, s=SCALES[0])["mean_signed_distance"]
            hi = _row(rows, mu=mu, method="cg", classifier=clf, s=SCALES[-1])["mean_signed_distance"]
            assert hi > lo


def test_gmm1d_overlapping_classes_pushed_further(toy1d):
    rows = toy1d[1]["rows"]

    def rel_push(mu):
        return (_row(rows, mu=mu, method="cfg", s=SCALES[-1])["rel_signed_distance"]
                - _row(rows, mu=mu, method="true_conditional")["rel_signed_distance"])

    assert rel_push(0.1) > 2 * rel_push(1.0) > 0


def test_gmm2d_margin_grows_with_scale(toy2d):
    out, summary = toy2d
    assert (out / "samples_2d.png").stat().st_size > 10_000
    assert json.loads((out / "toy_summary.json").read_text())["dataset"] == "gmm2d"
    rows = summary["rows"]
    for method in ("cfg", "cg"):
        lo, hi = _row(rows, method=method, s=1.0), _row(rows, method=method, s=4.0)
        assert hi["margin"] > lo["margin"]
        assert hi["near_boundary_frac"] <= lo["near_boundary_frac"]
        assert hi["accuracy"] >= lo["accuracy"]
    # Exact CFG at s=1 is the true conditional: most samples already sit in their class's region.
    assert _row(rows, method="cfg", s=1.0)["accuracy"] > 0.85


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(CfgxError, match="gmm1d"):
        run_toy("gmm3d", tmp_path)


def test_gmm2d_panel_per_guidance_rule(toy2d):
    """`cfgx toy` covers every guidance-lab rule: a margin per (rule, s) and one panel each."""
    out, summary = toy2d
    assert (out / "margins_2d.png").stat().st_size > 10_000
    rows = summary["rows"]
    for m in ("cfg@linear", "cfg@cosine", "interval", "rescale", "apg", "cfgzero", "autoguidance", "cfgpp"):
        got = {r["s"]: r["margin"] for r in rows if r["method"] == m}
        assert set(got) == {1.0, 4.0}, m
    # Rules whose s = 1 is the conditional model give CFG's s = 1 margin (same noise, exact scores).
    cfg1 = _row(rows, method="cfg", s=1.0)["margin"]
    for m in ("cfg@linear", "interval", "rescale", "apg"):
        lin_s1 = next(r for r in rows if r["method"] == m and r["s"] == 1.0)
        if m != "cfg@linear":  # a schedule still varies the per-step weight around s = 1
            assert lin_s1["margin"] == pytest.approx(cfg1, abs=1e-4), m
    # Stronger guidance still widens the margin under every rule built on the CFG difference.
    for m in ("interval", "rescale", "apg", "cfg@cosine"):
        lo, hi = (next(r for r in rows if r["method"] == m and r["s"] == s) for s in (1.0, 4.0))
        assert hi["margin"] > lo["margin"], m
