"""Benchmark: FID Inception-v3 feature throughput (img/s) for 32x32 uint8 images.

Uses the real weights when found (--weights, $CFGX_SHARED_DATA, ../shared/data,
or the torch hub cache), else a random-init network of the same architecture:
throughput does not depend on the weight values. Runs on CPU, and on CUDA too
when available. Measures cfgx's extractor (BatchNorm folded, NHWC, at --batch) and,
alternating with it, torch-fidelity's network as it ships at --plain-batch (what
cfgx ran before), so the printed ratio is a side-by-side one.

    python scripts/bench_inception.py [--n 64] [--batch 16] [--plain-batch 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from cfgx.errors import CfgxError
from cfgx.metrics.inception import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_FILENAME,
    FeatureExtractor,
    _fidelity_inception,
    resolve_weights_path,
    speed_up_for_inference,
)
from cfgx.store.safeload import safe_load


class _RandomInitInception(FeatureExtractorInceptionV3):
    """Same network, weights left at their random init (torch-fidelity always loads a state dict)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def _find_weights(explicit: str | None) -> Path | None:
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    shared = os.environ.get("CFGX_SHARED_DATA")
    base = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared" / "data"
    candidates.append(base / "inception" / INCEPTION_WEIGHTS_FILENAME)
    for c in candidates:
        if c.is_file():
            return c
    try:
        return resolve_weights_path(None)
    except CfgxError:
        return None


def _torch_fidelity_net(weights: Path | None) -> FeatureExtractorInceptionV3:
    """torch-fidelity's network as it ships (BatchNorm unfolded, NCHW); random init without weights."""
    if weights is not None:  # read once through the safe loader, never a path handed to torch-fidelity
        return _fidelity_inception(safe_load(weights)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity always loads a state dict: hand it an empty one
        path = Path(tmp) / "empty.pth"
        torch.save({}, path)
        return _RandomInitInception(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                    feature_extractor_weights_path=str(path)).eval()


def _extractor(weights: Path | None, device: str, batch: int) -> FeatureExtractor:
    if weights is not None:
        return FeatureExtractor.inception(weights, device=device, batch_size=batch)
    return FeatureExtractor(speed_up_for_inference(_torch_fidelity_net(None)), name=INCEPTION_NAME + "-random",
                            device=device, batch_size=batch)


def _plain_extractor(weights: Path | None, device: str, batch: int) -> FeatureExtractor:
    """torch-fidelity's network untouched: the before of the ratio."""
    return FeatureExtractor(_torch_fidelity_net(weights), name=INCEPTION_NAME + "-plain", device=device,
                            batch_size=batch)


def bench(weights: Path | None, device: str, n: int, batch: int, plain: bool = False) -> float:
    ext = (_plain_extractor if plain else _extractor)(weights, device, batch)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    ext(images[:batch])  # warm-up: allocator, cuDNN autotuning, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ext(images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images timed per device (after one warm-up batch)")
    ap.add_argument("--batch", type=int, default=16, help="cfgx's batch (eval.inception_batch_size=auto on CPU)")
    ap.add_argument("--plain-batch", type=int, default=64, help="batch of the plain network (cfgx's old default)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are printed")
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--weights", default=None, help="path to " + INCEPTION_WEIGHTS_FILENAME)
    args = ap.parse_args()

    weights = _find_weights(args.weights)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(
        f"weights: {weights if weights else 'random init (real weights not found)'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for device in devices:
        n = args.n if device == "cpu" else max(args.n, 2048)
        fast, plain = [], []
        for _ in range(args.rounds):
            fast.append(bench(weights, device, n, args.batch))
            plain.append(bench(weights, device, n, args.plain_batch, plain=True))
        f, p = statistics.median(fast), statistics.median(plain)
        print(f"inception: {f:.2f} img/s ({device}, batch {args.batch}); torch-fidelity's net as shipped "
              f"(batch {args.plain_batch}): {p:.2f} img/s; ratio {f / p:.2f}x")


if __name__ == "__main__":
    main()
