"""The logger= group: what each logger wrote, read back, equals train_log.jsonl and metrics.json.

One tiny run logs to every installed logger at once (logger=[csv,tensorboard,mlflow,wandb]); each test
reads one logger's own files back with that logger's own reader. A missing package is one line and
exit 2 before any run dir exists; a logger that raises mid-run is one warning and changes no number.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
from conftest import TINY, table_rows

from cfgx.cli import main
from cfgx.config import compose, config_hash, merge_eval_overrides, normalize_overrides
from cfgx.loggers import CsvLogger, logger_names
from cfgx.loggers.base import ROW_SETTINGS, row_metrics, row_prefix
from cfgx.loggers.hub import LoggerHub
from cfgx.loggers.mlflow_logger import mlflow_key

TIMING = {"seconds", "samples_per_s", "postprocess_seconds", "post_seconds"}  # as scripts/golden_tables.py
ALL = ["csv", "tensorboard", "mlflow", "wandb"]


def _has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def _train(workdir: Path, loggers: list[str]) -> Path:
    assert main(["train", *TINY, *([f"logger=[{','.join(loggers)}]"] if loggers else [])]) == 0
    (run,) = (workdir / "runs" / "digits").iterdir()
    return run


def _jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _same_numbers(rows: list[dict], reference: list[dict]) -> bool:
    """Every row equals a reference row in every column but timings."""
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in reference]
    return all({k: v for k, v in r.items() if k not in TIMING} in strip for r in rows)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, cache_dir, one_thread):
    """The same tiny run without loggers, trained under the same thread count as the logged ones (the
    session's tiny_run may have been trained with more threads, which changes float rounding)."""
    import os

    work = tmp_path_factory.mktemp("plain")
    old = Path.cwd()
    os.chdir(work)
    try:
        return _train(work, [])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, cache_dir, one_thread):
    """A tiny run with every installed logger at once (several loggers: the list form of the group)."""
    import os

    work = tmp_path_factory.mktemp("logged")
    old = Path.cwd()
    os.chdir(work)
    try:
        return _train(work, [n for n in ALL if n == "csv" or _has(n)])
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------------------- the config


def test_logger_group_one_several_none_and_no_hash_change():
    assert logger_names(compose([])) == []
    assert logger_names(compose(["logger=tensorboard"])) == ["tensorboard"]
    assert normalize_overrides(["logger=tensorboard,mlflow"]) == ["logger=[tensorboard,mlflow]"]
    both = compose(["logger=[tensorboard,mlflow]"])
    assert logger_names(both) == ["tensorboard", "mlflow"]
    assert logger_names(compose(["logger=tensorboard,mlflow"])) == ["tensorboard", "mlflow"]
    assert both.logger.mlflow.tracking_uri is None and both.logger.tensorboard.dir is None
    assert compose(["logger=wandb"]).logger.wandb.mode == "offline"
    assert config_hash(both) == config_hash(compose([]))  # logging never makes a new run
    # 'cfgx sweep' logs where its own command line says, not where the training command did.
    assert logger_names(merge_eval_overrides(both, [])) == []
    assert logger_names(merge_eval_overrides(compose([]), ["logger=csv"])) == ["csv"]


