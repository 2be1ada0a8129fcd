"""Evaluating a trained run at a list of guidance scales.

For each scale (and each seed block): draw ``eval.num_samples`` samples with
paired seeds, extract their features once (cached per checkpoint, scale,
sampler, steps and seed block, so adding a metric never resamples), score them,
and write the row atomically, so an interrupted sweep resumes at the missing
scales. Then merge every row of the run into metrics.csv/.json/.md, draw the
plots and print the key columns.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.config import config_hash, guidance_specs
from cfgx.console import say
from cfgx.data import DatasetBundle, to_uint8
from cfgx.diffusion.guidance import GuidanceSpec, cfgpp_lambda
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.metrics.suite import EvalSuite
from cfgx.report.tables import console_table, plot_run, write_tables
from cfgx.sample import balanced_labels, generate
from cfgx.store.locks import acquire, locked, release_all
from cfgx.store.rundir import (
    atomic_save_image,
    atomic_savefig,
    atomic_torch_save,
    atomic_write_json,
    device_name,
    scale_tag,
    versions,
)
from cfgx.store.safeload import UnreadableFileError, safe_load

SEED_BLOCK_STRIDE = 1_000_000  # block b draws from seeds eval.seed + b * stride: disjoint streams


def row_key(method: str, postprocess: str, sampler: str, steps: int, eta: float, n: int, seed: int,
            blocks: int, ckpt_step: int, scale: float, batch_size: int, metrics: str = "") -> str:
    """File name of a row (or, without ``metrics``, of its samples' cached features).

    Every choice that changes the samples is in it; the batch size too, since noise
    is drawn per batch (paired across scales). ``metrics`` hashes what the numbers
    depend on besides the samples (reference set, metric settings), so another
    reference makes another row but reuses the cached features.
    """
    b = f"-b{blocks}" if blocks > 1 else ""
    m = f"-m{metrics}" if metrics else ""
    return (f"{method}-{postprocess}-{sampler}{steps}-eta{scale_tag(eta)}-n{n}-bs{batch_size}-seed{seed}{b}-"
            f"step{ckpt_step}{m}-s{scale_tag(scale)}")


def save_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int, path: Path) -> torch.Tensor:
    """Rows = classes, columns = the first ``per_class`` samples of each class (same seeds at every s)."""
    import torchvision

    idx: list[int] = []
    for c in range(num_classes):
        ids = (y == c).nonzero().flatten()[:per_class].tolist()
        idx += ids + [ids[-1]] * (per_class - len(ids)) if ids else []
    imgs = to_uint8(x[idx]).float() / 255.0
    scale = max(1, 64 // x.shape[-1])  # make 8 px digits visible
    if scale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(imgs, nrow=per_class, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(grid, path)
    return grid


def save_side_by_side(grids: dict[str, torch.Tensor], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def read_row(path: Path) -> dict | None:
    """A row file's row, or None when it is not one (rows are written atomically: a foreign file)."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and "s" in row else None


def load_rows(run_dir: Path, console=None) -> list[dict]:
    rows = []
    for p in sorted((Path(run_dir) / "sweep" / "rows").glob("*.json")):
        row = read_row(p)
        if row is None:
            say(console, f"[yellow]ignoring unreadable row file {p} (not a cfgx row); a sweep at its scale "
                         "recomputes it, or delete it")
            continue
        rows.append(row)
    return rows


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and 95% t-interval half-width over seed blocks (None where undefined)."""
    vals = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    from scipy.stats import t

    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return m, float(t.ppf(0.975, len(vals) - 1) * sd / len(vals) ** 0.5)


def combine_blocks(block_rows: list[dict[str, Any]]) -> dict[str, Any]:
    if len(block_rows) == 1:
        return dict(block_rows[0])
    out: dict[str, Any] = {}
    for k in block_rows[0]:
        vals = [r.get(k) for r in block_rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None) and \
                any(v is not None for v in vals):
            out[k], ci = mean_ci(vals)
            out[f"{k}_ci95"] = ci
        else:
            out[k] = vals[0]
    return out


def guidance_classifier_options(cfg: DictConfig) -> dict[str, Any]:
    """guidance.classifier with unset (null) options dropped, so per-data-kind defaults apply."""
    opts = OmegaConf.to_container(cfg.guidance.classifier, resolve=True) if "classifier" in cfg.guidance else {}
    return {k: v for k, v in (opts or {}).items() if v is not None}


def load_guide(guide: str, cfg: DictConfig, run_dir: Path, data: DatasetBundle, schedule: NoiseSchedule,
               device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Autoguidance's guide: ``step:N`` (EMA snapshot N of this run) or ``run:PATH`` (another run
    of the same dataset and noise schedule). Returns the model and the row fields naming it."""
    from cfgx.store.checkpoints import load_snapshot_model
    from cfgx.store.rundir import load_run_config, read_meta, resolve_run
    from cfgx.train import load_ema_model

    kind, _, arg = guide.partition(":")
    if kind == "step":
        model = load_snapshot_model(run_dir, cfg, data, schedule, device, int(arg))
        return model, {"guide": guide, "guide_step": int(arg), "guide_run": str(run_dir)}
    other = resolve_run(arg, Path(str(cfg.paths.runs)))
    ocfg = OmegaConf.create(load_run_config(other))
    if ocfg.dataset.name != data.name:
        raise CfgxError(f"guidance.autoguidance.guide={guide} is a run of dataset {ocfg.dataset.name}, this run is "
                        f"of {data.name}; guide with a run of the same dataset")
    if OmegaConf.to_container(ocfg.diffusion) != OmegaConf.to_container(cfg.diffusion):
        raise CfgxError(f"guidance.autoguidance.guide={guide} uses another noise schedule (diffusion.*); guide with "
                        "a run trained with the same diffusion settings")
    model, step = load_ema_model(other, ocfg, data, schedule, device)
    return model, {"guide": guide, "guide_step": step, "guide_run": str(other),
                   "guide_config_hash": read_meta(other).get("config_hash")}


class Sweeper:
    """Samples, featurises and scores one run at many scales; holds what all scales share."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data: DatasetBundle, model: torch.nn.Module,
                 ckpt_step: int, device: torch.device, console=None) -> None:
        self.cfg, self.run_dir, self.data, self.model = cfg, Path(run_dir), data, model
        self.ckpt_step, self.device, self.console = ckpt_step, device, console
        ec = cfg.eval
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        self.sampler = build_sampler(cfg.sampler.name, self.schedule, int(cfg.sampler.steps),
                                     float(cfg.sampler.eta), clip_x0=data.clip)
        self.n, self.seed, self.bs = int(ec.num_samples), int(ec.seed), int(ec.batch_size)
        self.blocks = int(OmegaConf.select(cfg, "eval.seed_blocks", default=1))
        self.labels = balanced_labels(self.n, data.num_classes)
        self.specs = guidance_specs(cfg)
        self.postprocess = str(cfg.postprocess.name)
        self.use_bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        # Load every rule's extra model (guidance classifier, autoguidance guide) before sampling
        # anything, so a bad guide fails in one line before minutes of work.
        self._setups = [self._setup(spec) for spec in self.specs]
        self._use(0)
        self.post = None
        self.post_tag = "none"
        if self.postprocess != "none":
            from cfgx.postprocess import FlowPostprocessor

            self.post = FlowPostprocessor.load(self.run_dir, data, device,
                                               OmegaConf.to_container(cfg.postprocess, resolve=True))
            # The tag hashes every training and apply setting: a retrained flow never reuses old rows.
            self.post_tag = self.post.tag
        self.suite = EvalSuite(cfg, data, device, console)
        self.metrics_hash = self.suite.settings_hash()
        self.fid_warned = False

    def _setup(self, spec: GuidanceSpec) -> dict[str, Any]:
        """(row-key tag, extra row fields, classifier, guide model) of one guidance rule."""
        out: dict[str, Any] = {"tag": spec.tag(), "clf": None, "guide": None,
                               "info": {"guidance_schedule": spec.schedule,
                                        "guidance_options": json.dumps(spec.options, sort_keys=True)}}
        if spec.method == "classifier":
            from cfgx.backbones.noisy_classifier import get_guidance_classifier

            with distributed.main_first():  # rank 0 trains and caches it in the run dir, the others load it
                out["clf"], info = get_guidance_classifier(self.run_dir, self.data, self.schedule, self.device,
                                                           guidance_classifier_options(self.cfg), self.console)
            # Rows from a differently trained guidance classifier are other rows.
            out["tag"] = f"classifier-{str(info.get('key'))[:6]}"
            out["info"].update({"guidance_classifier": info.get("key"),
                                "guidance_classifier_val_acc": json.dumps(info.get("val_accuracy"))})
        elif spec.method == "autoguidance":
            out["guide"], guide_info = load_guide(str(spec.options["guide"]), self.cfg, self.run_dir, self.data,
                                                  self.schedule, self.device)
            out["info"].update(guide_info)
        return out

    def _use(self, i: int) -> None:
        """Make the i-th rule of ``guidance.method`` the one the next scales are sampled with."""
        spec, setup = self.specs[i], self._setups[i]
        self.rule, self.spec, self.method, self.method_tag = i, spec, spec.label, setup["tag"]
        self.guide_clf, self.guide_model, self.guide_info = setup["clf"], setup["guide"], setup["info"]

    def _samples(self, scale: float, block: int, first_batch: int = 0, labels: torch.Tensor | None = None):
        return generate(self.model, self.sampler, self.data.shape, self.labels if labels is None else labels, scale,
                        self.seed + block * SEED_BLOCK_STRIDE, self.bs, self.device, method=self.spec,
                        classifier=self.guide_clf, autocast_bf16=self.use_bf16, guide=self.guide_model,
                        first_batch=first_batch)

    def run(self, scales: list[float]) -> list[dict[str, Any]]:
        """Every rule of ``guidance.method`` at every scale, then the run's merged tables and plots."""
        out_rows: list[dict[str, Any]] = []
        for i, spec in enumerate(self.specs):
            if len(self.specs) > 1:
                say(self.console, f"guidance {spec.label}")
            self._use(i)
            out_rows += self._run_scales(scales)
        release_all(self.run_dir / "sweep" / "rows")
        with locked(self.run_dir / "sweep" / ".tables.lock"):  # the last writer must see every row
            all_rows = load_rows(self.run_dir, self.console)  # every sweep of this run, not just this one
            write_tables(all_rows, self.run_dir)
            plot_run(all_rows, self.run_dir)
        return out_rows

    def _run_scales(self, scales: list[float]) -> list[dict[str, Any]]:
        rows_dir = self.run_dir / "sweep" / "rows"
        feat_dir = self.run_dir / "sweep" / "features"
        grids: dict[str, dict[str, torch.Tensor]] = {}
        out_rows: list[dict[str, Any]] = []
        variants = ["none"] + ([self.postprocess] if self.post is not None else [])
        for s in scales:
            # Features depend on the samples only; a row also on the reference set and metric settings.
            common = (self.sampler.name, len(self.sampler.timesteps), self.sampler.eta, self.n, self.seed,
                      self.blocks, self.ckpt_step, s, self.bs)
            sample_keys = {v: row_key(self.method_tag, self.post_tag if v != "none" else v, *common)
                           for v in variants}
            keys = {v: row_key(self.method_tag, self.post_tag if v != "none" else v, *common, self.metrics_hash)
                    for v in variants}
            overwrite = bool(self.cfg.eval.overwrite)
            # One process per scale at a time: a concurrent sweep waits here, then finds the rows done.
            release_all(rows_dir)  # the previous scale's
            acquire(rows_dir / f".{sample_keys['none']}.lock", True, f"s={s:g} (another sweep computes it)",
                    self.console)
            todo = []
            for v in variants:
                rpath = rows_dir / f"{keys[v]}.json"
                row = None if overwrite or not rpath.is_file() else read_row(rpath)
                if row is None and rpath.is_file() and not overwrite:
                    say(self.console, f"[yellow]row file {rpath} is unreadable; recomputing it")
                if row is None:
                    todo.append(v)
                else:
                    out_rows.append(row)
            if not todo:
                say(self.console, f"s={s:g}: already in the table; eval.overwrite=true recomputes")
                continue
            per_variant: dict[str, list[dict]] = {v: [] for v in todo}
            for b in range(self.blocks):
                x_cache: dict[int, Any] = {}  # this process's sample batches, shared by the variants
                for v in todo:
                    fpath = feat_dir / f"{sample_keys[v]}-block{b}.pt"
                    feats = None
                    if fpath.is_file() and not overwrite:
                        try:  # a crafted file (UnsafeFileError) stops the sweep; a broken one is redone
                            blob = safe_load(fpath)
                            feats, tinfo, x_grid = blob["features"], blob["timing"], blob.get("grid_x")
                        except (UnreadableFileError, KeyError, TypeError):
                            feats = None
                            say(self.console, f"[yellow]{fpath} is unreadable; recomputing it")
                    if feats is None:
                        if distributed.active():  # wake the other ranks: which rule, scale, block, variant
                            distributed.broadcast_object(("features", self.rule, s, b, v))
                        feats, tinfo, x_grid = self._features(s, b, v, x_cache)
                        atomic_torch_save(fpath, {"features": feats, "timing": tinfo, "grid_x": x_grid})
                    metrics = self.suite.score(feats, self.labels)
                    metrics.update({f"_{k}": val for k, val in tinfo.items()})
                    per_variant[v].append(metrics)
                    if b == 0 and x_grid is not None and self.data.is_image:
                        grids.setdefault(v, {})[f"s = {s:g}  (w = {s - 1:g})"] = save_grid(
                            x_grid, self._grid_labels(), self.data.num_classes,
                            int(self.cfg.eval.grid_per_class), self.run_dir / "sweep" / "grids" / f"{keys[v]}.png")
            for v in todo:
                row = self._row(s, v, combine_blocks(per_variant[v]))
                atomic_write_json(rows_dir / f"{keys[v]}.json", row)
                out_rows.append(row)
                self._report_scale(row)
        for v, g in grids.items():
            title = (f"{self.data.name}: {self.method} guidance, same seeds at every scale; rows are classes"
                     + ("" if v == "none" else f"; postprocess={v}"))
            # Plain CFG keeps samples.png; each other rule gets its own file beside it.
            stem = "samples" + ("" if self.method == "cfg" else f"_{self.method.replace('@', '_')}")
            save_side_by_side(g, self.run_dir / (f"{stem}.png" if v == "none" else f"{stem}_{v}.png"), title)
        return out_rows

    def _features(self, s: float, b: int, v: str, x_cache: dict[int, Any]):
        """Features, timing and grid images of one scale/block/variant, computed batch by batch.

        Every rank draws, postprocesses and featurises the sample batches ``my_share``
        gives it (batch k has the same labels and noise whoever draws it) and rank 0
        gathers them in batch order; None elsewhere. One process runs the same code
        with every batch, so a sharded sweep's table equals a single-process one.
        """
        grid_n = int(self.cfg.eval.grid_per_class) * self.data.num_classes if self.data.is_image else 0
        local: dict[int, Any] = {}
        secs = post_secs = 0.0
        nfe = post_nfe = None
        for k in distributed.my_share(math.ceil(self.n / self.bs)):
            labels = self.labels[k * self.bs:(k + 1) * self.bs]
            if k not in x_cache:
                batch = self._samples(s, b, first_batch=k, labels=labels)
                x_cache[k] = (batch.x, batch.seconds, batch.nfe)
            x, t, nfe = x_cache[k]
            secs += t
            if v != "none":
                x, post_nfe, pt = self.post.apply(x, labels, scale=s)
                post_secs += pt
            local[k] = (self.suite.extract(x), x[:max(0, grid_n - k * self.bs)].clone() if grid_n else None)
        parts = distributed.gather_by_index(local)
        times = distributed.gather_objects((secs, post_secs))  # wall time of a shard = the slowest rank
        if parts is None or times is None:
            return None, None, None
        feats = {key: torch.cat([f[key] for f, _ in parts]) for key in parts[0][0]}
        x_grid = torch.cat([g for _, g in parts if g is not None and len(g)]) if grid_n else None
        secs, post_secs = max(t for t, _ in times), max(p for _, p in times)
        tinfo: dict[str, Any] = {"seconds": secs, "nfe": nfe}
        if v != "none":
            tinfo = {"seconds": secs + post_secs, "nfe": nfe + post_nfe, "post_seconds": post_secs,
                     "post_nfe": post_nfe}
        return feats, tinfo, x_grid

    def serve(self) -> None:
        """Ranks > 0: compute feature shards whenever rank 0 asks, until it says done."""
        x_cache: dict[int, Any] = {}
        current = None
        while True:
            msg = distributed.broadcast_object(None)
            if msg[0] == "done":
                return
            _, i, s, b, v = msg
            if current != (i, s, b):
                self._use(i)
                x_cache, current = {}, (i, s, b)
            self._features(s, b, v, x_cache)

    def _grid_labels(self) -> torch.Tensor:
        k = int(self.cfg.eval.grid_per_class)
        return self.labels[: k * self.data.num_classes]

    def _grid_subset(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.data.is_image:
            return None
        return x[: int(self.cfg.eval.grid_per_class) * self.data.num_classes].clone()

    def _row(self, s: float, postprocess: str, m: dict[str, Any]) -> dict[str, Any]:
        seconds = float(m.pop("_seconds"))
        nfe = m.pop("_nfe")
        post_s, post_nfe = m.pop("_post_seconds", None), m.pop("_post_nfe", None)
        for k in [k for k in m if k.startswith("_")]:
            m.pop(k)
        vers = versions()
        total = self.n * self.blocks
        row: dict[str, Any] = {"s": s, "w_ho": s - 1.0, "method": self.method, "postprocess": postprocess}
        if self.spec.method == "cfgpp":
            row["cfgpp_lambda"] = cfgpp_lambda(s, float(self.spec.options["s_at_lambda1"]))
        row.update({k: _clean(v) for k, v in m.items()})
        if postprocess != "none" and self.post is not None:
            row.update(self.post.row_fields())
        row.update({
            "sampler": self.sampler.name, "steps": len(self.sampler.timesteps), "eta": self.sampler.eta,
            "nfe": nfe, "postprocess_nfe": post_nfe, "postprocess_seconds": post_s,
            "num_samples": self.n, "seed_blocks": self.blocks, "seed": self.seed, "batch_size": self.bs,
            "seconds": round(seconds * self.blocks, 3),
            "samples_per_s": round(total / (seconds * self.blocks), 2) if seconds > 0 else None,
            "checkpoint_step": self.ckpt_step, **self.suite.info, **self.guide_info,
            "config_hash": config_hash(self.cfg), "device": device_name(self.device),
            "cfgx": vers.get("cfgx"), "torch": vers.get("torch"), "torchmetrics": vers.get("torchmetrics"),
        })
        return row

    def _report_scale(self, row: dict[str, Any]) -> None:
        bits = [f"s={row['s']:g}", f"acc {row['accuracy']:.3f}", f"FD(clf) {row['fd_classifier']:.3g}"]
        if row.get("fid") is not None:
            bits.append(f"FID {row['fid']:.2f}")
        if row["postprocess"] != "none":
            bits.insert(1, f"\\[{row['postprocess']}]")  # escaped: rich would read [flow] as markup
        bits.append(f"{row['samples_per_s'] or 0:.1f} samples/s")
        say(self.console, "  ".join(bits))
        if row.get("fid_comparable") is False and not self.fid_warned:
            self.fid_warned = True
            say(self.console, f"[yellow]note: FID from {self.n} samples (< 2048, the feature dimension) is biased and "
                      "not comparable with published numbers; raise eval.num_samples (50k is standard)")



def run_sweep(cfg: DictConfig, run_dir: Path, data: DatasetBundle, model: torch.nn.Module, ckpt_step: int,
              device: torch.device, console=None) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every scale in ``cfg.guidance.scales``; returns this sweep's rows."""
    t0 = time.perf_counter()
    sweeper = Sweeper(cfg, run_dir, data, model, ckpt_step, device, console)
    if not distributed.is_main():
        sweeper.serve()  # rank 0 scores and writes every row
        return []
    try:
        rows = sweeper.run([float(v) for v in cfg.guidance.scales])
    finally:
        release_all(Path(run_dir) / "sweep")
        if distributed.active():
            distributed.broadcast_object(("done",))
    if console is not None:
        console.print(console_table(rows, title=f"{data.name}: {', '.join(p.label for p in sweeper.specs)} guidance, "
                                                f"{sweeper.sampler.name} {len(sweeper.sampler.timesteps)} steps, "
                                                f"{sweeper.n} samples/scale"))
        console.print(f"sweep took {time.perf_counter() - t0:.1f}s; wrote {run_dir}/metrics.csv, metrics.json, "
                      "metrics.md and plots")
    return rows


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
