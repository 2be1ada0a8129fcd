"""Several processes, one run: torch.distributed glue for training and sweeps.

cfgx never spawns or schedules processes itself. ``torchrun`` (or Slurm through
submitit) starts N copies of the same command and sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``setup`` joins them into one process
group (env:// rendezvous: NCCL on CUDA, gloo on CPU). With one process every
helper here is a no-op, so the single-process code path is the same code.

Roles: every rank computes (its slice of the batch, its share of a sweep's
sample batches); rank 0 alone decides the run dir and writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from cfgx import cpu
from cfgx.errors import CfgxError
from cfgx.store.rundir import pick_device

# ---------------------------------------------------------------- who am I


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _adopt_submitit_env() -> None:
    """Inside a multi-task submitit job (Slurm or local), export the env:// variables torchrun would set."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        import submitit  # why: optional extra (pip install cfgx[cluster]); only submitit jobs get here

        env = submitit.JobEnvironment()
        if env.num_tasks <= 1:
            return
        # Keep every GPU visible: each rank picks cuda:LOCAL_RANK itself, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:
        return


def launched_world() -> int:
    """WORLD_SIZE when torchrun (or submitit) started this process, else 1; whether or not a group is up."""
    return _env_int("WORLD_SIZE", 1)


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return launched_world()


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Whether a multi-process group is up (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- joining


def agreed_error(msg: str) -> CfgxError:
    """An error every rank raises at the same point (after agreeing): rank 0 alone reports it."""
    e = CfgxError(msg)
    e.rank0_only = True  # type: ignore[attr-defined]
    return e


def check_batch(batch_size: int, world: int, key: str = "train.batch_size") -> None:
    """The global batch must split evenly, or ranks would see different amounts of data per step."""
    if world > 1 and batch_size % world:
        lo = max(world, batch_size // world * world)
        raise CfgxError(f"{key}={batch_size} does not split over {world} processes (it is the global batch); "
                        f"use a multiple of {world}, e.g. {key}={lo}, or change --nproc_per_node")


def check_backend(backend: str) -> None:
    if backend == "nccl" and not torch.cuda.is_available():
        raise CfgxError("dist.backend=nccl needs CUDA GPUs and none is visible on this machine; use "
                        "dist.backend=gloo (or auto: gloo on CPU, nccl on CUDA)")


def setup(device_name: str, backend: str = "auto", timeout_min: float = 60.0,
          batch_size: int | None = None) -> torch.device:
    """Join the process group when launched by torchrun/submitit; return this rank's device.

    With one process this is ``pick_device``. ``batch_size`` (the global training
    batch) is checked against the world size before any rendezvous, so a bad value
    fails at once on every rank instead of hanging.
    """
    _adopt_submitit_env()
    world = world_size()
    if backend not in ("auto", "gloo", "nccl"):
        raise CfgxError(f"dist.backend={backend!r}; valid: auto (nccl on CUDA, gloo on CPU), gloo, nccl")
    if world <= 1:
        return pick_device(device_name)
    if batch_size is not None:
        check_batch(batch_size, world)
    check_backend(backend)
    device = pick_device(device_name)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise CfgxError(f"local rank {local_rank()} has no GPU ({n} visible); start at most {n} "
                            "processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise CfgxError("dist.backend=nccl needs device=cuda (or auto); on CPU use dist.backend=gloo")
    if not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(chosen, init_method="env://", timeout=timedelta(minutes=float(timeout_min)))
    return device


def setup_from_config(cfg, batch_size: int | None = None) -> torch.device:
    """``setup`` with the run config's ``device`` and ``dist`` block (absent in older runs: defaults).

    On the CPU, also starts the thread budget (cfgx/cpu.py; each rank holds its own share).
    """
    device = setup(str(cfg.device), str(OmegaConf.select(cfg, "dist.backend", default="auto")),
                   float(OmegaConf.select(cfg, "dist.timeout_min", default=60)), batch_size)
    if device.type == "cpu":
        cpu.start_budget(OmegaConf.select(cfg, "cpu_threads", default="auto"))
    return device


def shutdown() -> None:
    cpu.stop_budget()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives (no-ops with one process)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` decided on rank 0 (the only process without torchrun): its result, or its CfgxError,
    on every rank. The other ranks raise the same error silently; rank 0 alone reports it."""
    out: Any = None
    if is_main():
        try:
            out = fn()
        except CfgxError as e:
            out = e
    out = broadcast_object(out)
    if isinstance(out, CfgxError):
        err = agreed_error(str(out)) if active() and not is_main() else out
        err.agreed = True  # type: ignore[attr-defined]  # every rank raises it: nobody waits to be told
        raise err
    return out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean(value: float | torch.Tensor, device: torch.device) -> float:
    if not active():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
    dist.all_reduce(t)
    return float(t) / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, caches), the others after it, so they find its files."""
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


# ---------------------------------------------------------------- sharding work by index


def my_share(n_items: int) -> list[int]:
    """Item indices this rank handles: round-robin, so ranks get near-equal shares of any prefix."""
    return list(range(rank(), n_items, world_size())) if active() else list(range(n_items))


def gather_by_index(local: dict[int, Any]) -> list[Any] | None:
    """Rank 0 gets every rank's ``{index: value}`` merged and ordered by index; None elsewhere."""
    parts = gather_objects(local)
    if parts is None:
        return None
    merged: dict[int, Any] = {}
    for p in parts:
        merged.update(p)
    return [merged[i] for i in sorted(merged)]


# ---------------------------------------------------------------- per-rank random streams


def rank_seed(seed: int, r: int | None = None) -> int:
    """Seed of rank ``r``'s training stream: rank 0 keeps ``seed`` (a 1-process run is unchanged)."""
    r = rank() if r is None else r
    if r == 0:
        return int(seed)
    digest = hashlib.sha256(f"cfgx-rank-stream:{int(seed)}:{r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def reseed_seed(seed: int, step: int, r: int) -> int:
    """A fresh stream for rank ``r`` at ``step``, when a checkpoint has no state for this rank."""
    digest = hashlib.sha256(f"cfgx-rank-restart:{int(seed)}:{int(step)}:{r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- stopping cleanly


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the training loop polls at step boundaries.

    A signal in the middle of a DDP step cannot stop one rank alone (its peers would
    wait in the next all-reduce forever), so every rank finishes the step, then all
    agree (``any_rank``) and save one checkpoint together. torchrun forwards SIGTERM
    to its workers on Ctrl-C or preemption and kills them 30 s later, which is why
    the flag is polled every few steps, not once per epoch.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopRequest:
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave the default handlers alone
            self._old.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self, device: torch.device) -> bool:
        return any_rank(self.signum is not None, device)


# ---------------------------------------------------------------- launcher.nproc=N


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m cfgx <argv>`` under torchrun with ``nproc`` local processes; its exit code.

    torchrun's own ChildFailedError traceback is dropped: the failing rank has
    already printed cfgx's one-line error.
    """
    # why: torchrun's launcher (elastic agent, rendezvous) is only needed by the launcher.nproc parent
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "OMP_NUM_THREADS" not in os.environ:  # each rank then sizes its pool from the budget (cfgx/cpu.py)
        os.environ.update({"OMP_NUM_THREADS": "1", cpu.AUTO_MARK: "1"})
    # The agent logs each worker's exit and its SIGTERMs; cfgx's own line already says what failed.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "cfgx", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as e:  # Ctrl-C / SIGTERM: the workers have saved and said so
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        print("cfgx: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # rendezvous failures
        print(f"cfgx: error: torchrun stopped: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
              file=sys.stderr)
        return 1
    return 0
