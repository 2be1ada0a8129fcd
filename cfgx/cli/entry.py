"""The ``cfgx`` command line: subcommands on top of Hydra-composed configs.

``cfgx train`` runs through ``hydra.main`` so multirun (``-m``), launchers and
``--cfg job`` work as Hydra users expect; cfgx only rewrites its shorthand
(``guidance=0,1,3,7``, ``cond_drop=0.1``) first and checks group choices, so a
typo fails as one line before anything is written.

Each command lives in the module of its group (train, sweep, report, tools) and
is imported only when it runs: they import torch at the top, and ``cfgx --help``
must not.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from cfgx import __version__
from cfgx.cli.common import report, user_error
from cfgx.config import GROUPS, config_dir, group_options
from cfgx.errors import CfgxError

SUBCOMMANDS = {
    "train": "train a joint conditional/unconditional model, then sweep guidance scales",
    "sweep": "evaluate an existing run at guidance scales: cfgx sweep guidance=0,1,3,7 [run=PATH] "
             "[guidance.method=[cfg,apg]] [checkpoint=all|last|STEP,...]",
    "report": "merge runs' tables, plots and frontier.md: cfgx report RUN [RUN ...] [out=DIR] "
              "[report.match_accuracy=0.99]",
    "prepare": "fetch weights/datasets/models ahead of time: cfgx prepare [inception] [dinov2] [OWNER/MODEL] "
               "[dataset=X]",
    "toy": "exact-score toys: trajectories and boundaries under CG/CFG: cfgx toy [dataset=gmm1d|gmm2d]",
    "train-classifier": "train the noise-conditional guidance classifier of a run: [run=PATH]",
    "postprocess": "train the flow-matching postprocessor of a run: cfgx postprocess [run=PATH]",
    "reference": "write the reference set's statistics as an ADM/EDM2 reference file: cfgx reference out=PATH "
                 "[format=adm|edm] [dataset=X]",
    "export": "a run's EMA weights as safetensors + model.json (no pickle): cfgx export [run=PATH] [out=DIR]",
    "import": "a run dir for a pretrained/external model (no training): cfgx import model=DIR|py:mod:fn "
              "dataset.root=REF",
}
# command -> (module, function), imported when the command runs
COMMANDS = {"train": ("cfgx.cli.train", "cmd_train"), "sweep": ("cfgx.cli.sweep", "cmd_sweep"),
            "report": ("cfgx.cli.report", "cmd_report"), "prepare": ("cfgx.cli.prepare", "cmd_prepare"),
            "toy": ("cfgx.cli.tools", "cmd_toy"), "train-classifier": ("cfgx.cli.tools", "cmd_train_classifier"),
            "postprocess": ("cfgx.cli.tools", "cmd_postprocess"), "export": ("cfgx.cli.export", "cmd_export"),
            "reference": ("cfgx.cli.reference", "cmd_reference"),
            "import": ("cfgx.cli.import_", "cmd_import")}


def usage() -> str:
    lines = ["usage: cfgx <command> [key=value ...]   (python -m cfgx works the same)", "", "commands:"]
    lines += [f"  {k:<18} {v}" for k, v in SUBCOMMANDS.items()]
    lines += ["", "config groups (pick with group=option; override any key with key=value):"]
    for g in GROUPS:
        opts = group_options(g)
        if opts:
            lines.append(f"  {g:<12} {', '.join(opts)}")
    lines += ["", "shorthand: guidance=0,1,3,7 sets guidance.scales; cond_drop=0.2 sets cond_drop.p;",
              "           cfgx train -m cond_drop=0,0.1,0.2 trains one run per rate (Hydra multirun)",
              "           logger=[tensorboard,mlflow] logs to both (see README, Logging)",
              "           guidance=auto:0:8 searches each rule's best s instead of a grid (README)",
              f"configs: {config_dir()}"]
    return "\n".join(lines)


def command(name: str) -> Callable[[list[str]], int]:
    """The function behind ``cfgx <name>``, its module imported now."""
    module, func = COMMANDS[name]
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"cfgx {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"cfgx: error: unknown command {cmd!r}; valid: {', '.join(COMMANDS)} (see cfgx --help)",
              file=sys.stderr)
        return 2
    if cmd != "train" and any(a in ("-h", "--help") for a in rest):
        print(usage())
        return 0
    # why: cfgx.distributed imports torch, which 'cfgx --help' must not load
    from cfgx.distributed import launched_world, shutdown

    if cmd not in ("train", "sweep") and launched_world() > 1:
        print(f"cfgx: error: cfgx {cmd} runs as one process; start it without torchrun (only train and sweep "
              "use several)", file=sys.stderr)
        return 2
    try:
        return command(cmd)(rest) or 0
    except (CfgxError, OSError) as e:
        err = user_error(e)
        report(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("cfgx: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
