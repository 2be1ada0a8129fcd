"""A sweep's rows on disk: the key that names each row file, reading, writing and combining them.

One row per (rule, postprocess, sampler, steps, samples, seeds, checkpoint, metric settings, s), one JSON
file per row under ``<run>/sweep/rows/``, written atomically, so an interrupted sweep resumes at the
missing scales and the tables are always a merge of whole rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

from cfgx.console import say
from cfgx.report.columns import BLOCKS_SUFFIX, is_fd_metric
from cfgx.store.atomic import atomic_write_json
from cfgx.store.reader import try_json
from cfgx.store.rundir import scale_tag


@dataclass(frozen=True)
class RowKey:
    """Every choice that changes a row's samples, and (``metrics``) what its numbers depend on besides.

    The batch size is in it since noise is drawn per batch (paired across scales). ``metrics`` hashes the
    reference set and metric settings: another reference makes another row but reuses the cached features.
    """

    rule: str          # the rule's tag (its name and a hash of its options)
    postprocess: str   # "none" or the postprocessor's tag
    sampler: str
    steps: int
    eta: float
    num_samples: int
    batch_size: int
    seed: int
    blocks: int
    checkpoint_step: int
    s: float
    metrics: str = ""

    @property
    def name(self) -> str:
        """The row file's stem (without ``metrics``: the stem of its samples' cached features)."""
        b = f"-b{self.blocks}" if self.blocks > 1 else ""
        m = f"-m{self.metrics}" if self.metrics else ""
        return (f"{self.rule}-{self.postprocess}-{self.sampler}{self.steps}-eta{scale_tag(self.eta)}"
                f"-n{self.num_samples}-bs{self.batch_size}-seed{self.seed}{b}-step{self.checkpoint_step}{m}-s{scale_tag(self.s)}")

    def features_name(self, block: int) -> str:
        return f"{replace(self, metrics='').name}-block{block}.pt"


def read_row(path: Path) -> dict | None:
    """A row file's row, or None when it is not one (rows are written atomically: a foreign file)."""
    row = try_json(path)  # bad JSON, nested too deep for the parser, not an object: all 'not a row'
    return row if row is not None and isinstance(row.get("s"), (int, float)) else None


def write_row(rows_dir: Path, key: RowKey, row: dict[str, Any]) -> None:
    atomic_write_json(rows_dir / f"{key.name}.json", row)


def load_rows(run_dir: Path, console=None) -> list[dict]:
    """Every row of a run (every sweep of it), skipping with a note files that are not rows."""
    rows = []
    for p in sorted((Path(run_dir) / "sweep" / "rows").glob("*.json")):
        row = read_row(p)
        if row is None:
            say(console, f"[yellow]ignoring unreadable row file {p} (not a cfgx row); a sweep at its scale "
                         "recomputes it, or delete it")
            continue
        rows.append(row)
    return rows


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and 95% t-interval half-width over seed blocks (None where undefined)."""
    vals = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return m, float(student_t.ppf(0.975, len(vals) - 1) * sd / len(vals) ** 0.5)


def combine_blocks(block_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the seed blocks' rows: numbers as mean with a ``<key>_ci95`` column, the rest as is;
    FD columns also keep each block's value (``<key>_blocks``) for the best-s interval."""
    if len(block_rows) == 1:
        return dict(block_rows[0])
    out: dict[str, Any] = {}
    for k in block_rows[0]:
        vals = [r.get(k) for r in block_rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None) and \
                any(v is not None for v in vals):
            out[k], ci = mean_ci(vals)
            out[f"{k}_ci95"] = ci
            if is_fd_metric(k):
                out[k + BLOCKS_SUFFIX] = [finite_or_none(v) for v in vals]
        else:
            out[k] = vals[0]
    return out


def finite_or_none(v: Any) -> Any:
    """JSON has no NaN/inf: a non-finite metric is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
