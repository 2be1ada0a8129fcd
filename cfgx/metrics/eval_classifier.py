"""The evaluation classifier: a small CNN trained once per dataset on the real training split.

It scores samples (class accuracy, Fréchet distance in its features, diversity,
decision-boundary statistics) and is cached under ``<paths.cache>/eval_classifier``
so every run and sweep of a dataset uses the same one. It is independent of
anything used for guidance: cfgx never guides with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cfgx.console import say
from cfgx.data import DatasetBundle, stack_dataset
from cfgx.errors import CfgxError
from cfgx.locks import locked
from cfgx.runs import atomic_torch_save
from cfgx.safeload import UnreadableFileError, safe_load

VERSION = "evalcnn-v1"


class EvalCNN(nn.Module):
    """conv-conv-pool x2 (x3 from 32 px), global average pool -> features -> logits."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, res, w = in_channels, resolution, width
        while True:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(min(8, w // 4), w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(min(8, w // 4), w), nn.SiLU()]
            c = w
            if res <= 4:
                break
            layers.append(nn.AvgPool2d(2))
            res //= 2
            w *= 2
        self.body = nn.Sequential(*layers)
        self.feature_dim = c
        self.head = nn.Linear(c, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cache_key(data: DatasetBundle, dcfg: dict, ccfg: dict) -> str:
    parts = {"v": VERSION, "dataset": {k: dcfg.get(k) for k in ("name", "resolution", "split_seed", "root")},
             "classifier": ccfg, "shape": list(data.shape), "classes": data.num_classes}
    return f"{data.name}-{hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]}"


def _holdout(data: DatasetBundle) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = stack_dataset(data.train)
    if data.test is not None:
        return (x, y), stack_dataset(data.test)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    k = max(len(y) // 10, 1)
    return (x[perm[k:]], y[perm[k:]]), (x[perm[:k]], y[perm[:k]])


@torch.no_grad()
def classify(model: EvalCNN, x: torch.Tensor, device, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) on CPU, float32, computed in batches."""
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch].to(device))
        feats.append(f.float().cpu())
        logits.append(model.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def train_eval_classifier(data: DatasetBundle, ccfg: dict, device, seed: int = 0,
                          console=None) -> tuple[EvalCNN, float]:
    (xtr, ytr), (xte, yte) = _holdout(data)
    torch.manual_seed(seed)
    model = EvalCNN(data.shape[0], data.shape[-1], data.num_classes, int(ccfg["width"])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(ccfg["lr"]), weight_decay=1e-4)
    steps, bs = int(ccfg["steps"]), int(ccfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(ccfg["lr"]), total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = xtr.to(device), ytr.to(device)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (bs,), generator=g).to(device)
        x = xtr[idx]
        # Mild noise and shift augmentation: the classifier must also judge imperfect samples.
        x = x + 0.05 * torch.randn(x.shape, generator=g).to(device)
        sh = int(torch.randint(-1, 2, (1,), generator=g))
        x = torch.roll(x, shifts=sh, dims=-1)
        loss = F.cross_entropy(model(x), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    _, logits = classify(model, xte, device)
    acc = float((logits.argmax(1) == yte).float().mean())
    return model, acc


def get_eval_classifier(data: DatasetBundle, dcfg: dict, ccfg: dict, cache_root: str | Path, device,
                        console=None) -> tuple[EvalCNN, dict]:
    """Load the cached evaluation classifier for this dataset, or train and cache it (once: others wait)."""
    key = _cache_key(data, dcfg, ccfg)
    path = Path(cache_root).expanduser() / "eval_classifier" / f"{key}.pt"
    with locked(path.parent / f".{key}.lock", f"the evaluation classifier {path}", console):
        return _load_or_train(data, ccfg, device, key, path, console)


def _load_or_train(data: DatasetBundle, ccfg: dict, device, key: str, path: Path, console) -> tuple[EvalCNN, dict]:
    model = EvalCNN(data.shape[0], data.shape[-1], data.num_classes, int(ccfg["width"]))
    if path.is_file():
        try:
            # A crafted file (UnsafeFileError) propagates: refused, never retrained over silently.
            blob = safe_load(path)
            model.load_state_dict(blob["state"])
            return model.to(device).eval(), blob["info"]
        except (UnreadableFileError, KeyError, TypeError, RuntimeError):
            say(console, f"[yellow]cached evaluation classifier {path} unreadable; retraining")
    say(console, f"training the evaluation classifier for {data.name} (cached at {path})")
    model, acc = train_eval_classifier(data, ccfg, device, console=console)
    info = {"key": key, "held_out_accuracy": acc, "version": VERSION, "path": str(path),
            "feature_dim": model.feature_dim}
    if acc < 0.5:
        raise CfgxError(f"the evaluation classifier for {data.name} only reached {acc:.1%} held-out "
                        "accuracy; raise eval.classifier.steps")
    atomic_torch_save(path, {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "info": info})
    return model.eval(), info
