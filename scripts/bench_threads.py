"""Benchmark (not a test): the digits training step, one process alone and two side by side.

Each process trains the digits recipe (configs/train/digits.yaml: its U-Net, batch, AdamW, EMA)
on the embedded digits and counts the images it trains in one shared time window, so the two
side-by-side processes are measured over the same seconds. Three setups:
  fixed  - torch's own pool (every core, the behaviour before the thread budget), alone;
  budget - cfgx's thread budget (cfgx/cpu.py), alone, then two processes side by side;
  fixed2 - two fixed-pool processes side by side (--with-fixed-pair; slow on a small machine).
Prints img/s and the ratios the budget is judged by: two side by side / one alone (target >= 0.9)
and budget alone / fixed alone (target >= 0.97). OMP_NUM_THREADS is removed from the children's
environment; their slots live in a temporary XDG_RUNTIME_DIR, so other users' cfgx do not count.
On a machine that others load the figures are noisy: compare ratios of one run only.
Usage: python scripts/bench_threads.py [--seconds 10] [--with-fixed-pair]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfgx import cpu
from cfgx.backbones import build_backbone
from cfgx.config import compose
from cfgx.data import build_dataset, stack_dataset
from cfgx.diffusion.loss import EpsLoss
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.store.checkpoints import make_ema
from cfgx.train import adamw_with_warmup, batch_indices, optimizer_step

REPO = Path(__file__).resolve().parents[1]


def child(mode: str, start_at: float, seconds: float) -> None:
    cfg = compose([])
    data = build_dataset(cfg.dataset)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    torch.manual_seed(0)
    model = build_backbone(cfg.backbone, data, schedule)
    ema = make_ema(model, float(cfg.train.ema_decay))
    opt, sched = adamw_with_warmup(model.parameters(), float(cfg.train.lr), 0.0, 10, fused=True)
    loss_fn, gen = EpsLoss(schedule, float(cfg.cond_drop.p)), torch.Generator().manual_seed(0)
    x_all, y_all = stack_dataset(data.train)
    bs = int(cfg.train.batch_size)
    if mode == "budget":
        cpu.start_budget("auto")
    done, step, threads = 0, 0, set()
    while True:
        idx = batch_indices(step, len(y_all), bs, 0, "cpu")
        optimizer_step(loss_fn(model, x_all[idx], y_all[idx], gen), model, opt, sched, ema, 1.0)
        step += 1
        cpu.tick()
        now = time.time()
        if start_at <= now < start_at + seconds:
            done += bs
            threads.add(torch.get_num_threads())
        elif now >= start_at + seconds:
            break
    print(json.dumps({"img_s": done / seconds, "threads": sorted(threads)}))


def launch(modes: list[str], seconds: float, runtime: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CFGX_OMP_AUTO")}
    env.update(PYTHONPATH=str(REPO), XDG_RUNTIME_DIR=runtime)
    start_at = time.time() + 12.0  # imports and the digits load finish before the window opens
    procs = [subprocess.Popen([sys.executable, __file__, "--child", m, str(start_at), str(seconds)], env=env,
                              stdout=subprocess.PIPE, text=True) for m in modes]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark process failed: {out}")
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--with-fixed-pair", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as runtime:
        os.chmod(runtime, 0o700)
        fixed = launch(["fixed"], args.seconds, runtime)[0]
        alone = launch(["budget"], args.seconds, runtime)[0]
        two = launch(["budget", "budget"], args.seconds, runtime)
        pair = launch(["fixed", "fixed"], args.seconds, runtime) if args.with_fixed_pair else None
    print(f"digits training step (configs/train/digits.yaml), {os.cpu_count()} CPUs, {args.seconds:.0f} s windows")
    print(f"  fixed pool, alone:        {fixed['img_s']:8.0f} img/s  threads {fixed['threads']}")
    print(f"  budget, alone:            {alone['img_s']:8.0f} img/s  threads {alone['threads']}")
    print(f"  budget, two side by side: {two[0]['img_s']:8.0f} + {two[1]['img_s']:.0f} img/s  "
          f"threads {two[0]['threads']} / {two[1]['threads']}")
    if pair:
        print(f"  fixed, two side by side:  {pair[0]['img_s']:8.0f} + {pair[1]['img_s']:.0f} img/s")
    total = two[0]["img_s"] + two[1]["img_s"]
    print(f"two side by side / one alone: {total / alone['img_s']:.2f}  (target >= 0.9)")
    print(f"budget alone / fixed alone:   {alone['img_s'] / fixed['img_s']:.2f}  (target >= 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
