"""Run directories: creation, discovery, atomic writes and provenance.

A run dir is self-describing: ``config.yaml`` (resolved), ``overrides.yaml``
(what the user typed), ``meta.json`` (versions, seeds, device, config hash),
``checkpoints/``, ``train_log.jsonl``, and the sweep's outputs.
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cfgx.errors import CfgxError

CKPT_NAME = "last.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def scale_tag(s: float) -> str:
    """A guidance scale as a file-name part: 2.5 -> '2p5', -1 -> 'm1'."""
    return ("%g" % s).replace("-", "m").replace(".", "p")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "meta.json").is_file()


def new_run_dir(runs_root: Path, dataset: str, tag: str = "") -> Path:
    """``<runs>/<dataset>/<YYYYmmdd-HHMMSS>[-tag]``; never reuses an existing folder."""
    base = Path(runs_root) / dataset
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{tag}" if tag else stamp
    path, k = base / name, 1
    while path.exists():
        k += 1
        path = base / f"{name}.{k}"
    path.mkdir(parents=True)
    return path


def list_runs(runs_root: Path) -> list[Path]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.glob("*/*/meta.json") if is_run_dir(p.parent)]
    return sorted(runs, key=lambda p: (p / "meta.json").stat().st_mtime)


def resolve_run(run: str | None, runs_root: Path) -> Path:
    """The run named by ``run=PATH``, or the newest run under ``runs_root``."""
    if run:
        path = Path(run).expanduser()
        if not is_run_dir(path):
            raise CfgxError(f"run={run} is not a cfgx run dir (no config.yaml/meta.json there); pass "
                            f"a folder made by 'cfgx train', e.g. run={runs_root}/digits/<timestamp>")
        return path
    runs = list_runs(runs_root)
    if not runs:
        raise CfgxError(f"no runs found under {runs_root}/; train one first with 'cfgx train' or pass "
                        "run=PATH")
    return runs[-1]


def load_run_config(run_dir: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "config.yaml"))  # type: ignore


def read_meta(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "meta.json").read_text())


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def versions() -> dict[str, str]:
    import cfgx

    out = {"cfgx": cfgx.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("torchvision", "torchmetrics", "torch_fidelity", "hydra", "omegaconf", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def provenance(device: torch.device) -> dict[str, Any]:
    return {"versions": versions(), "git_commit": _git_commit(), "host": socket.gethostname(),
            "device": device_name(device)}


def find_resumable(runs_root: Path, dataset: str, cfg_hash: str) -> Path | None:
    """Newest unfinished run of the same training config, for resume-by-re-running."""
    for run in reversed(list_runs(Path(runs_root))):
        if run.parent.name != dataset:
            continue
        meta = read_meta(run)
        if meta.get("config_hash") == cfg_hash and not meta.get("train_finished", False):
            return run
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CfgxError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CfgxError(f"device={name!r} is not a torch device; use auto, cpu or cuda[:N]") from None
