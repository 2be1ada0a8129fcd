"""Loading .pt files without trusting them.

Run dirs and caches travel (group filesystems, tarballs, downloaded checkpoints),
and ``torch.load(weights_only=False)`` runs whatever a pickle asks for. Every blob
cfgx writes is plain tensors, dicts, lists, numbers and strings, so the
weights-only unpickler reads all of them and nothing else; there is deliberately
no fallback to full unpickling. Should a blob ever need another type (say a
scheduler state holding a class instance), allow that one type in ``SAFE_GLOBALS``
rather than loading unsafely.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from cfgx.errors import CfgxError

# Types allowed besides the weights-only defaults (tensors, (Ordered)dicts, lists, tuples, numbers,
# strings). Empty today: model, EMA, AdamW and LambdaLR states are all made of the defaults.
SAFE_GLOBALS: list[Any] = []


class UnsafeFileError(CfgxError):
    """The file asks to import or call something: refused, never loaded."""


class UnreadableFileError(CfgxError):
    """The file is truncated, not a torch file, or not readable."""


def safe_load(path: str | Path, map_location: Any = "cpu", fix: str = "delete it and re-run to rebuild it") -> Any:
    """``torch.load(path, weights_only=True)``; a refused or broken file is a one-line error naming it."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the global it refused ("GLOBAL posix.system"); anything
        # else it trips on (an unknown opcode) is a file that is simply not a torch pickle.
        if "GLOBAL" in str(e):
            raise UnsafeFileError(f"refusing to load {path}: it contains pickled code, not plain tensors "
                                  "(a crafted or foreign file); do not use it, and re-create it with cfgx") from None
        raise UnreadableFileError(f"{path} is not a readable torch file (corrupt or foreign); "
                                  f"{fix}") from None
    except OSError as e:
        raise UnreadableFileError(f"cannot read {path} ({e.strerror or type(e).__name__}); {fix}") from None
    except Exception as e:  # truncated zip archives, bad records: torch raises RuntimeError and friends
        raise UnreadableFileError(f"{path} is corrupt or unreadable ({type(e).__name__}); {fix}") from None
