"""Golden tables: record what cfgx computes, before and after a change that must not alter it.

    python scripts/golden_tables.py record OUT      # run the scenarios below with this checkout's cfgx
    python scripts/golden_tables.py compare A B     # every column but timings must be byte-identical

Scenarios (each a real CLI call, in a fresh runs root and cache under OUT):
  demo      the default demo, ``cfgx train`` (snapshots on, which change nothing: autoguidance needs one)
  rules     one sweep over every guidance rule (and a weight schedule) on paired seeds
  cg        a classifier-guidance sweep
  flow      ``cfgx postprocess`` then a ``postprocess=flow`` sweep
  toy       ``cfgx toy`` on gmm1d and gmm2d (the 2-D one runs every rule of the lab) and their summaries
  ddp       a 2-process sweep (torchrun on gloo)

Records are compared row by row (keyed by the row file's name, i.e. the row key), with timing columns
dropped and run-dir paths normalised. ``--expect-changed method=s,...`` lists rows a change is meant to
alter (e.g. a rule's own formula at s = 0); they must differ, and nothing else may.
Every process runs with OMP_NUM_THREADS=1 so both records see the same kernels, whatever else runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "samples_per_s", "postprocess_seconds", "train_seconds", "post_seconds",
          "postprocess_train_seconds"}
COMMON = ["sampler=ddim", "sampler.steps=10", "eval.num_samples=100", "eval.batch_size=50"]
RULES = "[cfg,interval,rescale,apg,cfgpp,cfgzero,autoguidance,cfg@linear,apg@cosine]"


def _cfgx(out: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CFGX_CACHE=str(out / "cache"))
    cmd = [sys.executable, "-m", "cfgx", *args, f"paths.runs={out / 'runs'}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / "log.txt").open("a").write(f"$ {' '.join(args)}\n{res.stdout}\n{res.stderr}\n")
    print(f"{time.perf_counter() - t0:7.1f}s  cfgx {' '.join(args)}  -> rc {res.returncode}", flush=True)
    if res.returncode != 0:
        sys.exit(f"golden: 'cfgx {' '.join(args)}' failed; see {out / 'log.txt'}")


def record(out: Path) -> None:
    if out.exists():
        sys.exit(f"golden: {out} exists; pick a new folder")
    out.mkdir(parents=True)
    _cfgx(out, "train", "train.snapshot_every=500")
    run = next((out / "runs" / "digits").iterdir())
    shutil.copy(run / "metrics.csv", out / "demo_metrics.csv")
    _cfgx(out, "sweep", f"run={run}", f"guidance.method={RULES}", "guidance=0,1,3",
          "guidance.autoguidance.guide=step:500", *COMMON)
    _cfgx(out, "sweep", f"run={run}", "guidance.method=classifier", "guidance=0,1,3",
          "guidance.classifier.steps=200", *COMMON)
    _cfgx(out, "postprocess", f"run={run}", "postprocess.steps=100", "postprocess.samples_per_scale=100",
          "postprocess.train_scales=[1,3]", *COMMON)
    _cfgx(out, "sweep", f"run={run}", "postprocess=flow", "guidance=1,3", *COMMON)
    _cfgx(out, "sweep", f"run={run}", "launcher.nproc=2", "guidance=0,3", "eval.seed=7", *COMMON)
    for toy in ("gmm1d", "gmm2d"):
        _cfgx(out, "toy", f"dataset={toy}")
        found = next(p for p in (out / "runs" / toy).iterdir() if p.is_dir())
        shutil.copy(found / "toy_summary.json", out / f"toy_summary_{toy}.json")
    shutil.copytree(run / "sweep" / "rows", out / "rows")
    shutil.copy(run / "metrics.csv", out / "all_metrics.csv")
    (out / "run_dir.txt").write_text(str(run))
    print(f"recorded {out}")


def _norm(v, run: str, root: str):
    if isinstance(v, str):
        return v.replace(run, "<run>").replace(root, "<root>")
    if isinstance(v, dict):
        return {k: _norm(x, run, root) for k, x in v.items() if k not in TIMING}
    if isinstance(v, list):
        return [_norm(x, run, root) for x in v]
    return v


def _rows(rec: Path) -> dict[str, dict]:
    run = (rec / "run_dir.txt").read_text().strip()
    return {p.name: _norm(json.loads(p.read_text()), run, str(rec)) for p in sorted((rec / "rows").glob("*.json"))}


def _csv(path: Path, rec: Path) -> list[dict]:
    run = (rec / "run_dir.txt").read_text().strip()
    return [_norm(r, run, str(rec)) for r in csv.DictReader(path.open())]


def compare(a: Path, b: Path, expect: set[tuple[str, float]]) -> int:
    bad = 0
    ra, rb = _rows(a), _rows(b)
    if set(ra) != set(rb):
        print(f"row keys differ: only before {sorted(set(ra) - set(rb))}, only after {sorted(set(rb) - set(ra))}")
        bad += 1
    changed = 0
    for k in sorted(set(ra) & set(rb)):
        x, y = ra[k], rb[k]
        diff = sorted(c for c in set(x) | set(y) if x.get(c) != y.get(c))
        meant = (x.get("method"), float(x.get("s"))) in expect
        if meant:
            changed += bool(diff)
            if not diff:
                print(f"{k}: expected to change, but identical")
                bad += 1
        elif diff:
            print(f"{k}: differs in {diff[:8]}")
            bad += 1
    for toy in ("gmm1d", "gmm2d"):
        name = f"toy_summary_{toy}.json"
        if _norm(json.loads((a / name).read_text()), "", "") != _norm(json.loads((b / name).read_text()), "", ""):
            print(f"{name} differs")
            bad += 1
    for name in ("demo_metrics.csv",):
        if _csv(a / name, a) != _csv(b / name, b):
            print(f"{name} differs (timings excluded)")
            bad += 1
    print(f"{len(ra)} rows before, {len(rb)} after; {changed} changed as expected; {bad} unexpected difference(s)")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--expect-changed", default="", help="rows meant to change: METHOD=S[,METHOD=S...]")
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out.resolve())
        return 0
    expect = {(m, float(s)) for m, _, s in (e.partition("=") for e in args.expect_changed.split(",") if e)}
    return compare(args.a, args.b, expect)


if __name__ == "__main__":
    sys.exit(main())
