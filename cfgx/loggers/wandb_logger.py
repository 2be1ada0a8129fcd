"""``logger=wandb``: Weights & Biases, offline by default (``wandb sync <run>/logs/wandb/offline-run-*``).

One W&B run per cfgx command (job type train or sweep), grouped by the run dir's name. Config: the
resolved config plus ``run_dir``. History: the shared keys (cfgx/loggers/base.py); train/* against
``step``, sweep/* and images/* against ``checkpoint_step`` (W&B's define_metric), so a sweep's rows
never fight the training steps over W&B's own step counter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfgx.loggers.base import SWEEP_STEP, TRAIN_STEP, Logger


class WandbLogger(Logger):
    name = "wandb"
    package = "wandb"
    extra = "wandb"

    def out_dir(self, run_dir: Path) -> Path:
        return Path(self.opts.get("dir") or Path(run_dir) / "logs")  # W&B adds wandb/ itself

    def log_config(self, config: dict[str, Any], run_dir: Path) -> None:
        # why: wandb is an optional extra and takes ~1 s to import
        import wandb

        out = self.out_dir(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True)
        self.run = wandb.init(project=str(self.opts.get("project") or "cfgx"), entity=self.opts.get("entity"),
                              mode=str(self.opts.get("mode") or "offline"), dir=str(out),
                              name=self.run_name(run_dir), group=Path(run_dir).name, job_type=self.job,
                              tags=list(self.opts.get("tags") or []),
                              config={**config, "run_dir": str(Path(run_dir).resolve())},
                              settings=settings, reinit="create_new")
        self.wandb = wandb
        self.run.define_metric(TRAIN_STEP)
        self.run.define_metric(SWEEP_STEP)
        self.run.define_metric("train/*", step_metric=TRAIN_STEP)
        self.run.define_metric("sweep/*", step_metric=SWEEP_STEP)
        self.run.define_metric("images/*", step_metric=SWEEP_STEP)

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        self.run.log({**metrics, axis: step})

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({f"images/{name}": self.wandb.Image(str(path)), SWEEP_STEP: step})

    def close(self, ok: bool = True) -> None:
        if getattr(self, "run", None) is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
