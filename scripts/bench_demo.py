"""Benchmark (not a test): wall time of the README demo and its throughput figures.

Runs `python -m cfgx train` (the embedded digits default, or the overrides given
on the command line) in a fresh folder with a fresh cache, exactly as `make demo`
does, and prints wall time, training img/s, sampling samples/s per scale and the
table. Usage: python scripts/bench_demo.py [key=value ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CFGX_CACHE": str(Path(tmp) / "cache")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cfgx", "train", *overrides], cwd=tmp, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.returncode
        run = next((Path(tmp) / "runs").glob("*/*/meta.json")).parent
        meta = json.loads((run / "meta.json").read_text())
        rows = json.loads((run / "metrics.json").read_text())
        print(proc.stdout)
        print(f"demo wall time: {wall:.1f} s (cold cache: includes the evaluation classifier)")
        print(f"train: {meta['train_img_per_s']:.0f} img/s over {meta['checkpoint_step']} steps "
              f"({meta['train_seconds_last_call']:.1f} s) on {meta['device']}")
        for r in rows:
            print(f"sample s={r['s']:g}: {r['samples_per_s']:.1f} samples/s (nfe {r['nfe']}), "
                  f"acc {r['accuracy']:.3f}, FD(clf) {r['fd_classifier']:.3g}, "
                  f"div {r['diversity_within_class']:.3f}, prec {r['precision']:.3f}, rec {r['recall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
