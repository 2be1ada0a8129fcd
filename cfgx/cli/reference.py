"""``cfgx reference``: write the reference set's statistics as an ADM or EDM2 reference file.

``cfgx reference out=PATH [format=adm|edm] [dataset=X eval.real_samples=N ...]`` builds the
evaluation suite of that config (the same reference set a sweep uses, features from the cache)
and writes its Inception (and DINOv2) statistics; ``eval.reference=adm:PATH`` reads them back.
"""

from __future__ import annotations

from pathlib import Path

from cfgx.cli.common import console as make_console
from cfgx.config import compose, normalize_overrides
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.metrics.reference import KINDS, write_reference
from cfgx.metrics.suite import EvalSuite
from cfgx.store.rundir import pick_device

# suite feature key -> reference file column
COLUMNS = {"inc_pool": "fid", "inc_spatial": "sfid", "dino_cls": "fd_dinov2"}


def cmd_reference(args: list[str]) -> int:
    out, kind, rest = None, "adm", []
    for a in args:
        if a.startswith("out="):
            out = Path(a.split("=", 1)[1]).expanduser()
        elif a.startswith("format="):
            kind = a.split("=", 1)[1]
        else:
            rest.append(a)
    if out is None:
        raise CfgxError("cfgx reference needs out=PATH (e.g. out=ref/cifar10.npz format=adm)")
    if kind not in KINDS:
        raise CfgxError(f"format={kind!r}; valid: {', '.join(KINDS)}")
    cfg = compose(normalize_overrides(rest))
    console = make_console()
    data = build_dataset(cfg.dataset)
    suite = EvalSuite(cfg, data, pick_device(str(cfg.device)), console)
    feats = {col: suite.real[key] for key, col in COLUMNS.items() if key in suite.real}
    if kind == "adm" and "fid" not in feats:
        raise CfgxError(f"{data.name} has no Inception features here (eval.features={suite.spaces}); add "
                        "eval.features=[classifier,inception]")
    if not feats:
        raise CfgxError("no Inception or DINOv2 features to write: add inception or dinov2 to eval.features")
    path = write_reference(out, kind, feats)
    console.print(f"{kind} reference of {suite.info['real_reference']} ({', '.join(feats)}) written to {path}; "
                  f"use it with eval.reference={kind}:{path}")
    return 0
