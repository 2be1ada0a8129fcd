"""Training checkpoints and EMA weights on disk: every save and load of a model's weights.

``last.pt`` (``CKPT_NAME``) holds everything a training loop needs to continue bit-exactly:
``training_state`` writes its common part (model, EMA, optimizer, scheduler, step; the caller adds
RNG states), ``restore_training_state`` reads it back. The EMA is an ``AveragedModel``
(``make_ema``); ``ema_weights`` puts saved EMA weights into a freshly built network, which is how
``load_ema_model`` (a run's last checkpoint), ``load_snapshot_model`` and the flow postprocessor
get the network they sample with.

``train.snapshot_every=K`` keeps ``checkpoints/snapshots/ema_<step>.pt`` every K steps: the EMA
weights as a plain state_dict of tensors and the step, nothing else (no optimizer, no RNG), so a
snapshot is small and loads through ``safe_load`` like every other weights file. They serve checkpoint sweeps
(``cfgx sweep checkpoint=all``: does the best s drift as training goes on?) and autoguidance's
``guide=step:N`` (an earlier, worse version of the same model).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cfgx.backbones import build_backbone
from cfgx.data.base import DatasetBundle
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.pretrained.load import verify_weights
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.reader import weights_blob
from cfgx.store.rundir import CKPT_NAME
from cfgx.store.safeload import safe_load

SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"ema_(\d+)\.pt")


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers (a deep copy)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def ema_weights(net: nn.Module, ema_state: dict[str, Any]) -> nn.Module:
    """A copy of the freshly built ``net`` holding the saved EMA weights ``ema_state``.

    ``ema_state`` is an ``AveragedModel.state_dict()`` (``module.*`` keys and ``n_averaged``);
    a mismatch raises the ``RuntimeError`` of ``load_state_dict`` for the caller to word.
    """
    ema = make_ema(net, 0.0)
    ema.load_state_dict(ema_state)
    return ema.module


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """A training checkpoint (or any cfgx training blob), loaded weights-only, its structure checked."""
    fix = "delete it to restart training from scratch"
    return weights_blob(safe_load(path, map_location, fix=fix), Path(path), fix)


def training_state(model: nn.Module, ema: AveragedModel, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, step: int, **extra: Any) -> dict[str, Any]:
    """What a checkpoint holds to continue training: model, EMA, optimizer, scheduler, step, then ``extra``."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": step, **extra}


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, ema: AveragedModel,
                           opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                           mismatch: str | None = None) -> int:
    """Load a ``training_state`` checkpoint into the training objects; returns its step.

    With ``mismatch``, weights that do not fit ``model`` are a one-line CfgxError saying so.
    """
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError, TypeError, AttributeError, ValueError):
        if mismatch is None:
            raise
        raise CfgxError(mismatch) from None
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"])


def load_ema_model(run_dir: Path, cfg: DictConfig, data: DatasetBundle, schedule: NoiseSchedule,
                   device: torch.device) -> tuple[nn.Module, int]:
    """The EMA weights of a run's last checkpoint, ready for sampling; and its step."""
    model = build_backbone(cfg.backbone, data, schedule)
    if cfg.backbone.name == "pretrained":  # imported: no checkpoint; its files must still be the imported ones
        model.weights_sha256 = verify_weights(run_dir, cfg.backbone)
        return model.to(device).eval(), 0
    if cfg.backbone.name == "exact":  # nothing trained: the model is its own weights
        return model.to(device).eval(), 0
    path = Path(run_dir) / "checkpoints" / CKPT_NAME
    if not path.is_file():
        raise CfgxError(f"no checkpoint in {run_dir}/checkpoints/; finish training first by re-running "
                        "'cfgx train' with the same options")
    ckpt = load_checkpoint(path)
    try:
        net = ema_weights(model, ckpt["ema"])
    except (KeyError, RuntimeError, TypeError, AttributeError, ValueError) as e:
        raise CfgxError(f"checkpoint {path} does not match the run's backbone config ({type(e).__name__}); "
                        "the run dir was edited or the checkpoint corrupted") from None
    return net.to(device).eval(), int(ckpt["step"])


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / SNAPSHOT_DIR / f"ema_{int(step):08d}.pt"


def save_snapshot(run_dir: Path, step: int, ema_state: dict[str, torch.Tensor]) -> Path:
    """Write the EMA state (tensors only, on CPU) of ``step``; atomic, so a crash leaves no half file."""
    path = snapshot_path(run_dir, step)
    atomic_torch_save(path, {"ema": {k: v.detach().cpu().clone() for k, v in ema_state.items()},
                             "step": torch.tensor(int(step))})
    return path


def snapshot_steps(run_dir: Path) -> list[int]:
    d = Path(run_dir) / "checkpoints" / SNAPSHOT_DIR
    steps = [int(m.group(1)) for p in d.glob("ema_*.pt") if (m := _NAME.fullmatch(p.name))]
    return sorted(steps)


def last_step(run_dir: Path) -> int | None:
    """Step of ``last.pt`` (None for runs without one, e.g. exact toy models)."""
    path = Path(run_dir) / "checkpoints" / CKPT_NAME
    if not path.is_file():
        return None
    return int(load_checkpoint(path)["step"])


def parse_checkpoints(spec: str, run_dir: Path) -> list[int | None]:
    """``checkpoint=all|last|STEP[,STEP...]`` -> steps to sweep, None meaning last.pt.

    ``all`` is every snapshot plus last.pt (once, if a snapshot has the same step). A step with
    no snapshot (and not last.pt's step) is one line naming the steps that exist.
    """
    spec = str(spec).strip().strip("[]")
    if spec in ("", "last"):  # the default sweep: no need to open last.pt just to learn its step
        return [None]
    have = snapshot_steps(run_dir)
    final = last_step(run_dir)
    if spec == "all":
        return [s for s in have if s != final] + [None]
    out: list[int | None] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "last":
            out.append(None)
            continue
        try:
            step = int(part)
        except ValueError:
            raise CfgxError(f"checkpoint={part!r} is not a step; use checkpoint=all, last or steps like "
                            "checkpoint=250,500") from None
        if step == final:
            out.append(None)
        elif step in have:
            out.append(step)
        else:
            raise CfgxError(f"{run_dir} has no snapshot at step {step}; snapshots: "
                            f"{', '.join(map(str, have)) or 'none'} (train with train.snapshot_every=K to keep "
                            f"them), last.pt: {final}")
    return list(dict.fromkeys(out))


def load_snapshot_model(run_dir: Path, cfg: DictConfig, data: DatasetBundle, schedule: NoiseSchedule,
                        device: torch.device, step: int) -> nn.Module:
    """The EMA weights of snapshot ``step`` in the run's backbone, ready for sampling."""
    path = snapshot_path(run_dir, step)
    if not path.is_file():
        have = snapshot_steps(run_dir)
        raise CfgxError(f"{run_dir} has no snapshot at step {step}; snapshots: {', '.join(map(str, have)) or 'none'}"
                        " (train with train.snapshot_every=K to keep them)")
    blob = weights_blob(safe_load(path, fix="delete it"), path, "delete it")  # crafted or broken: one line
    try:
        net = ema_weights(build_backbone(cfg.backbone, data, schedule), blob["ema"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise CfgxError(f"snapshot {path} is unreadable or does not match the run's backbone "
                        f"({type(e).__name__}); delete it") from None
    return net.to(device).eval()
