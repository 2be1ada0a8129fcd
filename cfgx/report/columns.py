"""Row columns by kind: which ones are Fréchet distances (lower is better, a best s to find).

FID, sFID, FD_DINOv2 and the classifier FD are all named here, and any later ``fd_*`` column counts
too, so the best-s table and ``guidance=auto`` take new FD metrics without edits.
"""

from __future__ import annotations

import re

_FD_NAME = re.compile(r"(s?fid|fd_[a-z0-9_]+)")
BLOCKS_SUFFIX = "_blocks"  # a row's per-seed-block values of an FD column (eval.seed_blocks >= 2)


def is_fd_metric(key: str) -> bool:
    """Whether a row column is a Fréchet distance to rank scales by, not its interval, per-block values
    or flags (``fid_comparable``), nor the per-class diagnostic."""
    return (bool(_FD_NAME.fullmatch(key)) and not key.endswith(("_ci95", BLOCKS_SUFFIX, "_comparable"))
            and "_per_class" not in key)
