"""Benchmark record (not a test): one JSON of cfgx's throughput figures, and ratios to a previous one.

Measures, in one process on this machine:
  train      - img/s of one training step (eps-MSE with condition dropout, backward, AdamW, EMA)
               of cfgx's U-Net at the peer_bench sizes: tiny (1x28x28, batch 64, ~1.7M params)
               and cifar (DDPM's CIFAR-10 U-Net, 3x32x32, batch 8, 38.3M params);
  sample     - samples/s of the digits recipe's U-Net per sampler (ddim, dpmpp2m, ddpm) and per
               scale kind: s in {0, 1} (one network call per step) and guided s (a 2B batch);
  inception  - FID Inception-v3 img/s on 32x32 uint8 images (random init when the real weights are
               not found: throughput does not depend on weight values);
  peak_rss_mb - the process's peak resident memory;
  sgemm_gflops - a 2048^3 fp32 matmul's GFLOP/s (mean of the start and the end): the machine's own
               speed, by which ratio_to_previous_per_sgemm divides each ratio to the previous record.
Timings are medians of --repeats runs after a warm-up. The machines here are shared and noisy: a
figure means something only as a ratio to another measured side by side, which is what --compare
gives (the previous record by default) -- and for a claim against other U-Nets use
../shared/tools/peer_bench, which interleaves the peers in one run.

    python scripts/bench_record.py [--out bench_out/bench.json] [--compare PREV.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from cfgx.backbones.unet import UNet
from cfgx.diffusion.loss import EpsLoss
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.sample import generate
from cfgx.store.checkpoints import make_ema

SCHEDULE = NoiseSchedule("linear", 1000)
TRAIN_SIZES = {  # the peer_bench configs (tools/peer_bench/cfgx_extra.py)
    "tiny": (dict(in_channels=1, resolution=28, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(14,), dropout=0.1), 64),
    "cifar": (dict(in_channels=3, resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.1), 8),
}


def _median_rate(fn, items: int, repeats: int, min_s: float) -> float:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        rates.append(n * items / dt)
    return statistics.median(rates)


def sgemm_gflops() -> float:
    """The machine's fp32 matrix-multiply rate right now: the yardstick for drift between records."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return 2 * 2048**3 * 8 / (time.perf_counter() - t0) / 1e9


def bench_train(size: str, repeats: int, min_s: float) -> float:
    arch, batch = TRAIN_SIZES[size]
    torch.manual_seed(0)
    model = UNet(num_classes=10, **arch)
    ema = make_ema(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as cfgx.train steps it
    loss_fn = EpsLoss(SCHEDULE, 0.1)
    x = torch.randn(batch, arch["in_channels"], arch["resolution"], arch["resolution"])
    y = torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step() -> None:
        loss = loss_fn(model, x, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)

    return _median_rate(step, batch, repeats, min_s)


def bench_sample(sampler: str, scale: float, repeats: int, min_s: float) -> float:
    torch.manual_seed(0)
    # The digits recipe's backbone (configs/backbone/tiny.yaml) at 8x8: what the demo sweeps.
    model = UNet(in_channels=1, resolution=8, num_classes=10, ch=24, ch_mult=(1, 2)).eval()
    steps = {"ddim": 25, "dpmpp2m": 15, "ddpm": 250}[sampler]
    smp = build_sampler(sampler, SCHEDULE, steps, eta=1.0 if sampler == "ddpm" else 0.0)
    labels = torch.arange(250) % 10
    run = lambda: generate(model, smp, (1, 8, 8), labels, scale, 0, 250, torch.device("cpu"))
    return _median_rate(run, len(labels), repeats, min_s)


def bench_inception(n: int) -> tuple[float, str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inception import _find_weights
    from bench_inception import bench as inception_rate

    weights = _find_weights(None)
    return inception_rate(weights, "cpu", n, 16), ("real" if weights else "random-init")  # eval's auto batch on CPU


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/bench.json")
    ap.add_argument("--compare", default=None, help="a previous record (default: the existing --out file)")
    ap.add_argument("--quick", action="store_true", help="1 repeat of 1 s each, 32 Inception images")
    args = ap.parse_args()
    repeats, min_s = (1, 1.0) if args.quick else (3, 3.0)
    out = Path(args.out)
    prev_path = Path(args.compare) if args.compare else out
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else None

    rec: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
                 "train_img_per_s": {}, "sample_per_s": {}}
    sgemm = [sgemm_gflops()]
    for size in TRAIN_SIZES:
        rec["train_img_per_s"][size] = round(bench_train(size, repeats, min_s), 2)
        print(f"train {size}: {rec['train_img_per_s'][size]} img/s", flush=True)
    for sampler in ("ddim", "dpmpp2m", "ddpm"):
        for kind, scale in (("unguided", 1.0), ("guided", 3.0)):
            key = f"{sampler}/{kind}"
            rec["sample_per_s"][key] = round(bench_sample(sampler, scale, repeats, min_s), 1)
            print(f"sample {key}: {rec['sample_per_s'][key]} samples/s", flush=True)
    rate, kind = bench_inception(32 if args.quick else 96)
    rec["inception_img_per_s"], rec["inception_weights"] = round(rate, 2), kind
    print(f"inception ({kind} weights): {rec['inception_img_per_s']} img/s", flush=True)
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    sgemm.append(sgemm_gflops())
    rec["sgemm_gflops"] = round(statistics.mean(sgemm), 1)
    print(f"sgemm 2048^3: {sgemm[0]:.1f} GFLOP/s at the start, {sgemm[1]:.1f} at the end", flush=True)

    if prev is not None:
        def ratios(new, old):
            if isinstance(new, dict):
                return {k: ratios(v, old.get(k)) for k, v in new.items() if isinstance(old, dict) and k in old}
            return round(new / old, 3) if isinstance(new, (int, float)) and old else None

        rec["ratio_to_previous"] = {k: ratios(rec[k], prev.get(k)) for k in
                                    ("train_img_per_s", "sample_per_s", "inception_img_per_s", "peak_rss_mb")}
        if prev.get("sgemm_gflops"):  # speeds divided by how much faster the machine itself got
            machine = rec["sgemm_gflops"] / prev["sgemm_gflops"]
            per = lambda r: ({k: per(v) for k, v in r.items()} if isinstance(r, dict)
                             else None if r is None else round(r / machine, 3))
            rec["ratio_to_previous_per_sgemm"] = {k: per(v) for k, v in rec["ratio_to_previous"].items()
                                                  if k != "peak_rss_mb"}
        rec["previous"] = {"when": prev.get("when"), "path": str(prev_path)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
