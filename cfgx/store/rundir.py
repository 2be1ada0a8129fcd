"""Run directories: creation, discovery and provenance (atomic writes: cfgx.store.atomic).

A run dir is self-describing: ``config.yaml`` (resolved), ``overrides.yaml``
(what the user typed), ``meta.json`` (versions, seeds, device, config hash),
``checkpoints/``, ``train_log.jsonl``, and the sweep's outputs.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import cfgx
from cfgx.errors import CfgxError, disk_error
from cfgx.store.atomic import atomic_write_text, current_umask
from cfgx.store.locks import holder
from cfgx.store.reader import read_json

CKPT_NAME = "last.pt"


def scale_tag(s: float) -> str:
    """A guidance scale as a file-name part: 2.5 -> '2p5', -1 -> 'm1'."""
    return ("%g" % s).replace("-", "m").replace(".", "p")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "meta.json").is_file()


def new_run_dir(runs_root: Path, dataset: str, tag: str = "", files: dict[str, str] | None = None) -> Path:
    """``<runs>/<dataset>/<YYYYmmdd-HHMMSS>[-tag]``; never reuses an existing folder.

    ``files`` (name -> text) are written into a hidden staging folder that is renamed
    into place only when all are written: a full disk or a kill never leaves a
    half-made run dir, and a second process never takes the same name.
    """
    base = Path(runs_root) / dataset
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{tag}" if tag else stamp
    try:
        base.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=base, prefix=f".{name}.", suffix=".new"))
    except OSError as e:
        raise disk_error(base, e) from None
    try:
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700; a run dir is for the group to read
        for fname, text in (files or {}).items():
            atomic_write_text(stage / fname, text)
        k = 1
        while True:
            path = base / (name if k == 1 else f"{name}.{k}")
            if not path.exists():
                try:
                    os.rename(stage, path)  # fails if another process just took the name
                    return path
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise disk_error(path, e) from None
            k += 1
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def list_runs(runs_root: Path) -> list[Path]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    # Hidden folders are run dirs still being created (new_run_dir's staging), never runs.
    runs = [p.parent for p in root.glob("*/*/meta.json") if is_run_dir(p.parent) and not p.parent.name.startswith(".")]
    return sorted(runs, key=lambda p: (p / "meta.json").stat().st_mtime)


def resolve_run(run: str | None, runs_root: Path) -> Path:
    """The run named by ``run=PATH``, or the newest *finished* run under ``runs_root``.

    A crash or a kill leaves an unfinished run dir behind; it is never a default target
    (name it with run=PATH to evaluate its last checkpoint anyway).
    """
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
    finished = [r for r in runs if is_finished(r)]
    if finished:
        return finished[-1]
    newest = runs[-1]
    who = holder(newest / ".train.lock")
    if who is not None:
        raise CfgxError(f"no finished run under {runs_root}/: the newest, {newest}, is still being trained ({who}); "
                        f"wait for it to finish, or pass run={newest} to use its last checkpoint now")
    raise CfgxError(f"no finished run under {runs_root}/: the newest, {newest}, stopped before training finished; "
                    f"finish it by re-running the same 'cfgx train', or pass run={newest} to use it as it is")


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir``'s training finished (meta.json says so); a damaged meta.json counts as unfinished."""
    try:
        return bool(read_meta(run_dir).get("train_finished", False))
    except CfgxError:
        return False


def default_run_line(verb: str, run_dir: Path) -> str:
    """The line a command prints when it picked its run itself (no run=PATH)."""
    return f"{verb} the newest finished run {run_dir} (pass run=PATH for another)"


def load_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # YAML syntax errors, unreadable files, interpolation errors
        raise CfgxError(f"{path} is not a readable cfgx config ({type(e).__name__}); restore it from a backup "
                        "or the run's overrides.yaml (cfgx train --cfg job <overrides> prints it)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("dataset"), dict):
        raise CfgxError(f"{path} is not a cfgx config (no dataset section); restore it from a backup or the "
                        "run's overrides.yaml")
    return cfg


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / "meta.json"
    return read_json(path, "restore it, or start a new run with train.resume=false")


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def versions() -> dict[str, str]:
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
        try:
            meta = read_meta(run)
        except CfgxError:
            continue  # a damaged run dir is not resumable; resuming it would be a guess
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
