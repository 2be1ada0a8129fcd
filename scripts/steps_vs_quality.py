"""Benchmark (not a test): sample quality against sampling steps, per sampler, on paired seeds.

Runs the real `cfgx sweep` on RUN for every (sampler, steps) pair at the given scales (the rows
land in RUN's table like any sweep; finished rows are reused), then prints one markdown table:
FD(clf), recall and accuracy per (sampler, steps, s), with NFE per sample and FD relative to the
reference setting (DDIM at 50 steps by default). This is how the recipes' default sampler and
steps were picked: the cheapest setting whose FD is within 5% of DDIM-50's at every scale.

Usage: python scripts/steps_vs_quality.py RUN [scales=1,3] [steps=5,10,15,20,25,50]
       [samplers=ddim,dpmpp2m] [key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        return 2
    run = Path(sys.argv[1])
    opts = {"scales": "1,3", "steps": "5,10,15,20,25,50", "samplers": "ddim,dpmpp2m"}
    extra = []
    for a in sys.argv[2:]:
        k, _, v = a.partition("=")
        if k in opts:
            opts[k] = v
        else:
            extra.append(a)
    samplers, steps = opts["samplers"].split(","), [int(k) for k in opts["steps"].split(",")]
    scales = [float(s) for s in opts["scales"].split(",")]
    for name in samplers:
        for k in steps:
            cmd = [sys.executable, "-m", "cfgx", "sweep", f"run={run}", f"sampler={name}", f"sampler.steps={k}",
                   f"guidance={opts['scales']}", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr.strip()[-2000:])
                return proc.returncode
            print(f"swept {name} {k} steps", file=sys.stderr)
    rows = json.loads((run / "metrics.json").read_text())
    num = int(rows[-1]["num_samples"]) if rows else 0

    def pick(name: str, k: int, s: float) -> dict | None:
        hits = [r for r in rows if r["sampler"] == name and r["steps"] == k and r["s"] == s
                and r["method"] == "cfg" and r["postprocess"] == "none" and r["num_samples"] == num]
        return hits[-1] if hits else None

    ref = {s: pick("ddim", 50, s) for s in scales}
    print("| sampler | steps | NFE/sample | " + " | ".join(
        f"s={s:g} FD(clf) | rel. DDIM-50 | recall | acc" for s in scales) + " |")
    print("|---|---:|---:|" + "---:|---:|---:|---:|" * len(scales))
    for name in samplers:
        for k in steps:
            cells, nfe = [], 0
            for s in scales:
                r = pick(name, k, s)
                if r is None:
                    cells += ["—"] * 4
                    continue
                nfe = max(nfe, int(r["nfe"]))
                rel = f"{r['fd_classifier'] / ref[s]['fd_classifier']:.2f}" if ref[s] else "—"
                cells += [f"{r['fd_classifier']:.4f}", rel, f"{r['recall']:.3f}", f"{r['accuracy']:.3f}"]
            print(f"| {name} | {k} | {nfe} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
