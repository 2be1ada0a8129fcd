"""The evaluation protocol: what a preset (``eval=fid50k``, ``eval=quick``) pins, and which row columns
say that two rows were measured alike.

Numbers are only comparable under one protocol: the same sampler and steps, the same sample count,
the same checkpoint and the same reference set. Tables that pick a best scale (frontier.md, the
best-s tables) compare rows of one protocol at a time (:func:`split_by_protocol`), so a run swept
with two samplers never mixes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Row columns that define a protocol (a row lacking one, e.g. written before the column existed, has None).
PROTOCOL_COLUMNS = ("protocol", "sampler", "steps", "eta", "num_samples", "seed_blocks", "checkpoint_step",
                    "real_reference", "reference", "extractor_classifier")
OWN_CLASSIFIERS = ("eval_classifier:", "exact_posterior")  # cfgx's own judges: left out of the label


def protocol_key(row: dict[str, Any]) -> tuple:
    """The tuple rows are grouped by; rows before the ``protocol`` column count as ``default``."""
    vals = {c: row.get(c) for c in PROTOCOL_COLUMNS}
    vals["protocol"] = vals["protocol"] or "default"
    vals["seed_blocks"] = vals["seed_blocks"] or 1
    return tuple(str(vals[c]) for c in PROTOCOL_COLUMNS)


def protocol_label(row: dict[str, Any]) -> str:
    """A reader's name for a row's protocol, e.g. 'default: dpmpp2m 10 steps, 500 samples, checkpoint 1000,
    reference digits:train (1438)'."""
    blocks = int(row.get("seed_blocks") or 1)
    n = f"{row.get('num_samples')} samples" + (f" x {blocks} seed blocks" if blocks > 1 else "")
    eta = row.get("eta")
    sampler = f"{row.get('sampler')} {row.get('steps')} steps" + (f" eta={eta:g}" if eta else "")
    ref = row.get("reference") or row.get("real_reference")
    clf = str(row.get("extractor_classifier") or "")
    return (f"{row.get('protocol') or 'default'}: {sampler}, {n}, checkpoint {row.get('checkpoint_step')}"
            + (f", reference {ref}" if ref else "")
            + (f", classifier {clf.split(' ')[0]}" if clf and not clf.startswith(OWN_CLASSIFIERS) else ""))


def split_by_protocol(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, rows) per protocol, the protocol with the most rows first; labels are unique."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(protocol_key(r), []).append(r)
    out = sorted(groups.values(), key=lambda rs: -len(rs))
    return [(protocol_label(rs[0]), rs) for rs in out]


def apply_eval_preset(cfg: DictConfig, overrides: list[str], config_dir: Path) -> None:
    """Re-apply an ``eval=<preset>`` file's own values over what a dataset file set (``eval.num_samples: 500``
    in dataset/digits.yaml is merged after the eval group), except keys the command line sets itself."""
    name = OmegaConf.select(cfg, "eval.protocol")
    path = Path(config_dir) / "eval" / f"{name}.yaml"
    if not name or name == "default" or not path.is_file():
        return
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    typed = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    for key, value in preset.items():  # type: ignore[union-attr]
        if key != "defaults" and f"eval.{key}" not in typed:
            OmegaConf.update(cfg, f"eval.{key}", value, merge=False, force_add=True)