def test_unknown_logger_option_is_one_line(workdir, capsys):
    assert main(["train", *TINY, "logger=[tensorboard,neptune]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown logger 'neptune'" in err[0], err


# ---------------------------------------------------------------------------------------- read back


def test_logging_changes_no_number(logged_run, plain_run):
    assert _same_numbers(table_rows(logged_run), table_rows(plain_run))
    assert [{k: v for k, v in r.items() if k != "elapsed_s" and k != "img_per_s"} for r in _jsonl(logged_run)] == \
        [{k: v for k, v in r.items() if k != "elapsed_s" and k != "img_per_s"} for r in _jsonl(plain_run)]


def test_csv_logger(logged_run):
    d = logged_run / "logs" / "csv"
    lines = list(csv.DictReader((d / "metrics.csv").open()))
    got = {(ln["key"], int(ln["step"])): float(ln["value"]) for ln in lines}
    for rec in _jsonl(logged_run):
        for k in ("loss", "lr", "img_per_s"):
            assert got[(f"train/{k}", rec["step"])] == rec[k]
    rows = table_rows(logged_run)
    for row in rows:
        for key, v in row_metrics(row).items():
            assert got[(key, row["checkpoint_step"])] == v
    images = {ln["name"] for ln in csv.DictReader((d / "images.csv").open())}
    assert "samples" in images and any(n.startswith("plot_") for n in images)
    saved = json.loads((d / "config_train.json").read_text())
    assert saved["run_dir"] == str(logged_run.resolve()) and saved["config"]["train"]["steps"] == 12


@pytest.mark.skipif(not _has("tensorboard"), reason="tensorboard is not installed")
def test_tensorboard_event_file(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for k in ("loss", "lr", "img_per_s"):
        events = acc.Scalars(f"train/{k}")
        assert [e.step for e in events] == [r["step"] for r in _jsonl(logged_run)]
        assert [e.value for e in events] == pytest.approx([r[k] for r in _jsonl(logged_run)], rel=1e-6)
    for row in table_rows(logged_run):
        for key, v in row_metrics(row).items():
            (event,) = acc.Scalars(key)
            assert event.step == row["checkpoint_step"] and event.value == pytest.approx(v, rel=1e-6)
    assert "images/samples" in tags["images"] and "images/plot_tradeoff" in tags["images"]
    assert any(t.startswith("run_dir") for t in tags["tensors"])


@pytest.mark.skipif(not _has("mlflow"), reason="mlflow is not installed")
def test_mlflow_file_store(logged_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(logged_run / "logs" / "mlflow").as_uri())
    exp = client.get_experiment_by_name("cfgx")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cfgx.run_dir"] == str(logged_run.resolve())
    assert run.data.params["train.steps"] == "12" and run.data.params["guidance.scales"] == "[0.0, 1.0, 3.0]"
    for k in ("loss", "lr", "img_per_s"):
        hist = client.get_metric_history(run.info.run_id, f"train/{k}")
        assert [(m.step, m.value) for m in hist] == [(r["step"], r[k]) for r in _jsonl(logged_run)]
    for row in table_rows(logged_run):
        for key, v in row_metrics(row).items():
            (m,) = client.get_metric_history(run.info.run_id, mlflow_key(key))
            assert (m.step, m.value) == (row["checkpoint_step"], v)
    images = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")}
    assert "samples.png" in images and "plot_tradeoff.png" in images


def _wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file.

    wandb >= 0.18 dropped its Python reader (wandb.sdk.internal.datastore); the file is a LevelDB-style
    log: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of chunks, each
    crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last) and data.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.mark.skipif(not _has("wandb"), reason="wandb is not installed")
def test_wandb_offline_run(logged_run):
    (run_dir,) = (logged_run / "logs" / "wandb").glob("offline-run-*")
    (store,) = run_dir.glob("run-*.wandb")
    history, config = [], {}
    for rec in _wandb_records(store):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert config["run_dir"] == str(logged_run.resolve()) and config["train"]["steps"] == 12
    train = [{k[len("train/"):]: v for k, v in h.items() if k.startswith("train/")} | {"step": h["step"]}
             for h in history if "train/loss" in h]
    assert [{k: r[k] for k in ("step", "loss", "lr", "img_per_s")} for r in train] == \
        [{k: r[k] for k in ("step", "loss", "lr", "img_per_s")} for r in _jsonl(logged_run)]
    sweep = {k: (h["checkpoint_step"], v) for h in history for k, v in h.items() if k.startswith("sweep/")}
    for row in table_rows(logged_run):
        for key, v in row_metrics(row).items():
            assert sweep[key] == (row["checkpoint_step"], v)
    images = {k.rsplit("/", 1)[0]: v for h in history for k, v in h.items() if k.endswith("/path")}
    assert "images/samples" in images and "images/plot_tradeoff" in images
    assert all((run_dir / "files" / p).is_file() for p in images.values())


# ---------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("cmd", ["train", "sweep"])
def test_missing_logger_package_is_one_line_exit_2_before_anything(cmd, tiny_run, workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec finds nothing
    args = [*TINY, "logger=[csv,wandb]"] if cmd == "train" else ["logger=[csv,wandb]", f"run={tiny_run}"]
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert main([cmd, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "cfgx[wandb]"' in err[0] and "logger=wandb" in err[0], err
    assert not (workdir / "runs").exists() and sorted(p.name for p in tiny_run.rglob("*")) == before


def test_a_logger_that_raises_mid_run_warns_once_and_changes_nothing(workdir, plain_run, monkeypatch, capsys):
    calls = []

    def broken(self, row):
        calls.append(row["s"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CsvLogger, "log_row", broken)
    run = _train(workdir, ["csv"])  # training logs fine; the sweep's first row raises
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if "cfgx: warning" in ln]
    assert len(warnings) == 1 and "logger csv failed" in warnings[0] and "No space left" in warnings[0], err
    assert calls == [0.0]  # turned off after its first failure
    assert [r["s"] for r in table_rows(run)] == [0.0, 1.0, 3.0]
    assert _same_numbers(table_rows(run), table_rows(plain_run))
    assert (run / "logs" / "csv" / "metrics.csv").is_file()


def test_hub_drops_only_the_failing_logger(capsys, tmp_path):
    class Boom(CsvLogger):
        name = "boom"

        def log_metrics(self, metrics, step, axis):
            raise RuntimeError("tracker down")

    ok, boom = CsvLogger(job="train"), Boom(job="train")
    with LoggerHub([boom, ok]).start(tmp_path, {"seed": 0}) as hub:
        hub.log_train(1, {"step": 1, "loss": 0.5})
        hub.log_train(2, {"step": 2, "loss": 0.25})
        assert hub.loggers == [ok]
    assert capsys.readouterr().err.count("cfgx: warning: logger boom failed") == 1
    lines = list(csv.DictReader((tmp_path / "logs" / "csv" / "metrics.csv").open()))
    assert [(ln["step"], ln["value"]) for ln in lines] == [("1", "0.5"), ("2", "0.25")]


def test_row_keys_name_rule_scale_and_skip_settings():
    row = {"s": 3.0, "method": "cfg@linear", "postprocess": "flow", "checkpoint_step": 12, "accuracy": 0.5,
           "fid": None, "seed": 0, "fid_comparable": False, "sampler": "ddim"}
    assert row_prefix(row) == "sweep/cfg@linear+flow/s=3"
    assert row_metrics(row) == {"sweep/cfg@linear+flow/s=3/accuracy": 0.5}
    assert mlflow_key("sweep/cfg@linear+flow/s=3/accuracy") == "sweep/cfg_linear_flow/s:3/accuracy"
    assert "seed" in ROW_SETTINGS
