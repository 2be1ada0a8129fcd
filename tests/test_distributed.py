"""Several processes: DDP training and sharded sweeps under real torchrun (gloo, 2 CPU processes).

Each torchrun call costs a few seconds of start-up per process, so one launch checks
several things: the 2-process run's training and the sweep that follows it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY

from cfgx import distributed
from cfgx.cli import main
from cfgx.errors import CfgxError
from cfgx.sweep.rows import load_rows

# Columns that measure the machine, not the samples.
TIMING = {"seconds", "samples_per_s", "device"}


def _env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "CFGX_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


def _torchrun(args: list[str]) -> list[str]:
    # No --master-port: a single-node torchrun then rendezvouses on a free port, so parallel runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cfgx", *args]


def _log(run: Path) -> list[dict]:
    p = run / "train_log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def _ckpt_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["step"])


def _runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("digits/*/meta.json"))


def _same_rows(a: list[dict], b: list[dict]) -> None:
    key = lambda r: (r["method"], r["postprocess"], r["s"])  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    for ra, rb in zip(a, b):
        diff = {k: (ra.get(k), rb.get(k)) for k in set(ra) | set(rb) if k not in TIMING and ra.get(k) != rb.get(k)}
        assert not diff, f"s={ra['s']}: {diff}"


# The ResNet judge: ranks above 0 must rebuild the architecture eval.classifier.arch names (they once always
# built the CNN, so a torchrun sweep of a CIFAR/SVHN-recipe run could not load rank 0's ResNet weights).
RESNET_JUDGE = ["+eval.classifier.arch=resnet", "eval.classifier.width=8", "eval.classifier.steps=120",
                "eval.classifier.batch_size=128", "eval.classifier.lr=0.1", "+eval.classifier.hflip=false"]


def test_two_process_training_matches_one_process_and_sweep_tables_are_identical(tiny_run, tmp_path, cache_dir):
    root = tmp_path / "runs"
    proc = subprocess.run(_torchrun(["train", *TINY, *RESNET_JUDGE, f"paths.runs={root}"]), cwd=tmp_path,
                          env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(root)
    meta = json.loads((run / "meta.json").read_text())
    one = json.loads((tiny_run / "meta.json").read_text())
    assert meta["checkpoint_step"] == one["checkpoint_step"] == 12 and meta["train_processes"] == 2
    assert meta["config_hash"] == one["config_hash"]
    # Same images per step, other noise draws: the loss agrees within the noise of 4 steps x 16 images.
    two_loss, one_loss = _log(run)[-1]["loss"], _log(tiny_run)[-1]["loss"]
    assert abs(two_loss - one_loss) < 0.25 * one_loss, (two_loss, one_loss)
    assert proc.stdout.count("run dir:") == 1  # only rank 0 speaks

    # The sweep after training ran sharded over both ranks; one process must give the same table.
    copy = tmp_path / "one" / "digits" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "sweep")
    assert main(["sweep", f"run={copy}"]) == 0
    two, one_proc = load_rows(run), load_rows(copy)
    assert len(two) == 3
    assert two[0]["extractor_classifier"] != load_rows(tiny_run)[0]["extractor_classifier"]  # the ResNet judge
    _same_rows(two, one_proc)


def _worker_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(e.split("=", 1) for e in (d / "environ").read_bytes().decode().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def _start_and_wait(cmd, cwd, env, root: Path, min_step: int) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        runs = _runs(root)
        if runs and _log(runs[-1]) and _log(runs[-1])[-1]["step"] >= min_step:
            return proc, runs[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"training never reached step {min_step}: {err[-2000:]}")


def test_sigterm_saves_once_and_kill_9_of_a_rank_then_rerun_resumes_and_finishes(tmp_path, cache_dir):
    root = tmp_path / "runs"
    args = ["train", "backbone.ch=8", "train.steps=80", "train.batch_size=16", "train.ckpt_every=25",
            "train.log_every=5", "eval.num_samples=20", "eval.batch_size=10", "sampler.steps=2",
            "eval.classifier.steps=150", "eval.classifier.width=8", "guidance=1", f"paths.runs={root}"]
    env = _env(cache_dir)

    # SIGTERM to torchrun (what Ctrl-C or a cluster's preemption does): every rank stops at the same step
    # boundary and rank 0 saves that step, once.
    proc, run = _start_and_wait(_torchrun(args), tmp_path, env, root, min_step=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if "interrupted at step" in ln]
    assert len(lines) == 1, err[-3000:]
    stopped = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert 5 <= stopped < 80 and _ckpt_step(run) == stopped

    # kill -9 of one rank: no save; the survivors are torn down by torchrun.
    proc, run2 = _start_and_wait(_torchrun(args), tmp_path, env, root, min_step=stopped + 5)
    assert run2 == run
    pids = _worker_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    killed_at = _ckpt_step(run)
    assert killed_at < 80

    # The same command resumes the same run from its last checkpoint on every rank and finishes.
    done = subprocess.run(_torchrun(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "resuming" in said and f"from step {killed_at}/80" in said, said[:2000]
    assert _runs(root) == [run] and _ckpt_step(run) == 80
    meta = json.loads((run / "meta.json").read_text())
    assert meta["train_finished"] and meta["checkpoint_step"] == 80
    assert [r["step"] for r in _log(run)][-1] == 80 and len(load_rows(run)) == 1


def test_world_size_that_does_not_divide_the_batch_is_one_line_under_torchrun(tmp_path, cache_dir):
    proc = subprocess.run(_torchrun(["train", "train.batch_size=15", f"paths.runs={tmp_path}"]), cwd=tmp_path,
                          env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("cfgx: error:")]
    assert ours == ["cfgx: error: train.batch_size=15 does not split over 2 processes (it is the global batch); "
                    "use a multiple of 2, e.g. train.batch_size=14, or change --nproc_per_node"]
    assert not (tmp_path / "digits").exists()


def test_launcher_nproc_checks_the_batch_before_relaunching(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "launcher.nproc=3", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "train.batch_size=16 does not split over 3 processes" in err
    assert "e.g. train.batch_size=15" in err
    assert main(["train", "launcher.nproc=0"]) == 2
    assert "launcher.nproc=0 must be a positive integer" in capsys.readouterr().err


def test_nccl_on_a_cpu_only_machine_is_one_line(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CfgxError, match=r"dist.backend=nccl needs CUDA GPUs and none is visible"):
        distributed.setup("auto", "nccl", batch_size=16)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "dist.backend=nccl", f"paths.runs={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cfgx: error: dist.backend=nccl needs CUDA GPUs and none is visible on this machine; use "
                   "dist.backend=gloo (or auto: gloo on CPU, nccl on CUDA)")
    assert not (tmp_path / "digits").exists()


def test_missing_launcher_plugin_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)  # as if not installed
    assert main(["train", "-m", "cond_drop=0,0.1", "hydra/launcher=submitit_slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('cfgx: error: hydra/launcher=submitit_slurm needs the hydra-submitit-launcher plugin, which is '
                   'not installed; install it with pip install -e ".[cluster]"')


def test_batch_split_and_rank_streams():
    with pytest.raises(CfgxError, match="does not split over 4 processes"):
        distributed.check_batch(18, 4)
    distributed.check_batch(16, 4)
    seeds = {distributed.rank_seed(0, r) for r in range(4)}
    assert distributed.rank_seed(7, 0) == 7 and len(seeds) == 4  # rank 0 keeps the 1-process stream
    assert distributed.rank_seed(0, 1) == distributed.rank_seed(0, 1)  # a pure function of (seed, rank)

