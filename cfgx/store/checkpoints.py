"""EMA-only training snapshots beside ``last.pt``, and choosing checkpoints to sweep.

``train.snapshot_every=K`` keeps ``checkpoints/snapshots/ema_<step>.pt`` every K steps: the EMA
weights as a plain state_dict of tensors and the step, nothing else (no optimizer, no RNG), so a
snapshot is small and loads with ``torch.load(weights_only=True)``. They serve checkpoint sweeps
(``cfgx sweep checkpoint=all``: does the best s drift as training goes on?) and autoguidance's
``guide=step:N`` (an earlier, worse version of the same model).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from cfgx.errors import CfgxError
from cfgx.store.rundir import CKPT_NAME, atomic_torch_save

SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"ema_(\d+)\.pt")


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
    from cfgx.train import load_checkpoint

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


def load_snapshot_model(run_dir: Path, cfg: DictConfig, data, schedule, device: torch.device,
                        step: int) -> torch.nn.Module:
    """The EMA weights of snapshot ``step`` in the run's backbone, ready for sampling."""
    from cfgx.backbones import build_backbone
    from cfgx.train import make_ema

    path = snapshot_path(run_dir, step)
    if not path.is_file():
        have = snapshot_steps(run_dir)
        raise CfgxError(f"{run_dir} has no snapshot at step {step}; snapshots: {', '.join(map(str, have)) or 'none'}"
                        " (train with train.snapshot_every=K to keep them)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = build_backbone(cfg.backbone, data, schedule)
        ema = make_ema(model, 0.0)
        ema.load_state_dict(blob["ema"])
    except (KeyError, RuntimeError, EOFError) as e:
        raise CfgxError(f"snapshot {path} is unreadable or does not match the run's backbone "
                        f"({type(e).__name__}); delete it") from None
    return ema.module.to(device).eval()
