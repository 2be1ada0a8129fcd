"""The training loop: read it top to bottom.

One network learns eps(x_t, t, c) and eps(x_t, t, null) together (condition
dropout). AdamW with linear warm-up, gradient clipping, an EMA of the weights
(evaluation always uses the EMA), bf16 autocast on CUDA, a JSONL log and atomic
checkpoints that hold everything needed to continue bit-exactly: model, EMA,
optimizer, step and RNG states. Under torchrun the same loop runs on every rank
with DistributedDataParallel (each rank its slice of the global batch); the
process-group glue lives in cfgx/distributed.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from cfgx import cpu, distributed
from cfgx.backbones import build_backbone, count_parameters
from cfgx.console import progress_bar, say
from cfgx.data import DatasetBundle, stack_dataset
from cfgx.diffusion.loss import EpsLoss
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.loggers.hub import LoggerHub
from cfgx.store.atomic import AppendLog, atomic_torch_save
from cfgx.store.checkpoints import (
    CKPT_NAME,
    load_checkpoint,
    make_ema,
    restore_training_state,
    save_snapshot,
    training_state,
)


@dataclass
class TrainResult:
    model: torch.nn.Module       # the EMA weights, in eval mode
    step: int
    img_per_s: float
    seconds: float


def batch_indices(step: int, n: int, batch: int, seed: int, device) -> torch.Tensor:
    """Epoch-wise shuffling that is a pure function of (seed, step), so resume needs no loader state."""
    per_epoch = max(n // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < batch:  # tiny datasets: sample with replacement within the epoch
        perm = perm.repeat((batch + n - 1) // n)
    return perm[pos * batch:(pos + 1) * batch].to(device)


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int,
                      fused: bool | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its linear learning-rate warm-up over ``warmup_steps`` (at least 1) steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    warmup = max(int(warmup_steps), 1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def optimizer_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, ema: AveragedModel,
                   grad_clip: float | None) -> None:
    """One update: backward, clip the gradient norm (when ``grad_clip``), step, warm-up, EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
    opt.step()
    sched.step()
    ema.update_parameters(model)


