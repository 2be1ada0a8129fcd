"""A run's EMA weights as safetensors plus a JSON of what they mean, loadable without pickle.

``export_run`` writes two files into one folder:

- ``model.safetensors``: the EMA network's ``state_dict`` (float32 tensors, no code, no pickle);
- ``model.json``: everything needed to use them: the backbone block (architecture), the data shape,
  class count and null label, the prediction target (eps), the noise schedule, the guidance formula,
  the source run (config hash, checkpoint step) and the sha256 of the weights file.

``load_exported`` rebuilds the backbone from the JSON and loads the tensors with
``safetensors.torch.load_file``; ``exported_schedule`` gives the noise schedule. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import cfgx
from cfgx.backbones import build_backbone, count_parameters
from cfgx.data.base import DatasetBundle
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.store.atomic import atomic_write_bytes, atomic_write_json
from cfgx.store.checkpoints import load_ema_model
from cfgx.store.digest import sha256_of
from cfgx.store.reader import try_json

FORMAT = "cfgx-export/1"
WEIGHTS = "model.safetensors"
INFO = "model.json"
INSTALL = 'pip install -e ".[export]" (or pip install safetensors)'
GUIDANCE = "eps = eps(x, t, null) + s * (eps(x, t, c) - eps(x, t, null)); s = 0 unconditional, s = 1 conditional"


def safetensors_torch():
    """``safetensors.torch``, or one line saying how to install it."""
    try:
        # why: safetensors is an optional extra ([export]); only cfgx export and its loader need it
        import safetensors.torch as st
    except ImportError:
        raise CfgxError(f"cfgx export needs the safetensors package, which is not installed; install it with "
                        f"{INSTALL}") from None
    return st


def read_info(folder: Path) -> dict[str, Any] | None:
    """The export's ``model.json``, or None when ``folder`` holds no cfgx export."""
    info = try_json(Path(folder) / INFO)
    return info if info is not None and info.get("format") == FORMAT else None


def describe(cfg: DictConfig, data: DatasetBundle, meta: dict[str, Any], step: int, run_dir: Path,
             model: torch.nn.Module, n_tensors: int) -> dict[str, Any]:
    """``model.json`` without the weights' sha256: the architecture and every convention of the weights."""
    c = data.num_classes
    return {
        "format": FORMAT, "cfgx_version": cfgx.__version__, "weights": WEIGHTS,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "dataset": {"name": data.name, "shape": list(data.shape), "num_classes": c,
                    "class_names": list(data.class_names), "range": [-1.0, 1.0], "clip_x0": data.clip},
        "prediction": "eps",
        "call": "model(x, t, y) -> eps; x: float32 [B, *shape] (images in [-1, 1]), t: int64 [B] in [0, num_steps), "
                "y: int64 [B] in [0, num_classes], num_classes being the null label",
        "schedule": {**OmegaConf.to_container(cfg.diffusion, resolve=True),
                     "betas": "linear: linspace(beta_start, beta_end, num_steps) * 1000 / num_steps (float64); "
                              "cosine: Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999",
                     "alpha_bar": "cumprod(1 - betas); x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps"},
        "num_classes": c, "null_label": c, "label_rows": c + 1,
        "guidance": GUIDANCE,
        "cond_drop": OmegaConf.select(cfg, "cond_drop.p"),
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "source": {"run": str(Path(run_dir).resolve()), "config_hash": meta.get("config_hash"),
                   "checkpoint_step": int(step),
                   "train_finished": bool(meta.get("train_finished", False)), "seed": OmegaConf.select(cfg, "seed")},
        "tensors": n_tensors, "parameters": count_parameters(model),
    }


def export_run(run_dir: Path, cfg: DictConfig, data: DatasetBundle, meta: dict[str, Any], out: Path) -> dict:
    """Write the run's last EMA weights and their description into ``out``; returns ``model.json``'s dict.

    An ``out`` holding an export of this same checkpoint is rewritten; one holding another export,
    or anything else, is left alone with a one-line error.
    """
    st = safetensors_torch()
    if cfg.backbone.name == "exact":
        raise CfgxError(f"{run_dir} uses backbone=exact, the closed-form toy scores: it has no weights to export")
    out = Path(out)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    model, step = load_ema_model(run_dir, cfg, data, schedule, torch.device("cpu"))
    _check_out(out, meta.get("config_hash"), step)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = describe(cfg, data, meta, step, run_dir, model, len(state))
    blob = st.save(state, metadata={"format": FORMAT, "cfgx_version": cfgx.__version__})
    atomic_write_bytes(out / WEIGHTS, blob)
    info["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_json(out / INFO, info)  # written last: a folder with model.json is a whole export
    return info


def _check_out(out: Path, config_hash: str | None, step: int) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CfgxError(f"out={out} is a file; give out= a new or empty folder")
    old = read_info(out)
    if old is None:
        # a crash between the two writes leaves model.safetensors (or a temp file) alone: finish that export
        if any(p.name != WEIGHTS and not p.name.startswith(f".{WEIGHTS}.") for p in out.iterdir()):
            raise CfgxError(f"out={out} exists and is not a cfgx export; give out= a new or empty folder")
        return
    src = old.get("source", {})
    if (src.get("config_hash"), src.get("checkpoint_step")) != (config_hash, step):
        raise CfgxError(f"{out} already holds an export of another checkpoint (config {src.get('config_hash')}, "
                        f"step {src.get('checkpoint_step')}); give out= a new folder, or delete {out}")


def _locate(path: Path) -> Path:
    path = Path(path).expanduser()
    folder = path.parent if path.name in (WEIGHTS, INFO) else path
    if read_info(folder) is None:
        raise CfgxError(f"{path} is not a cfgx export (no {INFO} of format {FORMAT}); pass the folder "
                        "'cfgx export' wrote")
    return folder


def load_exported(path: Path | str, device: torch.device | str = "cpu", check_hash: bool = True):
    """``(model, info)`` from an export folder (or its model.json / model.safetensors); no pickle anywhere.

    ``model`` is the rebuilt backbone with the exported EMA weights, in eval mode; ``info`` is model.json.
    """
    st = safetensors_torch()
    folder = _locate(Path(path))
    info = read_info(folder)
    weights = folder / str(info.get("weights", WEIGHTS))
    if not weights.is_file():
        raise CfgxError(f"{weights} is missing; re-run 'cfgx export' for the run {info['source']['run']}")
    if check_hash and info.get("sha256") and sha256_of(weights) != info["sha256"]:
        raise CfgxError(f"{weights} does not match the sha256 in {folder / INFO} (corrupt or replaced); "
                        "re-run 'cfgx export'")
    d = info["dataset"]
    data = DatasetBundle(name=d["name"], train=None, test=None, num_classes=int(info["num_classes"]),
                         shape=tuple(int(n) for n in d["shape"]), class_names=list(d.get("class_names", [])),
                         clip=d.get("clip_x0"))
    model = build_backbone(OmegaConf.create(info["backbone"]), data, exported_schedule(info))
    try:
        state = st.load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors' own error for a bad header, load_state_dict's RuntimeError
        raise CfgxError(f"{weights} is unreadable or does not fit the architecture in {INFO} "
                        f"({type(e).__name__}); re-run 'cfgx export'") from None
    return model.to(device).eval(), info


def exported_schedule(info: dict[str, Any]) -> NoiseSchedule:
    """The noise schedule an export was trained with."""
    s = info["schedule"]
    return NoiseSchedule(kind=s["schedule"], num_steps=int(s["num_steps"]), beta_start=float(s["beta_start"]),
                         beta_end=float(s["beta_end"]))
