"""Evaluating a trained run at a list of guidance scales.

For each scale: draw ``eval.num_samples`` samples with paired seeds, score them,
write the row atomically (so an interrupted sweep resumes at the missing
scales), and draw a sample grid. Then merge every row of the run into
metrics.csv/.json/.md and print the key columns.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx.config import config_hash
from cfgx.data import DatasetBundle, stack_dataset, to_uint8
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.metrics.classifier import classifier_metrics
from cfgx.metrics.eval_classifier import classify, get_eval_classifier
from cfgx.report import console_table, write_tables
from cfgx.runs import atomic_write_json, device_name, versions
from cfgx.sample import balanced_labels, generate


def scale_tag(s: float) -> str:
    return ("%g" % s).replace("-", "m").replace(".", "p")


def row_key(method: str, postprocess: str, sampler: str, steps: int, eta: float, n: int, seed: int,
            ckpt_step: int, scale: float) -> str:
    """File name of a row: every choice that changes the samples is in it."""
    return (f"{method}-{postprocess}-{sampler}{steps}-eta{scale_tag(eta)}-n{n}-seed{seed}-"
            f"step{ckpt_step}-s{scale_tag(scale)}")


def save_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int, path: Path) -> torch.Tensor:
    """Rows = classes, columns = the first ``per_class`` samples of each class (same seeds at every s)."""
    import torchvision

    idx = []
    for c in range(num_classes):
        ids = (y == c).nonzero().flatten()[:per_class].tolist()
        idx += ids + [ids[-1]] * (per_class - len(ids)) if ids else []
    imgs = to_uint8(x[idx]).float() / 255.0
    scale = max(1, 64 // x.shape[-1])  # make 8 px digits visible
    if scale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(imgs, nrow=per_class, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, str(path))
    return grid


def save_side_by_side(grids: dict[float, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(grids)
    fig, axes = plt.subplots(1, len(scales), figsize=(3.2 * len(scales), 3.6), squeeze=False)
    for ax, s in zip(axes[0], scales):
        ax.imshow(grids[s].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"s = {s:g}  (w = {s - 1:g})")
        ax.axis("off")
    fig.suptitle("Same seeds at every guidance scale; rows are classes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_rows(run_dir: Path) -> list[dict]:
    rows = []
    for p in sorted((Path(run_dir) / "sweep" / "rows").glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue  # a row is written atomically, so this is a foreign file; skip it
    return rows


def run_sweep(cfg: DictConfig, run_dir: Path, data: DatasetBundle, model: torch.nn.Module, ckpt_step: int,
              device: torch.device, console=None) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every scale in ``cfg.guidance.scales``; returns this sweep's rows."""
    ec = cfg.eval
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    sampler = build_sampler(cfg.sampler.name, schedule, int(cfg.sampler.steps), float(cfg.sampler.eta),
                            clip_x0=data.clip)
    n, seed, bs = int(ec.num_samples), int(ec.seed), int(ec.batch_size)
    labels = balanced_labels(n, data.num_classes)
    method = str(cfg.guidance.method)
    postprocess = str(cfg.postprocess.name)
    cfg_hash = config_hash(cfg)
    vers = versions()
    dev_name = device_name(device)
    use_bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")

    clf, clf_info = get_eval_classifier(data, OmegaConf.to_container(cfg.dataset, resolve=True),
                                        OmegaConf.to_container(ec.classifier, resolve=True),
                                        cfg.paths.cache, device, console)
    real_x, _ = stack_dataset(data.train)
    real_feats, _ = classify(clf, real_x, device)

    rows_dir = Path(run_dir) / "sweep" / "rows"
    grids: dict[float, torch.Tensor] = {}
    rows = []
    for s in [float(v) for v in cfg.guidance.scales]:
        key = row_key(method, postprocess, sampler.name, sampler.steps, sampler.eta, n, seed, ckpt_step, s)
        row_path = rows_dir / f"{key}.json"
        grid_path = Path(run_dir) / "sweep" / "grids" / f"{key}.png"
        if row_path.is_file() and not bool(ec.overwrite):
            rows.append(json.loads(row_path.read_text()))
            _say(console, f"s={s:g}: already in the table ({row_path.name}); eval.overwrite=true recomputes")
            continue
        batch = generate(model, sampler, data.shape, labels, s, seed, bs, device, method=method,
                         autocast_bf16=use_bf16)
        t_metrics = time.perf_counter()
        feats, logits = classify(clf, batch.x, device)
        metrics = classifier_metrics(feats, logits, batch.y, real_feats)
        row: dict[str, Any] = {
            "s": s, "w_ho": s - 1.0, "method": method, "postprocess": postprocess,
            **{k: _clean(v) for k, v in metrics.items()},
            "sampler": sampler.name, "steps": len(sampler.timesteps), "eta": sampler.eta,
            "nfe": batch.nfe, "num_samples": n, "seed": seed,
            "seconds": round(batch.seconds, 3), "samples_per_s": round(n / batch.seconds, 2),
            "metric_seconds": round(time.perf_counter() - t_metrics, 3),
            "checkpoint_step": ckpt_step, "extractor": f"eval_classifier:{clf_info['key']}",
            "eval_classifier_acc": round(clf_info["held_out_accuracy"], 4),
            "real_reference": f"{data.name}:train ({len(real_x)})",
            "config_hash": cfg_hash, "device": dev_name,
            "cfgx": vers.get("cfgx"), "torch": vers.get("torch"), "torchmetrics": vers.get("torchmetrics"),
        }
        atomic_write_json(row_path, row)
        rows.append(row)
        _say(console, f"s={s:g}: acc {row['accuracy']:.3f}  FD(clf) {row['fd_classifier']:.3g}  "
                      f"{row['samples_per_s']:.0f} samples/s")
        if data.is_image:
            grids[s] = save_grid(batch.x, batch.y, data.num_classes, int(ec.grid_per_class), grid_path)
    if data.is_image and grids:
        tag = hashlib.sha256(json.dumps(sorted(grids)).encode()).hexdigest()[:6]
        save_side_by_side(grids, Path(run_dir) / "sweep" / f"grids_{method}_{sampler.name}_{tag}.png")
        save_side_by_side(grids, Path(run_dir) / "samples.png")
    write_tables(load_rows(run_dir), Path(run_dir))
    if console is not None:
        console.print(console_table(rows, title=f"{data.name}: {method} guidance, {sampler.name} "
                                                f"{len(sampler.timesteps)} steps, {n} samples/scale"))
        console.print(f"wrote {run_dir}/metrics.csv, metrics.json, metrics.md, samples.png")
    return rows


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)
