"""Benchmark (not a test): one process vs two (torchrun, gloo) on this CPU machine.

Trains the digits recipe (batch 128, global) for ``train.steps`` and sweeps s = 1 with
500 samples, once as ``python -m cfgx train`` (one process, all cores as intra-op
threads) and once as ``torchrun --nproc_per_node=2 -m cfgx train`` (one thread per
process); prints training img/s and sampling samples/s of each. On 2 cores expect
little gain: DDP adds an all-reduce per step and the cores are the same.
Usage: python scripts/bench_ddp.py [key=value ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["train.log_every=50", "guidance=1", "eval.num_samples=500", "eval.batch_size=50",
        "eval.classifier.steps=300", "eval.classifier.width=16"]


def run(cmd: list[str], tmp: Path, runs: str, steps: int = 300) -> dict:
    env = {**os.environ, "CFGX_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO)}
    args = [f"train.steps={steps}", *ARGS, *sys.argv[1:], f"paths.runs={tmp / runs}"]
    proc = subprocess.run([*cmd, "train", *args], cwd=tmp, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        raise SystemExit(proc.returncode)
    run_dir = next((tmp / runs).glob("*/*/meta.json")).parent
    meta = json.loads((run_dir / "meta.json").read_text())
    row = json.loads((run_dir / "metrics.json").read_text())[0]
    return {"img_s": meta["train_img_per_s"], "train_s": meta["train_seconds_last_call"],
            "samples_s": row["samples_per_s"], "loss": json.loads(
                (run_dir / "train_log.jsonl").read_text().splitlines()[-1])["loss"]}


def main() -> int:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        # The first call also trains the cached evaluation classifier, so run it before timing either.
        run([sys.executable, "-m", "cfgx"], tmp, "warm", steps=2)
        one = run([sys.executable, "-m", "cfgx"], tmp, "one")
        two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cfgx"], tmp, "two")
    print(f"{os.cpu_count()} CPU cores; digits recipe, global batch 128, 300 steps")
    print(f"{'':<28}{'train img/s':>12}{'train s':>9}{'final loss':>12}{'sample/s (s=1)':>16}")
    for label, r in (("1 process", one), ("2 processes (torchrun)", two)):
        print(f"{label:<28}{r['img_s']:>12.0f}{r['train_s']:>9.1f}{r['loss']:>12.4f}{r['samples_s']:>16.1f}")
    print(f"speed-up: training x{two['img_s'] / one['img_s']:.2f}, sampling x{two['samples_s'] / one['samples_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
