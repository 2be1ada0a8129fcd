"""Run directories: creation, discovery, atomic writes and provenance.

A run dir is self-describing: ``config.yaml`` (resolved), ``overrides.yaml``
(what the user typed), ``meta.json`` (versions, seeds, device, config hash),
``checkpoints/``, ``train_log.jsonl``, and the sweep's outputs.
"""

from __future__ import annotations

import errno
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

from cfgx.errors import DISK_ERRNOS, CfgxError, disk_error

CKPT_NAME = "last.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (or a crash) never sees a half-written file.

    The file gets the mode a plain ``open`` would give (0666 minus the umask), not
    mkstemp's 0600, so colleagues sharing a filesystem can read results.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_savefig(fig, path: Path, **kwargs: Any) -> None:
    """``fig.savefig`` through an atomic write: a full disk never leaves a truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(grid: torch.Tensor, path: Path) -> None:
    """``torchvision.utils.save_image`` through an atomic write."""
    import torchvision

    buf = io.BytesIO()
    torchvision.utils.save_image(grid, buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


class AppendLog:
    """A line log opened for appending whose disk errors name the file (``write``/``flush``/``close``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "a")
        except OSError as e:
            raise disk_error(self.path, e) from None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise disk_error(self.path, e) from None

    def write(self, text: str) -> None:
        self._guard(self._f.write, text)

    def flush(self) -> None:
        self._guard(self._f.flush)

    def close(self) -> None:
        if not self._f.closed:
            self._guard(self._f.close)


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
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; a run dir is for the group to read
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
        import shutil

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
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CfgxError(f"{path} is not readable JSON ({type(e).__name__}); restore it, or start a new run "
                        "with train.resume=false") from None
    if not isinstance(meta, dict):
        raise CfgxError(f"{path} is not a cfgx meta.json (not a JSON object); restore it, or start a new run "
                        "with train.resume=false")
    return meta


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
