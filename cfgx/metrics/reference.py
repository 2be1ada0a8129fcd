"""Reference-statistics files the field exchanges: ADM reference batches and EDM/EDM2 statistics.

``eval.reference=adm:PATH`` reads an ADM reference batch (openai/guided-diffusion
``evaluations``: an ``.npz`` with ``mu``/``sigma`` of Inception pool3, ``mu_s``/``sigma_s`` of the
sFID features and, optionally, ``arr_0``, the uint8 NHWC reference images, used for
precision/recall). ``eval.reference=edm:PATH`` reads EDM's ``.npz`` (``mu``/``sigma`` of pool3) or
EDM2's pickled dict of numpy arrays (``{'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}``).

npz files are read with ``numpy.load(allow_pickle=False)``. EDM2's pickle goes through
:class:`NumpyOnlyUnpickler`, which admits the few numpy globals an array needs and nothing else, so
a crafted file is refused before any of its code runs.

Stored statistics replace the reference side of the Fréchet distances they cover (``fid``,
``sfid``, ``fd_dinov2``); the metrics that need reference *features* (KID, precision/recall,
density/coverage) use ``arr_0`` where the file has it, else the dataset's reference set.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfgx.errors import CfgxError
from cfgx.metrics.standard import feature_stats, fid_from_stats

KINDS = ("adm", "edm")
# metric column -> (ADM npz keys) of its statistics
ADM_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
# The globals a pickled numpy array (any protocol) and its dtype need; nothing callable beyond these.
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


@dataclass
class ReferenceStats:
    """Statistics per metric column (``{'fid': (mu, sigma), ...}``, float64) and optional uint8 NCHW images."""

    kind: str
    path: Path
    sha256: str
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    images: torch.Tensor | None = None

    def describe(self) -> str:
        """What a row records: kind, path and the file's hash."""
        return f"{self.kind}:{self.path} sha256={self.sha256}"

    def frechet(self, column: str, fake: torch.Tensor) -> float | None:
        """The Fréchet distance of ``fake`` features to the stored statistics of ``column``; None if absent."""
        if column not in self.stats:
            return None
        mu, sigma = self.stats[column]
        return fid_from_stats(mu, sigma, *feature_stats(fake.double()))


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and plain containers; any other global is refused before it loads."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 writes an array's bytes
            return _latin1_bytes
        if (module, name) not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a numpy array part")
        return super().find_class(module, name)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` for the one use a numpy pickle makes of it; no other codec is looked up."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"global _codecs.encode with {encoding!r} is not a numpy array part")
    return text.encode("latin1")


def parse_reference(spec: str | None) -> tuple[str, Path] | None:
    """``'adm:PATH'`` / ``'edm:PATH'`` -> (kind, path); None for none."""
    if spec in (None, "", "none", "null"):
        return None
    kind, _, path = str(spec).partition(":")
    if kind not in KINDS or not path:
        raise CfgxError(f"eval.reference={spec!r}: give adm:PATH (an ADM reference batch .npz) or edm:PATH "
                        "(EDM .npz or EDM2 .pkl statistics)")
    return kind, Path(path).expanduser()


def load_reference(spec: str | None) -> ReferenceStats | None:
    """The reference file ``spec`` names, read without running any code in it; None for none."""
    parsed = parse_reference(spec)
    if parsed is None:
        return None
    kind, path = parsed
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CfgxError(f"cannot read reference file {path} ({e.strerror or type(e).__name__}): check "
                        "eval.reference") from None
    ref = ReferenceStats(kind, path, hashlib.sha256(raw).hexdigest()[:12])
    try:
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            _from_npz(ref, arrays)
        elif kind == "edm":
            _from_edm2(ref, NumpyOnlyUnpickler(io.BytesIO(raw)).load())
        else:
            raise ValueError("not an .npz archive")
    except pickle.UnpicklingError as e:
        raise CfgxError(f"refusing reference file {path}: {e} (only numpy arrays are read from a pickle)") from None
    except (ValueError, KeyError, TypeError, EOFError, AttributeError, zipfile.BadZipFile) as e:
        raise CfgxError(f"reference file {path} is not {_expected(kind)} ({str(e).splitlines()[0][:120]}): "
                        "check eval.reference") from None
    return ref


def _expected(kind: str) -> str:
    return ("an ADM reference batch (.npz with mu, sigma[, mu_s, sigma_s, arr_0])" if kind == "adm" else
            "EDM statistics (.npz with mu, sigma, or EDM2's .pkl {'fid': {'mu', 'sigma'}, ...})")


def _pair(mu: Any, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise ValueError(f"statistics of dtype {mu.dtype}/{sigma.dtype}, not numbers")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64))


def _from_npz(ref: ReferenceStats, arrays: dict[str, np.ndarray]) -> None:
    if "mu" not in arrays or "sigma" not in arrays:
        raise KeyError(f"no mu/sigma among {sorted(arrays)}")
    for column, (m, s) in ADM_KEYS.items():
        if m in arrays and s in arrays:
            ref.stats[column] = _pair(arrays[m], arrays[s])
    if "arr_0" in arrays:
        imgs = arrays["arr_0"]
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
            raise ValueError(f"arr_0 of {imgs.dtype} {imgs.shape} is not uint8 NHWC images")
        ref.images = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).contiguous()


def _from_edm2(ref: ReferenceStats, obj: Any) -> None:
    if not isinstance(obj, dict):
        raise TypeError(f"a pickled {type(obj).__name__}, not a dict of statistics")
    if "mu" in obj and "sigma" in obj:  # a single pool3 statistic
        obj = {"fid": obj}
    for column, block in obj.items():
        if not isinstance(block, dict) or "mu" not in block or "sigma" not in block:
            raise ValueError(f"entry {column!r} has no mu/sigma")
        ref.stats[str(column)] = _pair(block["mu"], block["sigma"])
    if "fid" not in ref.stats and "fd_dinov2" not in ref.stats:
        raise KeyError(f"no 'fid' or 'fd_dinov2' statistics among {sorted(ref.stats)}")


# ----------------------------------------------------------------------------- writing


def write_reference(path: str | Path, kind: str, features: dict[str, torch.Tensor],
                    images: torch.Tensor | None = None) -> Path:
    """Write the statistics of ``features`` (column -> ``[N, D]``) as ``kind``'s reference file.

    ``adm``: ``.npz`` with mu/sigma (``fid``), mu_s/sigma_s (``sfid``) and ``arr_0`` (uint8 NCHW
    ``images`` stored NHWC). ``edm``: EDM2's pickle ``{column: {'mu', 'sigma'}}`` (plain dicts of
    numpy arrays, readable by EDM2 and by :func:`load_reference`).
    """
    path = Path(path)
    stats = {c: tuple(t.numpy() for t in feature_stats(f.double())) for c, f in features.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if kind == "adm":
        arrays: dict[str, np.ndarray] = {}
        for column, (m, s) in ADM_KEYS.items():
            if column in stats:
                arrays[m], arrays[s] = stats[column]
        if images is not None:
            arrays["arr_0"] = images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    elif kind == "edm":
        with open(tmp, "wb") as f:
            pickle.dump({c: {"mu": m, "sigma": s} for c, (m, s) in stats.items()}, f)
    else:
        raise CfgxError(f"reference format {kind!r}; valid: {', '.join(KINDS)}")
    tmp.replace(path)
    return path


def write_samples_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Samples as ADM's evaluator reads a sample batch: ``arr_0`` uint8 NHWC, ``arr_1`` the class labels.

    Grayscale is replicated to RGB: ADM's Inception graph takes 3 channels, as cfgx's metrics do.
    """
    path = Path(path)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8),
                 arr_1=labels.cpu().numpy().astype(np.int64))
    tmp.replace(path)
    return path
