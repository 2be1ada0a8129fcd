"""The one reader of a run dir's JSON files (meta.json, rows, postprocess/info.json, export's model.json).

A run dir may come from someone else, so any damage (unreadable bytes, bad JSON, JSON nested deep
enough to exhaust the parser's recursion, a value of the wrong structure) becomes one line naming the
file and the fix, never a traceback. (Checkpoints, snapshots and feature files go through
cfgx/store/safeload.py; config.yaml through cfgx/store/rundir.load_run_config.)
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

from cfgx.errors import CfgxError


def _parse(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def read_json(path: Path, fix: str, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """``path``'s JSON object, each ``required`` key of its type; else CfgxError naming the file and ``fix``."""
    try:
        obj = _parse(path)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split()[:8])
        raise CfgxError(f"{path} is not readable JSON ({type(e).__name__}: {why}); {fix}") from None
    if not isinstance(obj, dict):
        raise CfgxError(f"{path} is not a JSON object; {fix}")
    for key, kind in (required or {}).items():
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,)):
            raise CfgxError(f"{path}: {key}={obj.get(key)!r} is not what cfgx wrote there; {fix}")
    return obj


def try_json(path: Path) -> dict | None:
    """``path``'s JSON object, or None when it is missing, damaged or not an object (for optional files)."""
    try:
        obj = _parse(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_tensor_map(obj: Any) -> bool:
    # why: torch is heavy and only these structural checks need it; the JSON readers above do not
    import torch

    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_step(obj: Any) -> bool:
    # why: as in _is_tensor_map
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.ndim == 0 and not obj.is_floating_point()
    return isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0


def weights_blob(blob: Any, path: Path, fix: str, keys: tuple[str, ...] = ("ema",)) -> dict:
    """A loaded checkpoint or snapshot whose ``keys`` are tensor maps and whose ``step`` is a step; else one line.

    (``AveragedModel``'s state holds ``n_averaged`` as a tensor too, so an EMA state is a tensor map.)
    """
    if not isinstance(blob, dict):
        raise CfgxError(f"{path} is not a cfgx checkpoint (not a dict); {fix}")
    for key in keys:
        if not _is_tensor_map(blob.get(key)):
            raise CfgxError(f"{path}: '{key}' is not a map of weight tensors ({type(blob.get(key)).__name__}); "
                            f"{fix}")
    if not _is_step(blob.get("step")):
        raise CfgxError(f"{path}: 'step'={blob.get('step')!r} is not a step number; {fix}")
    return blob


def features_blob(blob: Any) -> bool:
    """Whether a loaded sweep features file has the structure the sweep wrote (else it is recomputed)."""
    return (isinstance(blob, dict) and _is_tensor_map(blob.get("features"))
            and isinstance(blob.get("timing"), dict)
            and all(isinstance(v, numbers.Real) for v in blob["timing"].values())
            and (blob.get("grid_x") is None or _is_tensor_map({"g": blob["grid_x"]})))
