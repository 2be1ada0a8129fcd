"""Protocol presets (eval=fid50k, eval=quick), the protocol column, and guidance=auto's search."""

from __future__ import annotations

import json

import pytest
from conftest import private_copy

from cfgx.cli import main
from cfgx.config import compose, normalize_overrides, validate
from cfgx.errors import CfgxError
from cfgx.sweep.search import ScalePlanner, golden_search

# The tiny run's evaluation classifier settings (conftest TINY), so eval=quick reuses its cached classifier.
TINY_EVAL = ["eval.classifier.steps=150", "eval.classifier.width=8", "eval.num_samples=40", "eval.batch_size=20"]


def test_presets_compose_validate_and_beat_the_datasets_eval_block():
    cfg = compose(["eval=fid50k"])  # digits asks for 500 samples in its own eval block
    validate(cfg)
    assert (cfg.eval.protocol, cfg.eval.num_samples, cfg.eval.real_samples) == ("fid50k", 50000, "all")
    assert list(cfg.eval.features) == ["classifier", "inception"] and cfg.eval.real_split == "train"
    assert compose(["eval=fid50k", "eval.num_samples=7"]).eval.num_samples == 7  # the command line beats both
    quick = compose(["eval=quick", "dataset=mnist"])
    validate(quick)
    assert (quick.eval.protocol, quick.eval.num_samples, quick.eval.real_samples) == ("quick", 200, 2000)
    assert compose([]).eval.protocol == "default"


@pytest.mark.parametrize("value,needle", [("auto:8:0", "LO < HI"), ("auto:0", "auto:LO:HI"),
                                          ("auto:a:b", "must be numbers")])
def test_bad_auto_range_is_one_line(value, needle):
    with pytest.raises(CfgxError, match=needle):
        validate(compose([f"guidance={value}"]))


def test_auto_overrides_and_metric_checks():
    assert normalize_overrides(["guidance=auto:0:8"]) == ["guidance.auto=true", "guidance.auto_range=[0.0,8.0]"]
    cfg = compose(["guidance=auto"])
    validate(cfg)
    assert cfg.guidance.auto and list(cfg.guidance.auto_range) == [0, 8]
    with pytest.raises(CfgxError, match="not an FD column"):
        validate(compose(["guidance=auto", "guidance.auto_metric=recall"]))
    with pytest.raises(CfgxError, match="lambda"):  # CFG++ over the whole range: lambda = 20/12.5 > 1
        validate(compose(["guidance=auto:0:20", "guidance.method=cfgpp", "sampler=ddim"]))


@pytest.mark.parametrize("true_min", [0.0, 0.37, 1.3, 4.44, 8.0])
def test_golden_search_meets_its_tolerance_in_few_evaluations(true_min):
    # An exact toy: any unimodal curve; the search must land within tol of its minimum, in <= 13 evaluations
    # (a 0.25 grid over [0, 8] has 33).
    f = lambda s: abs(s - true_min) ** 0.7 + 0.2 * max(s - true_min, 0)  # noqa: E731  asymmetric, kinked
    planner, row = ScalePlanner([], (0.0, 8.0, 0.1, "fd_classifier")), []
    while (s := planner.next(row)) is not None:
        row = [{"s": s, "postprocess": "none", "fd_classifier": f(s)}]
    best_s, _ = planner.best()
    assert abs(best_s - true_min) <= 0.1 and len(planner.seen) <= 13
    assert len(set(planner.seen)) == len(planner.seen)  # no scale evaluated twice


def test_the_bracket_is_found_before_narrowing():
    g = golden_search(0.0, 8.0, 0.1)
    pts = [next(g)]
    for _ in range(3):  # downhill until s = 2.62, where the curve rises: bracket [0, 2.62] around s = 1
        pts.append(g.send((pts[-1] - 1.2) ** 2))
    assert pts == [0.0, 1.0, 2.62, 1.62]  # the fourth point is already inside the bracket


def test_auto_sweep_marks_rows_and_records_the_protocol(tiny_run, tmp_path_factory, workdir, capsys):
    run = private_copy(tiny_run, tmp_path_factory, "auto")
    assert main(["sweep", f"run={run}", "guidance=auto:0:4", "guidance.auto_tol=0.5", *TINY_EVAL]) == 0
    out = capsys.readouterr().out
    rows = json.loads((run / "metrics.json").read_text())
    searched = [r for r in rows if r.get("searched")]
    assert len(searched) >= 4 and {r["protocol"] for r in searched} == {"default"}
    best = min(searched, key=lambda r: r["fd_classifier"])
    assert f"best fd_classifier at s={best['s']:g}" in out and "best s per FD metric" in out
    # The search's rows are ordinary rows: a grid sweep at a searched scale reuses it, the quick preset's rows
    # carry their protocol, and each protocol gets its own frontier.md section.
    assert main(["sweep", f"run={run}", f"guidance={best['s']}", "eval=quick", *TINY_EVAL]) == 0
    rows = json.loads((run / "metrics.json").read_text())
    assert {r["protocol"] for r in rows} == {"default", "quick"}
    assert [r["searched"] for r in rows if r["protocol"] == "quick"] == [False]


@pytest.mark.slow
def test_auto_search_under_torchrun_walks_the_same_scales_as_one_process(tiny_run, tmp_path_factory, cache_dir):
    import os
    import subprocess
    import sys

    from conftest import REPO

    args = ["guidance=auto:0:4", "guidance.auto_tol=0.5", *TINY_EVAL]
    one, two = (private_copy(tiny_run, tmp_path_factory, tag) for tag in ("auto1", "auto2"))
    assert main(["sweep", f"run={one}", *args]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), CFGX_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cfgx", "sweep",
                    f"run={two}", *args], env=env, check=True, timeout=600)
    timing = {"seconds", "samples_per_s", "device"}
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    a, b = ([r for r in rows if r["searched"]] for rows in (a, b))
    assert len(a) >= 4 and [r["s"] for r in a] == [r["s"] for r in b]
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]
