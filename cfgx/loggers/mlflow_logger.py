"""``logger=mlflow``: one MLflow run per cfgx command, by default in a file store under the run dir.

Params: the resolved config, flattened (``train.lr``, ``guidance.scales``, ...). Tags: ``cfgx.run_dir``,
``cfgx.job``. Metrics: the shared keys (cfgx/loggers/base.py) with ``=`` written ``:`` and any other
character MLflow forbids as ``_`` (``sweep/cfg/s:3/fid``). Images: artifacts under ``images/``.
Open with ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:<run>/logs/mlflow`` (MLflow 3.7+
keeps the file store in maintenance mode behind that variable; cfgx sets it for its own file store).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from cfgx.loggers.base import Logger, flatten

MAX_PARAM_CHARS = 500   # MLflow's long-standing limit on a param value (newer servers allow more)
BATCH = 100             # MLflow's limit on params per log_batch call


def mlflow_key(key: str) -> str:
    """A cfgx key in the characters MLflow accepts (letters, digits, _ - . / space and :)."""
    return re.sub(r"[^\w\-./ :]", "_", key.replace("=", ":"))


class MlflowLogger(Logger):
    name = "mlflow"
    package = "mlflow"
    extra = "mlflow"

    def log_config(self, config: dict[str, Any], run_dir: Path) -> None:
        # why: mlflow is an optional extra and takes ~1 s to import
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = str(self.opts.get("tracking_uri") or self.out_dir(run_dir).resolve().as_uri())
        if uri.startswith("file:"):  # MLflow >= 3.7 refuses its file store unless asked for it by name
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = str(self.opts.get("experiment") or "cfgx")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=self.run_name(run_dir), tags={
            "cfgx.run_dir": str(Path(run_dir).resolve()), "cfgx.job": self.job})
        self.run_id = run.info.run_id
        params = [Param(mlflow_key(k), str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        # why: mlflow is an optional extra (already imported by log_config)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit on metrics per log_batch call
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def close(self, ok: bool = True) -> None:
        if getattr(self, "run_id", None) is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
            self.run_id = None
