"""Benchmark (not a test): time of a 4-scale sweep with cold and with warm caches.

Copies RUN to a scratch folder (the original is not touched), then runs
`cfgx sweep guidance=0,1,3,7` twice:
  cold  - empty cache: trains the evaluation classifier, extracts real features;
  warm  - same cache, eval.overwrite=true: samples and scores again, but the
          evaluation classifier and the real-side features come from the cache.
Usage: python scripts/bench_sweep.py RUN [key=value ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    run, overrides = Path(sys.argv[1]), sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "digits" / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("sweep", "metrics.*", "*.png"))
        env = {**os.environ, "CFGX_CACHE": str(Path(tmp) / "cache")}
        for label, extra in (("cold", []), ("warm", ["eval.overwrite=true"])):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "cfgx", "sweep", "guidance=0,1,3,7", f"run={copy}",
                                   *overrides, *extra], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                return proc.returncode
            print(f"sweep {label}: {wall:.1f} s  ({' '.join(overrides) or 'run defaults'})")
        print(proc.stdout[-2500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