def train(cfg: DictConfig, data: DatasetBundle, run_dir: Path, device: torch.device,
          on_step: Callable[[int], None] | None = None, console=None, hub: LoggerHub | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` to ``train.steps``; returns the EMA model.

    The caller runs ``check_label_dependence`` first (before creating the run dir). ``hub`` (started by the
    caller) gets each train_log.jsonl record too.
    """
    tc = cfg.train
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg.backbone, data, schedule).to(device)
    if cfg.backbone.name == "exact":  # analytic denoiser: nothing to train
        return TrainResult(model.eval(), 0, 0.0, 0.0)

    if tc.get("channels_last", False):  # NHWC weights; the U-Net's forward then runs NHWC too
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, float(tc.ema_decay))
    # fused: one kernel over every parameter instead of a Python loop of ~10 ops per tensor (the
    # default on CPU); same update to float rounding, 3x less optimizer time (tests/test_unet_fast_path.py).
    opt, sched = adamw_with_warmup(model.parameters(), float(tc.lr), float(tc.weight_decay), tc.warmup_steps,
                                   fused=device.type in ("cpu", "cuda"))
    loss_fn = EpsLoss(schedule, float(cfg.cond_drop.p))
    world, rank = distributed.world_size(), distributed.rank()
    # Rank r draws its own dropout/noise stream, a pure function of (seed, rank) and the step count;
    # rank 0's is the 1-process stream. The initial weights above are the same on every rank.
    gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(int(cfg.seed)))
    if rank:
        torch.manual_seed(distributed.rank_seed(int(cfg.seed)))
    net = _wrap_for_training(model, device, tc)
    use_bf16 = device.type == "cuda" and tc.precision in ("auto", "bf16")

    x_all, y_all = stack_dataset(data.train)
    x_all, y_all = x_all.to(device), y_all.to(device)
    n, bs, steps = len(y_all), int(tc.batch_size), int(tc.steps)
    distributed.check_batch(bs, world)
    local = slice(rank * (bs // world), (rank + 1) * (bs // world))  # this rank's slice of the global batch

    ckpt_dir = Path(run_dir) / "checkpoints"
    snap_every = int(tc.get("snapshot_every") or 0)  # EMA-only snapshots for checkpoint sweeps
    step = 0
    if (ckpt_dir / CKPT_NAME).is_file():
        ckpt = load_checkpoint(ckpt_dir / CKPT_NAME, map_location=device)
        step = restore_training_state(ckpt, model, ema, opt, sched)
        rng = _rank_rng(ckpt, rank, world)
        if rng is None:  # saved by another number of processes: this rank starts a new stream here
            gen.manual_seed(distributed.reseed_seed(int(cfg.seed), step, rank))
            torch.manual_seed(distributed.reseed_seed(int(cfg.seed), step, rank))
        else:
            gen.set_state(rng["gen"].cpu())  # generator states are CPU byte tensors, even for CUDA
            torch.set_rng_state(rng["torch"].cpu())
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu())
        say(console, f"resuming {run_dir} from step {step}/{steps}")
    if distributed.any_rank(step != distributed.broadcast_object(step), device):
        raise distributed.agreed_error(f"the processes see different checkpoints in {run_dir}; put paths.runs on a "
                                       "filesystem every machine shares (rank 0 writes, every rank resumes)")

    def save() -> None:
        rng = {"gen": gen.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        ranks = distributed.gather_objects(rng)  # a collective: every rank calls save() at the same step
        if not distributed.is_main():
            return
        atomic_torch_save(ckpt_dir / CKPT_NAME, training_state(
            model, ema, opt, sched, step, rng=rng, **({"rng_ranks": ranks, "world_size": world} if world > 1 else {})))

    say(console, f"training {count_parameters(model) / 1e6:.2f}M-parameter {cfg.backbone.name} on "
                  f"{data.name} ({n} images) for {steps} steps, batch {bs}, cond_drop {cfg.cond_drop.p}, "
                  f"device {device}{', bf16' if use_bf16 else ''}"
                  f"{f', {world} processes' if world > 1 else ''}")
    log = AppendLog(Path(run_dir) / "train_log.jsonl") if distributed.is_main() else None
    model.train()
    t_start = time.perf_counter()
    t_last, loss_acc, n_acc, step0 = t_start, 0.0, 0, step
    progress = progress_bar(console, "train", "{task.fields[ips]:.0f} img/s")
    stop = distributed.StopRequest()
    poll = 1 if world == 1 else 10  # an all-reduce per poll; torchrun allows 30 s after SIGTERM
    try:
        with progress, stop:
            task = progress.add_task("train", total=steps, completed=step, loss=float("nan"), ips=0.0)
            while step < steps:
                idx = batch_indices(step, n, bs, int(cfg.seed), device)
                x, y = x_all[idx[local]], y_all[idx[local]]
                if cfg.dataset.get("hflip", False):
                    flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_fn(net, x, y, gen)
                optimizer_step(loss, model, opt, sched, ema, tc.grad_clip)
                step += 1
                cpu.tick()
                loss_acc += loss.detach()
                n_acc += 1
                if step % int(tc.log_every) == 0 or step == steps:
                    now = time.perf_counter()
                    mean_loss = distributed.all_reduce_mean(loss_acc, device) / n_acc
                    ips = n_acc * bs / (now - t_last)
                    if not torch.isfinite(torch.tensor(mean_loss)):
                        raise distributed.agreed_error(f"training diverged at step {step} (loss {mean_loss}); "
                                                       "lower train.lr or raise train.warmup_steps")
                    if log is not None:
                        record = {"step": step, "loss": round(mean_loss, 6), "lr": sched.get_last_lr()[0],
                                  "img_per_s": round(ips, 1), "elapsed_s": round(now - t_start, 2)}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        if hub is not None:
                            hub.log_train(step, record)
                    progress.update(task, completed=step, loss=mean_loss, ips=ips)
                    t_last, loss_acc, n_acc = now, 0.0, 0
                if step % int(tc.ckpt_every) == 0 or step == steps:
                    save()
                if snap_every and step % snap_every == 0 and distributed.is_main():
                    save_snapshot(run_dir, step, ema.state_dict())
                if on_step is not None:
                    on_step(step)
                if step < steps and (step % poll == 0) and stop.agreed(device):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if step % int(tc.ckpt_every):  # not saved at this step yet
            save()
        distributed.barrier()  # no rank exits (which makes torchrun kill the rest) before the file is written
        if log is not None:
            log.close()
        raise distributed.agreed_error(f"interrupted at step {step}; checkpoint saved, re-run the same command "
                                       "to resume") from None
    if log is not None:
        log.close()
    seconds = time.perf_counter() - t_start
    img_s = (step - step0) * bs / seconds if seconds > 0 else 0.0
    say(console, f"trained to step {step} in {seconds:.1f}s ({img_s:.0f} img/s)")
    out = ema.module.eval()
    return TrainResult(out, step, img_s, seconds)


def _wrap_for_training(model: torch.nn.Module, device: torch.device, tc: DictConfig) -> torch.nn.Module:
    """What the loss calls: the model, under DDP with several processes, compiled if asked.

    Weights, EMA and checkpoints stay on the bare ``model``, so a checkpoint is the same
    whatever the number of processes.
    """
    net = model
    if distributed.active():
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_enabled(tc, device):
        net = torch.compile(net)
    if net is not model:
        net.num_classes = model.num_classes  # the loss reads it; wrappers do not forward plain attributes
    return net


def compile_enabled(tc: DictConfig, device: torch.device) -> bool:
    """``train.compile``: auto = on for CUDA (fused kernels pay off), off on CPU (compile time dominates)."""
    c = tc.get("compile", "auto")
    if isinstance(c, str) and c == "auto":
        return device.type == "cuda"
    return bool(c)


def _rank_rng(ckpt: dict, rank: int, world: int) -> dict | None:
    """This rank's saved RNG states, or None when the checkpoint came from another number of processes."""
    if world == 1:
        return ckpt["rng"] if int(ckpt.get("world_size", 1)) == 1 else None
    ranks = ckpt.get("rng_ranks")
    if ranks is None or len(ranks) != world:
        return None
    return ranks[rank]
