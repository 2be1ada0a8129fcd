"""Flow-matching postprocessor for a trained diffusion model (Zhao & Schwing 2025).

Zhao & Schwing, "Studying Classifier(-Free) Guidance From a Classifier-Centric
Perspective" (arXiv 2503.10638), Sec. 5: guidance works by pushing samples away
from decision boundaries, and a pre-trained conditional model is worst exactly
there. They fit a flow-matching model that carries each *generated* sample x̂ of
class c to a *real* sample of the same class, learning most where the generator
is worst, and apply it after sampling (CIFAR-10, EDM base: FID 8.02 -> 5.82 at
s = 2.25).

The pieces, in the order ``train_postprocessor`` (this module) runs them:

1. pairs: x̂ drawn from the run at several guidance scales ("one for all
   scales"; ``per_scale`` trains one flow per scale instead), each paired with a
   uniformly random one of its k nearest real samples *of the same class*
   (``knn_targets``, cfgx/postprocess/pairs.py). The randomness over k avoids the bad local optimum of a
   deterministic nearest neighbour.
2. velocity network v(z, t, c): the cfgx U-Net for images (optionally
   initialised from the run's EMA weights), a small MLP for vector data
   (cfgx/postprocess/nets.py).
3. rectified flow: z_t = (1 - t) x̂ + t y, target y - x̂, t ~ U[0, 1]. The paper's
   printed equation mixes the sign and time direction; this form is the one whose
   integral from t = 0 (z = x̂) ends at real data, and tests/test_postprocess.py
   proves the direction. It trains with train.py's optimizer, update and
   checkpoint helpers (AdamW with warm-up, clipping, EMA, bit-exact resume).
4. apply: integrate dz/dt = v(z, t, c) from t = 0 to 1 with Euler or Heun.

Caveat for the team: a nearest-neighbour target reweights real data by the
Voronoi cell of the generated samples. The flow keeps the generator's mass per
region (it can only move samples locally), so it sharpens samples but cannot
restore a mode the generator dropped, and real points far from any x̂ are never
targets. ``info.json`` records how many distinct real samples were used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cfgx.console import progress_bar, say
from cfgx.data.base import DatasetBundle, stack_dataset
from cfgx.errors import CfgxError
from cfgx.postprocess.nets import build_velocity_net, velocity_unet_config
from cfgx.postprocess.pairs import FeatureFn, dequantize, load_or_make_pairs
from cfgx.postprocess.settings import (
    APPLY_KEYS,
    METHODS,
    NN_SPACES,
    PAIR_KEYS,
    TRAIN_KEYS,
    FlowSettings,
    jsonable,
)
from cfgx.store.atomic import atomic_torch_save, atomic_write_json
from cfgx.store.checkpoints import ema_weights, load_checkpoint, make_ema, restore_training_state, training_state
from cfgx.store.locks import locked
from cfgx.store.reader import read_json, try_json
from cfgx.store.rundir import load_run_config, scale_tag
from cfgx.train import adamw_with_warmup, batch_indices, optimizer_step

PAPER = "Zhao & Schwing 2025, arXiv 2503.10638 (flow-matching postprocessor)"


# ---------------------------------------------------------------- training


def flow_loss(net: nn.Module, x_hat: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss: ||v(z_t, t, c) - (y - x̂)||^2 with z_t = (1 - t) x̂ + t y, t ~ U[0, 1]."""
    t = torch.rand(len(x_hat), generator=generator, device=x_hat.device)
    tb = t.view(-1, *([1] * (x_hat.dim() - 1)))
    z = (1 - tb) * x_hat + tb * target
    return F.mse_loss(net(z, t, labels), target - x_hat)


