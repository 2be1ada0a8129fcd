"""An imported run's model: ``backbone: {name: pretrained, source: ..., loader: dit|py}`` -> cfgx denoiser.

``cfgx import`` writes that block into the run's config.yaml; ``build_backbone`` calls ``load_pretrained``
whenever the run is swept, so sweeps, reports and torchrun shards see an ordinary cfgx model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from cfgx.data.base import DatasetBundle
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.pretrained.adapter import ExternalDenoiser
from cfgx.pretrained.entry import PREFIX, Pretrained, load_entry
from cfgx.store.digest import sha256_of
from cfgx.store.reader import read_json

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def open_source(source: str, device: torch.device | str = "cpu", vae: str | None = None,
                family: str = "dit") -> tuple[Pretrained, str]:
    """The model a source names (``py:pkg.mod:factory``, a diffusers DiT folder, or an official DiT checkpoint
    file with ``vae`` its decoder's folder), and its loader name."""
    if source.startswith(PREFIX):
        return load_entry(source), "py"
    path = Path(source).expanduser()
    if not path.is_dir() and not (path.is_file() and path.suffix in WEIGHT_SUFFIXES):
        raise CfgxError(f"model={source} is neither a folder, a {'/'.join(WEIGHT_SUFFIXES)} checkpoint, nor "
                        "py:package.module:factory; give a diffusers DiT folder (DiTPipeline.save_pretrained), "
                        "a DiT checkpoint, or a Python entry point")
    if path.is_dir() and _is_unet2d(path):
        # why: unet2d.py needs the [pretrained] extra; this module must import without it
        from cfgx.pretrained.unet2d import load_unet2d

        return load_unet2d(path, device), "unet2d"
    # why: dit.py needs the [pretrained] extra; this module must import without it
    from cfgx.pretrained.dit import load_dit

    return load_dit(path, device, vae=vae, family=family), "dit"


def _is_unet2d(folder: Path) -> bool:
    cfg = folder / "unet" / "config.json" if (folder / "unet").is_dir() else folder / "config.json"
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError):
        return False


def weights_sha256(source: str, vae: str | None = None) -> dict[str, str]:
    """sha256 of every weights file of a model folder or file, and of its decoder folder ``vae`` (relative path
    -> hex); {} for py: sources."""
    if vae:
        return {**weights_sha256(source), **weights_sha256(str(vae))}
    if source.startswith(PREFIX):
        return {}
    root = Path(source).expanduser()
    files = ([root] if root.is_file()
             else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES))
    root = root.parent if root.is_file() else root
    return {str(f.relative_to(root)): sha256_of(f) for f in files}


def verify_weights(run_dir: Path, bcfg: Any) -> str | None:
    """The imported weights, re-hashed and checked against what ``cfgx import`` recorded in meta.json.

    A row names its model by the import; if the files were replaced since (a re-download, another
    checkpoint copied over), the rows would describe a model that was not the one sampled. Returns a
    12-hex digest of all the weights files (the rows' ``model_sha256``); None for ``py:`` sources,
    whose weights are the factory's business.
    """
    meta_path = Path(run_dir) / "meta.json"
    meta = read_json(meta_path, "re-import the model with cfgx import (a new run dir)")
    recorded = (meta.get("imported") or {}).get("weights_sha256")
    if not isinstance(recorded, dict):
        raise CfgxError(f"{meta_path} has no imported.weights_sha256; it was not written by cfgx import: "
                        "re-import the model with cfgx import (a new run dir)")
    source, vae = str(bcfg.source), bcfg.get("vae")
    try:
        now = weights_sha256(source, vae)
    except OSError as e:
        raise CfgxError(f"cannot read the imported weights ({e.strerror}: {e.filename}); restore them or "
                        "re-import the model with cfgx import") from None
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            was, got = (recorded.get(name) or "absent")[:12], (now.get(name) or "absent")[:12]
            raise CfgxError(f"the imported weights changed since cfgx import: {name} sha256 {was} then, {got} "
                            f"now (model={source}); restore the file or import it again as a new run dir")
    if not now:
        return None
    return hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()[:12]


def load_pretrained(bcfg: Any, data: DatasetBundle, schedule: NoiseSchedule,
                    device: torch.device | str = "cpu") -> ExternalDenoiser:
    """The imported model on cfgx's ``schedule``, checked against the reference set's classes."""
    pre, _ = open_source(str(bcfg.source), device, vae=bcfg.get("vae"), family=str(bcfg.get("family") or "dit"))
    nc = pre.conventions.num_classes
    if data.num_classes != nc:
        raise CfgxError(f"the model has {nc} classes but the reference set {data.name} has {data.num_classes}; "
                        "give a reference folder with one sub-folder per model class, in class-index order")
    den = pre.denoiser(schedule, name=str(bcfg.source))
    den.set_guide_channels(bcfg.get("guide_channels"))
    return den
