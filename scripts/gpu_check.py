"""GPU readiness in one command (`make gpu-check`); needs CUDA, says so in one line otherwise.

1. ``pytest -m gpu`` (bf16 training/sampling, CUDA generators).
2. Training-step throughput of the CIFAR-10 recipe (DDPM U-Net, batch 128, bf16) eager,
   compiled, and compiled + channels_last: img/s, peak memory and model FLOP utilisation
   (FLOPs of one training step counted by torch.utils.flop_counter on the model; peak =
   the device's dense bf16 rating below).
3. `cfgx train dataset=cifar10` for a few hundred steps with the defaults (bf16,
   train.compile=auto), then a sweep at s = 0, 1, 3 with 2k samples; prints the table.

Usage: python scripts/gpu_check.py [--steps N] [--peak-tflops X] [key=value ...]
(extra key=value overrides go to step 3, e.g. dataset.root=/data). Under 10 minutes on one H100.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; matched by substring.
BF16_PEAK_TFLOPS = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
]


def bf16_peak_tflops(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def train_step_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward of ``model`` on this batch, as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, y).float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def cifar_model_and_batch(batch: int, device: torch.device):
    from cfgx.backbones import build_backbone
    from cfgx.config import compose
    from cfgx.data import DatasetBundle

    cfg = compose(["dataset=cifar10"])
    shape = (3, 32, 32)
    # Only the shapes matter for speed; no dataset files are needed for this part.
    bundle = DatasetBundle("cifar10", None, None, 10, shape, [str(i) for i in range(10)])  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_backbone(cfg.backbone, bundle).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *shape, generator=g, device=device)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, 11, (batch,), generator=g, device=device)
    return model, x, t, y


def time_train_steps(compiled: bool, channels_last: bool, steps: int, batch: int, device: torch.device) -> dict:
    model, x, t, y = cifar_model_and_batch(batch, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, x = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    flops = train_step_flops(model, x, t, y)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x, t, y).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"img_s": steps * batch / secs, "flops_per_step": flops, "step_s": secs / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of the CIFAR recipe run (step 3)")
    ap.add_argument("--bench-steps", type=int, default=50, help="timed steps per variant (step 2)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of this GPU, if not in the table")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device and this machine has none; run make gpu-check on a GPU machine",
              file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = a.peak_tflops or bf16_peak_tflops(name)
    print(f"== {name}, torch {torch.__version__}, bf16 peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    failures = []

    print("== 1. pytest -m gpu", flush=True)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests")], cwd=REPO)
    if r.returncode:
        failures.append("pytest -m gpu")

    print("== 2. CIFAR-10 DDPM U-Net training step, batch 128, bf16 autocast", flush=True)
    print(f"{'variant':<26}{'img/s':>9}{'step ms':>9}{'peak GiB':>10}{'MFU':>8}{'warm-up s':>11}")
    for label, comp, cl in (("eager", False, False), ("compile", True, False), ("compile + channels_last", True, True)):
        m = time_train_steps(comp, cl, a.bench_steps, 128, dev)
        mfu = m["flops_per_step"] / m["step_s"] / (peak * 1e12) if peak else None
        print(f"{label:<26}{m['img_s']:>9.0f}{m['step_s'] * 1e3:>9.1f}{m['peak_gib']:>10.2f}"
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>8}{m['warmup_s']:>11.1f}", flush=True)
        if label == "eager":
            print(f"  (model FLOPs per training image: {m['flops_per_step'] / 128 / 1e9:.2f} GFLOP fwd+bwd)")

    print(f"== 3. cfgx train dataset=cifar10, {a.steps} steps (defaults: bf16, train.compile=auto), "
          "then s = 0, 1, 3 with 2000 samples", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cfgx", "train", "dataset=cifar10", f"train.steps={a.steps}",
               "train.log_every=50", f"train.ckpt_every={a.steps}", "train.resume=false", "guidance=0,1,3",
               "eval.num_samples=2000", "eval.batch_size=500", f"paths.runs={tmp}", *a.overrides]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t0
        if r.returncode:
            failures.append("cfgx train dataset=cifar10 (see its one-line error above)")
        else:
            run = next(Path(tmp).glob("cifar10/*/meta.json")).parent
            log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            steady = [e["img_per_s"] for e in log[1:]] or [log[-1]["img_per_s"]]
            print(f"train: {sorted(steady)[len(steady) // 2]:.0f} img/s steady (median of logged intervals after the "
                  f"first, which includes compilation); final loss {log[-1]['loss']:.4f}; whole command {wall:.0f}s")
    if failures:
        print(f"gpu-check: FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    print("gpu-check: all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