def train_flow(net: nn.Module, x_hat: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, steps: int,
               batch_size: int, lr: float, device: torch.device | str, seed: int = 0,
               ckpt_path: Path | None = None, ckpt_every: int = 500, console=None, ema_decay: float = 0.995,
               warmup_steps: int = 100, grad_clip: float | None = 1.0,
               on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fit ``net`` to the rectified flow x̂ -> target (Zhao & Schwing 2025); trains ``net`` in place.

    AdamW with linear warm-up, gradient clipping and an EMA of the weights.
    With ``ckpt_path`` the state (model, EMA, optimizer, scheduler, step, RNG) is
    written atomically every ``ckpt_every`` steps, at the end and on Ctrl-C, and a
    later call with the same arguments resumes from it bit-exactly. Returns a
    summary dict whose ``"ema"`` entry is the EMA network (eval mode) to apply.
    """
    device = torch.device(device)
    net = net.to(device)
    ema = make_ema(net, float(ema_decay))
    opt, sched = adamw_with_warmup(net.parameters(), float(lr), 0.0, warmup_steps)  # not fused: as it always was
    gen = torch.Generator(device=device).manual_seed(int(seed))
    x_hat, targets, labels = x_hat.to(device), targets.to(device), labels.long().to(device)
    n, step, steps = len(labels), 0, int(steps)
    if n == 0:
        raise CfgxError("no training pairs for the flow postprocessor; raise postprocess.samples_per_scale")

    if ckpt_path is not None and Path(ckpt_path).is_file():
        ckpt = load_checkpoint(Path(ckpt_path), map_location=device)
        step = restore_training_state(
            ckpt, net, ema, opt, sched, mismatch=f"postprocessor checkpoint {ckpt_path} does not match the velocity "
            "network; delete it (or the run's postprocess/ folder) to retrain")
        gen.set_state(ckpt["rng"]["gen"].cpu())  # generator states are CPU byte tensors, even for CUDA
        say(console, f"resuming the flow postprocessor from step {step}/{steps}")

    losses: list[float] = list(ckpt.get("losses", [])) if step else []

    def save() -> None:
        if ckpt_path is not None:
            atomic_torch_save(Path(ckpt_path), training_state(net, ema, opt, sched, step, rng={"gen": gen.get_state()},
                                                              losses=losses, paper=PAPER))

    t0, step0 = time.perf_counter(), step
    net.train()
    acc, n_acc = 0.0, 0
    log_every = max(1, min(100, steps // 20 or 1))
    try:
        with progress_bar(console, "postprocess") as progress:
            task = progress.add_task("flow", total=steps, completed=step, loss=float("nan"))
            while step < steps:
                idx = batch_indices(step, n, int(batch_size), int(seed), device)
                loss = flow_loss(net, x_hat[idx], targets[idx], labels[idx], gen)
                optimizer_step(loss, net, opt, sched, ema, grad_clip)
                step += 1
                acc += float(loss.detach())
                n_acc += 1
                if step % log_every == 0 or step == steps:
                    mean = acc / n_acc
                    if not math.isfinite(mean):
                        raise CfgxError(f"flow postprocessor training diverged at step {step}; lower "
                                        "postprocess.lr")
                    losses.append(round(mean, 6))
                    progress.update(task, completed=step, loss=mean)
                    acc, n_acc = 0.0, 0
                if step % int(ckpt_every) == 0 or step == steps:
                    save()
                if on_step is not None:
                    on_step(step)
    except KeyboardInterrupt:
        save()
        raise CfgxError(f"postprocessor training interrupted at step {step}; checkpoint saved, re-run the "
                        "same command to resume") from None
    seconds = time.perf_counter() - t0
    out = ema.module.eval()
    return {"ema": out, "step": step, "resumed_from": step0, "seconds": round(seconds, 3),
            "pairs_per_s": round((step - step0) * int(batch_size) / seconds, 1) if seconds > 0 else None,
            "final_loss": losses[-1] if losses else None, "losses": losses}


# ---------------------------------------------------------------- applying


@torch.no_grad()
def apply_flow(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int = 10, method: str = "euler",
               batch_size: int = 500, device: torch.device | str = "cpu",
               clip: float | None = None) -> tuple[torch.Tensor, int, float]:
    """Integrate dz/dt = v(z, t, c) from t = 0 (z = x) to t = 1; returns (x_out on CPU, NFE/sample, seconds).

    Euler costs ``steps`` network evaluations per sample, Heun 2 * ``steps``.
    ``clip`` clamps the result to the data range (images: 1.0).
    """
    if method not in METHODS:
        raise CfgxError(f"postprocess.apply_method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise CfgxError(f"postprocess.apply_steps must be >= 1, got {steps}")
    device = torch.device(device)
    net = net.to(device).eval()
    t0 = time.perf_counter()
    outs = []
    ts = torch.linspace(0.0, 1.0, steps + 1).tolist()
    for s in range(0, len(x), batch_size):
        z = x[s:s + batch_size].to(device).float()
        y = labels[s:s + batch_size].long().to(device)
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            h = t_next - t
            v = net(z, torch.full((len(z),), t, device=device), y)
            if method == "heun":
                z_pred = z + h * v
                v2 = net(z_pred, torch.full((len(z),), t_next, device=device), y)
                z = z + h * 0.5 * (v + v2)
            else:
                z = z + h * v
        if clip is not None:
            z = z.clamp(-clip, clip)
        outs.append(z.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return torch.cat(outs), steps * (2 if method == "heun" else 1), seconds


# ---------------------------------------------------------------- run-level API


class FlowPostprocessor:
    """A run's trained flow postprocessor: ``FlowPostprocessor.load(run_dir, data, device).apply(x, y)``."""

    name = "flow"

    def __init__(self, nets: dict[str, nn.Module], info: dict[str, Any], data: DatasetBundle,
                 device: torch.device | str = "cpu") -> None:
        self.nets, self.info, self.data = nets, info, data
        self.device = torch.device(device)
        # info["settings"] stays as stored (the tag hashes it); keys older runs lack come from flow.yaml.
        self.settings = FlowSettings.from_config(info["settings"])
        self.steps, self.method = self.settings.apply_steps, self.settings.apply_method
        self.batch_size = self.settings.apply_batch_size

    @classmethod
    def load(cls, run_dir: Path, data: DatasetBundle, device: torch.device | str = "cpu",
             cfg_post: dict[str, Any] | None = None) -> FlowPostprocessor:
        """Load ``run_dir/postprocess``; ``cfg_post`` may override the apply_* settings."""
        pdir = Path(run_dir) / "postprocess"
        info_path = pdir / "info.json"
        if not info_path.is_file():
            raise CfgxError(f"no trained postprocessor in {pdir}; run 'cfgx postprocess run={run_dir}' first")
        info = read_json(info_path, f"delete {pdir} and re-run 'cfgx postprocess run={run_dir}'",
                         required={"settings": dict})
        if info.get("finished") is not True:
            raise CfgxError(f"the postprocessor in {pdir} did not finish training; re-run 'cfgx postprocess "
                            f"run={run_dir}' to resume it")
        names = info.get("checkpoints")  # joined onto pdir: cfgx's own names only, never a path out of it
        if not isinstance(names, dict) or any(not re.fullmatch(r"flow(_s\w+)?\.pt", str(n)) for n in names.values()):
            raise CfgxError(f"{info_path}: 'checkpoints' is not what cfgx wrote there; delete {pdir} and re-run "
                            f"'cfgx postprocess run={run_dir}'")
        settings = dict(info["settings"])
        for key in APPLY_KEYS:
            if cfg_post is not None and key in cfg_post and cfg_post[key] is not None:
                settings[key] = cfg_post[key]
        info["settings"] = settings
        nets: dict[str, nn.Module] = {}
        for key, fname in info["checkpoints"].items():
            net = build_velocity_net(data, {**settings, "init": "scratch"}, None, info.get("backbone"))
            try:
                net = ema_weights(net, load_checkpoint(pdir / str(fname))["ema"])
            except (KeyError, RuntimeError, TypeError, AttributeError, ValueError):
                raise CfgxError(f"{pdir / fname} does not match the stored settings; delete {pdir} and "
                                "retrain the postprocessor") from None
            nets[key] = net.to(device).eval()
        return cls(nets, info, data, device)

    @property
    def tag(self) -> str:
        """``flow-<hash>`` of every setting that changes the output: for sweep row file names."""
        blob = json.dumps({"settings": self.info["settings"], "pairs": self.info.get("pair_settings")},
                          sort_keys=True, default=str)
        return f"flow-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def row_fields(self) -> dict[str, Any]:
        """Columns describing this postprocessor in a sweep row (besides metrics and cost)."""
        st = self.settings
        return {"postprocess": "flow", "postprocess_tag": self.tag, "postprocess_k": st.k,
                "postprocess_nn_space": st.nn_space, "postprocess_init": self.info.get("init_effective"),
                "postprocess_train_scales": "per-scale" if st.per_scale else
                ",".join(f"{v:g}" for v in st.train_scales),
                "postprocess_method": f"{self.method}{self.steps}",
                "postprocess_train_seconds": self.info.get("train_seconds")}

    def net_for(self, scale: float | None) -> nn.Module:
        if "all" in self.nets:
            return self.nets["all"]
        if scale is None or scale_tag(scale) not in self.nets:
            have = ", ".join(sorted(self.nets))
            raise CfgxError(f"this postprocessor was trained per scale ({have}); s={scale} has no flow. "
                            "Retrain with postprocess.per_scale=false or include the scale in train_scales")
        return self.nets[scale_tag(scale)]

    def apply(self, x: torch.Tensor, y: torch.Tensor,
              scale: float | None = None) -> tuple[torch.Tensor, int, float]:
        """Postprocess ``x`` (labels ``y``, drawn at guidance ``scale``): (x_out, NFE/sample, seconds)."""
        return apply_flow(self.net_for(scale), x, y, self.steps, self.method, self.batch_size, self.device,
                          clip=self.data.clip)


def ignored_settings(run_dir: Path, typed: dict[str, Any]) -> list[str]:
    """One line per typed ``postprocess.<key>`` that the run's trained flow overrides (all but apply_*)."""
    info_path = Path(run_dir) / "postprocess" / "info.json"
    settings = (try_json(info_path) or {}).get("settings")
    if not isinstance(settings, dict):
        return []  # nothing trained (or unreadable): loading it reports that as an error
    out = []
    for key, value in typed.items():
        if key in APPLY_KEYS or key == "name" or key not in settings or jsonable(value) == settings[key]:
            continue
        out.append(f"note: postprocess.{key}={value} ignored: the trained flow in {info_path.parent} used "
                   f"{key}={settings[key]}; to change it, delete that folder and run 'cfgx postprocess' again")
    return out


def train_postprocessor(cfg_post: FlowSettings | Mapping[str, Any], run_dir: Path, data: DatasetBundle,
                        model: nn.Module, schedule, sampler, device: torch.device | str, console=None,
                        feature_fn: FeatureFn | None = None) -> dict[str, Any]:
    """``_train_postprocessor`` by one process at a time: a second one waits, then resumes the finished flow."""
    with locked(Path(run_dir) / ".postprocess.lock", f"the postprocessor of {run_dir}", console):
        return _train_postprocessor(cfg_post, run_dir, data, model, schedule, sampler, device, console, feature_fn)


def _train_postprocessor(cfg_post: FlowSettings | Mapping[str, Any], run_dir: Path, data: DatasetBundle,
                         model: nn.Module, schedule, sampler, device: torch.device | str, console=None,
                         feature_fn: FeatureFn | None = None) -> dict[str, Any]:
    """Generate pairs from a run, train the flow postprocessor and save it under ``run_dir/postprocess``.

    ``model`` is the run's EMA denoiser, ``sampler`` the sampler to draw x̂ with
    (the sweep's). Pairs come from ``train_scales`` mixed ("one for all scales",
    Zhao & Schwing 2025), or one flow per scale with ``per_scale: true``. Writes
    ``flow.pt`` (or ``flow_s<scale>.pt``), ``pairs.pt`` and ``info.json``;
    re-running with the same settings resumes (pairs and checkpoints are reused).
    ``feature_fn`` embeds samples for ``nn_space`` classifier/inception.
    Returns the info dict.
    """
    st = FlowSettings.from_config(cfg_post)
    device = torch.device(device)
    if st.nn_space not in NN_SPACES:
        raise CfgxError(f"postprocess.nn_space must be one of {NN_SPACES}, got {st.given['nn_space']!r}")
    if st.nn_space != "pixels" and feature_fn is None:
        raise CfgxError(f"postprocess.nn_space={st.given['nn_space']} needs its feature extractor; the caller "
                        "must pass feature_fn (or use nn_space=pixels)")
    if st.nn_space == "pixels":
        feature_fn = None
    backbone_cfg = None
    if data.is_image:
        cfg_path = Path(run_dir) / "config.yaml"
        backbone_cfg = load_run_config(Path(run_dir))["backbone"] if cfg_path.is_file() else None
        backbone_cfg = velocity_unet_config(backbone_cfg, st.unet, st.init)
    pdir = Path(run_dir) / "postprocess"
    pdir.mkdir(parents=True, exist_ok=True)
    scales = st.train_scales
    pair_settings = st.record(PAIR_KEYS)
    pair_settings.update(sampler=getattr(sampler, "tag", "?"),
                         sampler_steps=len(sampler.timesteps), eta=float(getattr(sampler, "eta", 0.0)))
    info_path = pdir / "info.json"
    old = read_json(info_path, f"delete {pdir} to retrain the postprocessor",
                    required={"settings": dict}) if info_path.is_file() else None
    if old is not None and ({k: old["settings"].get(k) for k in PAIR_KEYS + TRAIN_KEYS}
                            != st.record(PAIR_KEYS + TRAIN_KEYS)
                            or old.get("pair_settings") != jsonable(pair_settings)):
        raise CfgxError(f"{pdir} holds a postprocessor trained with other settings; delete that folder to "
                        "retrain, or repeat its settings (see its info.json)")

    # Written before anything else so a crash leaves settings that the next call can check against.
    info: dict[str, Any] = {"method": "flow", "paper": PAPER, "settings": st.record(),
                            "pair_settings": pair_settings, "backbone": backbone_cfg, "checkpoints": {},
                            "finished": False}
    atomic_write_json(info_path, jsonable(info) if old is None else {**old, "finished": False})

    # ---- pairs (cached: generation is the expensive part for large runs)
    real_x, real_y = stack_dataset(data.train)
    t_pairs = time.perf_counter()
    pairs = load_or_make_pairs(pdir, st, data, model, sampler, device, real_x, real_y, feature_fn, console)
    x_hat, y_all, s_all = dequantize(pairs["x_hat"]), pairs["labels"], pairs["scales"]
    idx = pairs["target_idx"]
    targets = real_x[idx].float()
    pair_seconds = time.perf_counter() - t_pairs

    # ---- train (one flow, or one per scale)
    if st.per_scale:
        groups = {scale_tag(s): s_all == s for s in scales}
    else:
        groups = {"all": torch.ones(len(y_all), dtype=torch.bool)}
    checkpoints, train_stats = {}, {}
    for key, mask in groups.items():
        fname = "flow.pt" if key == "all" else f"flow_s{key}.pt"
        torch.manual_seed(st.seed)  # a from-scratch network is the same on every re-run
        net = build_velocity_net(data, st, model if st.init == "run" else None, backbone_cfg)
        say(console, f"training flow postprocessor \\[{key}] on {int(mask.sum())} pairs: "
                      f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {st.given['steps']} steps")
        res = train_flow(net, x_hat[mask], targets[mask], y_all[mask], st.steps, st.batch_size, st.lr, device,
                         st.seed, pdir / fname, st.ckpt_every, console, st.ema_decay, st.warmup_steps, st.grad_clip)
        res.pop("ema")
        res["losses"] = res["losses"][-20:]
        checkpoints[key], train_stats[key] = fname, res
    # Voronoi reweighting diagnostics: how much of the real set the targets use.
    used = idx.unique()
    info.update({
        "checkpoints": checkpoints, "train": train_stats, "finished": True,
        "init_effective": st.given["init"] if data.is_image else "scratch (vector data: MLP)",
        "pairs": {"total": len(y_all), "per_scale": {scale_tag(s): int((s_all == s).sum()) for s in scales},
                  "per_class": torch.bincount(y_all, minlength=data.num_classes).tolist(),
                  "real_set": len(real_y), "distinct_targets": len(used),
                  "distinct_target_fraction": round(len(used) / len(real_y), 4),
                  "gen_seconds": pairs.get("gen_seconds"), "knn_seconds": pairs.get("knn_seconds"),
                  "pair_stage_seconds_this_call": round(pair_seconds, 3)},
        "train_seconds": round(sum(r["seconds"] for r in train_stats.values()), 3),
        "apply_cost": {"nfe_per_sample": st.apply_nfe, "method": st.given["apply_method"], "steps": st.apply_steps},
    })
    atomic_write_json(info_path, jsonable(info))
    say(console, f"saved the flow postprocessor to {pdir} (train {info['train_seconds']:.1f}s, "
                  f"{info['pairs']['distinct_target_fraction']:.0%} of real samples used as targets)")
    return info
