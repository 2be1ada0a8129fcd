"""The guidance classifier p_phi(c | x_t, t) for classifier guidance (``guidance.method=classifier``).

Classifier guidance (Dhariwal & Nichol 2021) adds s * grad log p_phi(c | x_t) to an
unconditional denoiser, so it needs a classifier of *noisy* inputs at every t.
Zhao & Schwing 2025, "Studying Classifier(-Free) Guidance From a Classifier-Centric
Perspective" (arXiv 2503.10638), show that what CG does to the samples depends
strongly on which classifier guides; cfgx therefore trains one per run, cached in
the run dir, and reports its held-out accuracy across noise levels.

For images: a time-conditioned encoder of the U-Net family (the same ResBlocks
with scale-and-shift time conditioning, stride-2 downsampling, global pooling).
For toy vector data: ``MLPNoisyClassifier``. This classifier is never the
evaluation classifier (``cfgx.metrics.eval_classifier``): separate weights, a
separate training run, and it sees noised inputs while the evaluator sees clean ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cfgx.backbones.toy_classifiers import MLPNoisyClassifier, train_noisy_classifier
from cfgx.backbones.unet import ResBlock, _norm, timestep_embedding
from cfgx.console import say
from cfgx.cpu import torch_threads
from cfgx.data.base import DatasetBundle, stack_dataset
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.store.cached import UNREADABLE, load_or_make

VERSION = "guideclf-v1"
CACHE_NAME = "guidance_classifier.pt"
# Noise levels (as fractions of T) the held-out accuracy is reported at: t in {0, 250, 500, 750} for T=1000.
EVAL_FRACTIONS = (0.0, 0.25, 0.5, 0.75)

# Sized for 8x8 digits on 2 CPU cores (well under a minute); raise width/steps for larger images.
IMAGE_DEFAULTS: dict[str, Any] = {"width": 16, "steps": 1000, "batch_size": 128, "lr": 2e-3,
                                  "weight_decay": 1e-4, "val_fraction": 0.1, "seed": 0}
TOY_DEFAULTS: dict[str, Any] = {"hidden": 64, "steps": 1000, "batch_size": 256, "lr": 1e-2,
                                "val_fraction": 0.1, "seed": 0}


class NoisyImageClassifier(nn.Module):
    """logits = classifier(x_t, t): a U-Net-style encoder whose ResBlocks are modulated by t.

    One ResBlock per resolution, doubling channels at each stride-2 downsampling until
    the feature map is 4x4 or smaller, then GroupNorm-SiLU, global average pool and a
    linear head. No class input: it models p(c | x_t, t), not a conditional denoiser.
    """

    def __init__(self, in_channels: int, resolution: int, num_classes: int, width: int = 32,
                 num_steps: int = 1000) -> None:
        super().__init__()
        if resolution < 1 or width < 4:
            raise ValueError(f"NoisyImageClassifier needs resolution >= 1 and width >= 4, got "
                             f"{resolution}, {width}")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.width, self.num_steps = width, num_steps
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        cur, res = width, resolution
        while True:
            nxt = cur if res == resolution else 2 * cur
            self.blocks.append(ResBlock(cur, nxt, emb_dim, 0.0))
            cur = nxt
            if res <= 4:
                break
            self.downs.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
            res = (res + 1) // 2
        self.out_norm = _norm(cur)
        self.feature_dim = cur
        self.head = nn.Linear(cur, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Raw integer t into the sinusoidal embedding, exactly as the U-Net denoiser does.
        emb = self.time_mlp(timestep_embedding(t.reshape(-1), self.width))
        h = self.conv_in(x_t)
        for i, blk in enumerate(self.blocks):
            h = blk(h, emb)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))
        return self.head(h)


def _small_cpu_threads(device: torch.device, resolution: int):
    """One intra-op thread for small inputs on CPU (toy vectors: resolution 0); see cfgx.cpu."""
    return torch_threads(1 if device.type == "cpu" and resolution <= 16 else None)


def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """A seeded hold-out split (the last ``fraction`` of a permutation)."""
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(len(y), generator=g)
    k = min(max(int(round(fraction * len(y))), 1), len(y) - 1)
    return (x[perm[k:]], y[perm[k:]]), (x[perm[:k]], y[perm[:k]])


@torch.no_grad()
def noisy_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, schedule: NoiseSchedule,
                   device: torch.device | str, seed: int = 0, batch: int = 512) -> dict[str, float]:
    """Accuracy on ``x`` noised to t = f*T for f in EVAL_FRACTIONS, keyed by str(t); fixed noise per seed."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed + 1_000_003)
    noise = torch.randn(x.shape, generator=g)
    out = {}
    for frac in EVAL_FRACTIONS:
        t_val = min(int(round(frac * schedule.num_steps)), schedule.num_steps - 1)
        correct = 0
        for i in range(0, len(y), batch):
            xb = x[i:i + batch].float()
            t = torch.full((len(xb),), t_val, dtype=torch.long)
            x_t = schedule.q_sample(xb, t, noise[i:i + batch])
            pred = model(x_t.to(device), t.to(device)).argmax(1).cpu()
            correct += int((pred == y[i:i + batch]).sum())
        out[str(t_val)] = round(correct / len(y), 4)
    model.train(was_training)
    return out


def train_noisy_image_classifier(model: NoisyImageClassifier, x: torch.Tensor, y: torch.Tensor,
                                 schedule: NoiseSchedule, device: torch.device | str, steps: int = 1000,
                                 batch_size: int = 128, lr: float = 2e-3, seed: int = 0, console=None, *,
                                 val: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 val_fraction: float = 0.1, weight_decay: float = 1e-4) -> dict[str, Any]:
    """Train ``model`` (in place) on noised images for classifier guidance; returns an info dict.

    ``x`` is in the model range [-1, 1]. Each step draws a batch, t ~ U{0..T-1} and
    eps ~ N(0, I), forms x_t = q_sample(x, t, eps) -- the same marginal the sampler's
    x_t follows -- and minimises cross-entropy (AdamW, cosine decay). All batch, t and
    noise draws come from one generator seeded by ``seed``, so a seed and an
    initialisation reproduce the weights. The held-out accuracy at t in
    {0, 250, 500, 750} (for T=1000) is measured on ``val`` or, if None, on a seeded
    ``val_fraction`` split of (x, y) that is then excluded from training.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError("train_noisy_image_classifier needs matching (x, y) with at least 2 examples")
    x, y = x.float().cpu(), y.long().cpu()
    if val is None:
        (x, y), val = _split(x, y, val_fraction, seed)
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    x_dev, y_dev = x.to(device), y.to(device)
    with _small_cpu_threads(device, int(x.shape[-1])):
        ema_loss, seconds = _fit(model, opt, sched, x_dev, y_dev, schedule, g, steps, batch_size, console)
        model.eval()
        acc = noisy_accuracy(model, val[0].float().cpu(), val[1].long().cpu(), schedule, device, seed)
    return {"val_accuracy": acc, "final_loss": round(ema_loss, 4), "steps": steps,
            "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": len(y), "n_val": len(val[1]),
            "chance": round(1.0 / getattr(model, "num_classes", int(y.max()) + 1), 4),
            "train_seconds": round(seconds, 2)}


def _fit(model: nn.Module, opt: torch.optim.Optimizer, sched, x: torch.Tensor, y: torch.Tensor,
         schedule: NoiseSchedule, g: torch.Generator, steps: int, batch_size: int,
         console) -> tuple[float, float]:
    """The training loop proper; returns (smoothed final loss, seconds)."""
    device = x.device
    t0 = time.perf_counter()
    ema_loss = float("nan")
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        t = torch.randint(0, schedule.num_steps, (batch_size,), generator=g)
        noise = torch.randn((batch_size, *x.shape[1:]), generator=g)
        idx_d, t_d = idx.to(device), t.to(device)
        x_t = schedule.q_sample(x[idx_d], t_d, noise.to(device))
        loss = F.cross_entropy(model(x_t, t_d), y[idx_d])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        cur = loss.detach().item()
        ema_loss = cur if step == 0 else 0.95 * ema_loss + 0.05 * cur
        if (step + 1) % max(steps // 4, 1) == 0:
            say(console, f"  guidance classifier step {step + 1}/{steps}: loss {ema_loss:.3f}")
    return ema_loss, time.perf_counter() - t0


def _resolved_config(data: DatasetBundle, ccfg: dict | None) -> dict[str, Any]:
    defaults = IMAGE_DEFAULTS if data.is_image else TOY_DEFAULTS
    ccfg = dict(ccfg or {})
    unknown = set(ccfg) - set(defaults)
    if unknown:
        raise CfgxError(f"unknown guidance classifier option(s) {sorted(unknown)} for "
                        f"{'image' if data.is_image else 'toy'} data; valid: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in ccfg.items() if v is not None}}


def _cache_key(data: DatasetBundle, schedule: NoiseSchedule, cfg: dict[str, Any]) -> str:
    # The schedule is part of the key: the classifier learned p(c | x_t) under *these* noise levels.
    parts = {"v": VERSION, "dataset": data.name, "shape": list(data.shape), "classes": data.num_classes,
             "image": data.is_image, "n_train": len(data.train), "classifier": cfg,
             "schedule": [schedule.kind, schedule.num_steps, round(float(schedule.betas[0]), 10),
                          round(float(schedule.betas[-1]), 10)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(data: DatasetBundle, schedule: NoiseSchedule, cfg: dict[str, Any]) -> nn.Module:
    if data.is_image:
        return NoisyImageClassifier(data.shape[0], data.shape[-1], data.num_classes, int(cfg["width"]),
                                    schedule.num_steps)
    return MLPNoisyClassifier(int(data.shape[0]), data.num_classes, hidden=int(cfg["hidden"]),
                              num_steps=schedule.num_steps)


def _train(data: DatasetBundle, schedule: NoiseSchedule, cfg: dict[str, Any], device: torch.device,
           console) -> tuple[nn.Module, dict[str, Any]]:
    seed = int(cfg["seed"])
    # Seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(data, schedule, cfg)
    x, y = stack_dataset(data.train)
    if data.is_image:
        val = stack_dataset(data.test) if data.test is not None else None
        info = train_noisy_image_classifier(model, x, y, schedule, device, int(cfg["steps"]),
                                            int(cfg["batch_size"]), float(cfg["lr"]), seed, console, val=val,
                                            val_fraction=float(cfg["val_fraction"]),
                                            weight_decay=float(cfg["weight_decay"]))
        return model, info
    if data.test is not None:
        (xtr, ytr), (xva, yva) = (x, y), stack_dataset(data.test)
    else:
        (xtr, ytr), (xva, yva) = _split(x, y, float(cfg["val_fraction"]), seed)
    model.to(device)
    t0 = time.perf_counter()
    with _small_cpu_threads(device, 0):
        train_noisy_classifier(model, (xtr.float(), ytr.long()), schedule, steps=int(cfg["steps"]),
                               batch=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                               generator=torch.Generator().manual_seed(seed))
        acc = noisy_accuracy(model, xva.float(), yva.long(), schedule, device, seed)
    info = {"val_accuracy": acc,
            "steps": int(cfg["steps"]), "batch_size": int(cfg["batch_size"]), "lr": float(cfg["lr"]),
            "seed": seed, "n_train": len(ytr), "n_val": len(yva), "chance": round(1.0 / data.num_classes, 4),
            "train_seconds": round(time.perf_counter() - t0, 2)}
    return model, info


def get_guidance_classifier(run_dir: Path, data: DatasetBundle, schedule: NoiseSchedule,
                            device: torch.device | str, ccfg: dict | None = None,
                            console=None) -> tuple[nn.Module, dict[str, Any]]:
    """The run's guidance classifier, loaded from ``run_dir/guidance_classifier.pt`` or trained and cached.

    ``ccfg`` overrides the defaults (``IMAGE_DEFAULTS`` for image data, ``TOY_DEFAULTS``
    for toy vector data, where an ``MLPNoisyClassifier`` is used). The cache is keyed
    by the resolved options, the dataset and the noise schedule; a missing, unreadable
    or stale file is retrained and replaced atomically. Returns the classifier in eval
    mode on ``device`` with parameters frozen (guidance differentiates w.r.t. x_t only)
    and an info dict (``val_accuracy`` per t, ``key``, ``cached``).
    """
    cfg = _resolved_config(data, ccfg)
    key = _cache_key(data, schedule, cfg)
    path = Path(run_dir) / CACHE_NAME
    device = torch.device(device)

    def load(blob: dict) -> tuple[nn.Module, dict[str, Any]] | None:
        if blob.get("key") != key:
            say(console, f"guidance classifier at {path} was trained with other options; retraining")
            return None
        model = _build(data, schedule, blob["config"])
        model.load_state_dict(blob["state"])
        model.to(device).eval().requires_grad_(False)
        return model, {**blob["info"], "cached": True}

    def make() -> tuple[tuple[nn.Module, dict[str, Any]], dict[str, Any]]:
        kind = "image encoder" if data.is_image else "MLP"
        say(console, f"training the guidance classifier ({kind}, {cfg['steps']} steps) for {data.name}")
        model, info = _train(data, schedule, cfg, device, console)
        info = {**info, "key": key, "version": VERSION, "config": cfg, "path": str(path),
                "architecture": type(model).__name__}
        blob = {"key": key, "config": cfg, "info": info,
                "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        model.to(device).eval().requires_grad_(False)
        accs = ", ".join(f"t={t}: {a:.2f}" for t, a in info["val_accuracy"].items())
        say(console, f"guidance classifier held-out accuracy {accs} (chance {info['chance']:.2f})")
        return (model, {**info, "cached": False}), blob

    return load_or_make(path, load, make, lock=Path(run_dir) / f".{CACHE_NAME}.lock",
                        what=f"the guidance classifier {path}", console=console,
                        unreadable=f"[yellow]guidance classifier cache {path} unreadable; retraining",
                        errors=(*UNREADABLE, AttributeError))
