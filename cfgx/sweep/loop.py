"""Evaluating a trained run at a list of guidance scales: one loop that every rank walks.

For each rule and scale, rank 0 decides the plan (which rows are missing, which sample features are
not cached) and broadcasts it; every rank samples its shard of the batches; rank 0 gathers the
features, scores them and writes the row atomically, so an interrupted sweep resumes at the missing
scales. Samples have paired seeds and their features are cached per checkpoint, scale, sampler,
steps and seed block, so adding a metric never resamples. At the end rank 0 merges every row of the
run into metrics.csv/.json/.md and draws the plots. One process runs the same loop with every batch,
so a sharded sweep's table equals a single-process one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.config import config_hash, guidance_rules
from cfgx.console import say
from cfgx.data import DatasetBundle
from cfgx.diffusion.guidance import Prepared, RuleEnv
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.loggers.hub import LoggerHub
from cfgx.metrics.reference import write_samples_npz
from cfgx.metrics.suite import EvalSuite
from cfgx.report.best_scale import best_scale_console
from cfgx.report.grids import save_grid, save_side_by_side
from cfgx.report.plots import plot_run
from cfgx.report.tables import console_table, write_tables
from cfgx.sample import balanced_labels, decoded, generate, run_sampler, sample_shape
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.locks import acquire, locked, release_all
from cfgx.store.reader import features_blob
from cfgx.store.rundir import device_name, versions
from cfgx.store.safeload import UnreadableFileError, safe_load
from cfgx.sweep.rows import RowKey, combine_blocks, finite_or_none, load_rows, read_row, write_row
from cfgx.sweep.search import ScalePlanner, auto_settings, search_line, search_metric

SEED_BLOCK_STRIDE = 1_000_000  # block b draws from seeds eval.seed + b * stride: disjoint streams


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's part of the config, read once."""

    num_samples: int
    seed: int
    batch_size: int
    seed_blocks: int
    grid_per_class: int
    overwrite: bool
    postprocess: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SweepSettings:
        ec = cfg.eval
        return cls(int(ec.num_samples), int(ec.seed), int(ec.batch_size), int(ec.seed_blocks),
                   int(ec.grid_per_class), bool(ec.overwrite), str(cfg.postprocess.name))


@dataclass(frozen=True)
class ScalePlan:
    """What every rank does at one (rule, s): decided by rank 0, the same on every rank."""

    s: float
    todo: tuple[str, ...]                  # variants ("none", the postprocessor) whose rows are missing
    compute: tuple[tuple[int, str], ...]   # (seed block, variant) whose features are not cached


STOP = "stop"  # rank 0's last broadcast when it stops early: the other ranks return


class Sweeper:
    """Samples, featurises and scores one run at many scales; holds what all scales share."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data: DatasetBundle, model: torch.nn.Module,
                 ckpt_step: int, device: torch.device, console=None, hub: LoggerHub | None = None) -> None:
        self.cfg, self.run_dir, self.data, self.model = cfg, Path(run_dir), data, model
        self.ckpt_step, self.device, self.console = ckpt_step, device, console
        self.hub = hub if hub is not None else LoggerHub()  # experiment loggers: rows and images (rank 0)
        self.opt = SweepSettings.from_config(cfg)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        # An imported model (cfgx/pretrained) may sample latents: its own shape, x0 clipping off, decoded later.
        self.shape = sample_shape(model, data)
        self.sampler = run_sampler(cfg, self.schedule, model, data)
        self.labels = balanced_labels(self.opt.num_samples, data.num_classes)
        self.use_bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        # Every rule's extra model (guidance classifier, autoguidance guide) is loaded before sampling
        # anything, so a bad guide fails in one line before minutes of work.
        env = RuleEnv(self.run_dir, cfg, data, self.schedule, device, console)
        self.rules: list[Prepared] = [rule.prepare(env) for rule in guidance_rules(cfg)]
        self.post, self.post_tag = None, "none"
        if self.opt.postprocess != "none":
            from cfgx.postprocess import FlowPostprocessor  # the postprocessor's nets: only when asked for

            self.post = FlowPostprocessor.load(self.run_dir, data, device,
                                               OmegaConf.to_container(cfg.postprocess, resolve=True))
            # The tag hashes every training and apply setting: a retrained flow never reuses old rows.
            self.post_tag = self.post.tag
        self.suite = EvalSuite(cfg, data, device, console)
        self.metrics_hash = self.suite.settings_hash()
        self.fid_warned = False
        auto = auto_settings(cfg)  # guidance=auto: search each rule's best s (cfgx/sweep/search.py)
        self.search = auto and (*auto[:3], search_metric(auto[3], self.suite.spaces))
        self.searching = False
        self.rows_dir = self.run_dir / "sweep" / "rows"
        self.feat_dir = self.run_dir / "sweep" / "features"
        self.loaded: dict[Path, dict[str, Any]] = {}  # rank 0: cached features the plan found, until scored

    # ------------------------------------------------------------------ the loop

    def run(self, scales: list[float]) -> list[dict[str, Any]] | None:
        """Every rule at every scale, then the run's merged tables and plots (rank 0). Every rank calls
        this; rank 0 returns this sweep's rows, the others None."""
        out_rows: list[dict[str, Any]] = []
        for p in self.rules:
            if len(self.rules) > 1:
                say(self.console, f"guidance {p.rule.label}")
            grids: dict[str, dict[str, torch.Tensor]] = {}
            planner = ScalePlanner(scales, self.search or None)  # rank 0 asks it; the others hear its answer
            self.searching, n_done = planner.searched, len(out_rows)
            while (s := distributed.on_main(lambda pl=planner, new=out_rows[n_done:]: pl.next(new))) is not None:
                n_done = len(out_rows)
                plan = s if s == STOP else distributed.on_main(lambda s=s, p=p, d=out_rows: self._plan(p, s, d))
                if plan == STOP:
                    return None
                out_rows += self._run_plan(p, plan, grids)
                for row in out_rows[n_done:]:  # this scale's rows, new or already in the table
                    self.hub.log_row(row)
            if planner.searched and distributed.is_main():
                say(self.console, search_line(p.rule.label, planner, self.search))
            if distributed.is_main():
                for path in self._save_side_by_side(p, grids):
                    self.hub.log_image(path, self.ckpt_step)
        if not distributed.is_main():
            return None
        release_all(self.rows_dir)
        with locked(self.run_dir / "sweep" / ".tables.lock"):  # the last writer must see every row
            all_rows = load_rows(self.run_dir, self.console)  # every sweep of this run, not just this one
            write_tables(all_rows, self.run_dir)
            figures = plot_run(all_rows, self.run_dir)
        for path in figures:
            self.hub.log_image(path, self.ckpt_step)
        return out_rows

    def _key(self, p: Prepared, variant: str, s: float, metrics: str = "") -> RowKey:
        return RowKey(p.tag, self.post_tag if variant != "none" else "none", self.sampler.tag,
                      len(self.sampler.timesteps), self.sampler.eta, self.opt.num_samples, self.opt.batch_size,
                      self.opt.seed, self.opt.seed_blocks, self.ckpt_step, s, metrics)

    def _variants(self) -> list[str]:
        return ["none"] + ([self.opt.postprocess] if self.post is not None else [])

    def _plan(self, p: Prepared, s: float, out_rows: list[dict[str, Any]]) -> ScalePlan:
        """Rank 0: lock the scale, collect its finished rows into ``out_rows``, list what is missing."""
        release_all(self.rows_dir)  # the previous scale's
        # One process per scale at a time: a concurrent sweep waits here, then finds the rows done.
        acquire(self.rows_dir / f".{self._key(p, 'none', s).name}.lock", True,
                f"s={s:g} (another sweep computes it)", self.console)
        todo = []
        for v in self._variants():
            rpath = self.rows_dir / f"{self._key(p, v, s, self.metrics_hash).name}.json"
            row = None if self.opt.overwrite or not rpath.is_file() else read_row(rpath)
            if row is None and rpath.is_file() and not self.opt.overwrite:
                say(self.console, f"[yellow]row file {rpath} is unreadable; recomputing it")
            if row is None:
                todo.append(v)
            else:
                out_rows.append(row)
        if not todo:
            say(self.console, f"s={s:g}: already in the table; eval.overwrite=true recomputes")
        compute = []
        for b in range(self.opt.seed_blocks):
            for v in todo:
                fpath = self.feat_dir / self._key(p, v, s).features_name(b)
                blob = self._cached(fpath)
                if blob is None:
                    compute.append((b, v))
                else:
                    self.loaded[fpath] = blob
        return ScalePlan(s, tuple(todo), tuple(compute))

    def _cached(self, fpath: Path) -> dict[str, Any] | None:
        """A features file's content, or None to compute it (a crafted file stops the sweep)."""
        if self.opt.overwrite or not fpath.is_file():
            return None
        try:
            blob = safe_load(fpath)
            if not features_blob(blob):
                raise TypeError("not the structure a sweep writes")
            if not self.suite.covers(blob["features"]):  # written before a feature space was switched on
                return None
            return {"features": blob["features"], "timing": blob["timing"], "grid_x": blob.get("grid_x")}
        except (UnreadableFileError, KeyError, TypeError):
            say(self.console, f"[yellow]{fpath} is unreadable; recomputing it")
            return None

    def _run_plan(self, p: Prepared, plan: ScalePlan, grids: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
        """Every rank samples its shard of what ``plan`` computes; rank 0 scores and writes the rows."""
        per_variant: dict[str, list[dict]] = {v: [] for v in plan.todo}
        for b in range(self.opt.seed_blocks):
            x_cache: dict[int, Any] = {}  # this process's sample batches, shared by the variants
            for v in plan.todo:
                fpath = self.feat_dir / self._key(p, v, plan.s).features_name(b)
                if (b, v) in plan.compute:
                    blob = self._features(p, plan.s, b, v, x_cache)
                    if blob is not None:
                        atomic_torch_save(fpath, blob)
                else:
                    blob = self.loaded.pop(fpath, None)  # rank 0 read it while planning
                if blob is None:  # ranks above 0: their part is done
                    continue
                metrics = self.suite.score(blob["features"], self.labels)
                if "samples_u8" in blob["features"]:  # eval.save_npz: for ADM's own evaluator
                    write_samples_npz(self.run_dir / "sweep" / "samples" / self._key(p, v, plan.s).features_name(b)
                                      .replace(".pt", ".npz"), blob["features"]["samples_u8"], self.labels)
                metrics.update({f"_{k}": val for k, val in blob["timing"].items()})
                per_variant[v].append(metrics)
                if b == 0 and blob["grid_x"] is not None and self.data.is_image:
                    grids.setdefault(v, {})[f"s = {plan.s:g}  (w = {plan.s - 1:g})"] = save_grid(
                        blob["grid_x"], self._grid_labels(), self.data.num_classes, self.opt.grid_per_class,
                        self.run_dir / "sweep" / "grids" / f"{self._key(p, v, plan.s, self.metrics_hash).name}.png")
        rows = []
        for v in plan.todo if distributed.is_main() else ():
            row = self._row(p, plan.s, v, combine_blocks(per_variant[v]))
            write_row(self.rows_dir, self._key(p, v, plan.s, self.metrics_hash), row)
            rows.append(row)
            self._report_scale(row)
        return rows

    # ------------------------------------------------------------------ sampling and features

    def _features(self, p: Prepared, s: float, b: int, v: str, x_cache: dict[int, Any]) -> dict[str, Any] | None:
        """Features, timing and grid images of one scale/block/variant, computed batch by batch.

        Every rank draws, postprocesses and featurises the sample batches ``my_share`` gives it
        (batch k has the same labels and noise whoever draws it) and rank 0 gathers them in batch
        order; None elsewhere.
        """
        grid_n = self.opt.grid_per_class * self.data.num_classes if self.data.is_image else 0
        bs = self.opt.batch_size
        local: dict[int, Any] = {}
        secs = post_secs = 0.0
        nfe = post_nfe = None
        for k in distributed.my_share(math.ceil(self.opt.num_samples / bs)):
            labels = self.labels[k * bs:(k + 1) * bs]
            if k not in x_cache:
                batch = generate(self.model, self.sampler, self.shape, labels, s,
                                 self.opt.seed + b * SEED_BLOCK_STRIDE, bs, self.device, rule=p.rule,
                                 classifier=p.classifier, autocast_bf16=self.use_bf16, guide=p.guide, first_batch=k)
                x, t_dec = decoded(self.model, batch.x)
                x_cache[k] = (x, batch.seconds + t_dec, batch.nfe)
            x, t, nfe = x_cache[k]
            secs += t
            if v != "none":
                x, post_nfe, pt = self.post.apply(x, labels, scale=s)
                post_secs += pt
            local[k] = (self.suite.extract(x), x[:max(0, grid_n - k * bs)].clone() if grid_n else None)
        parts = distributed.gather_by_index(local)
        times = distributed.gather_objects((secs, post_secs))  # wall time of a shard = the slowest rank
        if parts is None or times is None:
            return None
        feats = {key: torch.cat([f[key] for f, _ in parts]) for key in parts[0][0]}
        x_grid = torch.cat([g for _, g in parts if g is not None and len(g)]) if grid_n else None
        secs, post_secs = max(t for t, _ in times), max(q for _, q in times)
        tinfo: dict[str, Any] = {"seconds": secs, "nfe": nfe}
        if v != "none":
            tinfo = {"seconds": secs + post_secs, "nfe": nfe + post_nfe, "post_seconds": post_secs,
                     "post_nfe": post_nfe}
        return {"features": feats, "timing": tinfo, "grid_x": x_grid}

    def _grid_labels(self) -> torch.Tensor:
        return self.labels[: self.opt.grid_per_class * self.data.num_classes]

    # ------------------------------------------------------------------ rows and what a reader sees

    def _row(self, p: Prepared, s: float, postprocess: str, m: dict[str, Any]) -> dict[str, Any]:
        seconds = float(m.pop("_seconds"))
        nfe = m.pop("_nfe")
        post_s, post_nfe = m.pop("_post_seconds", None), m.pop("_post_nfe", None)
        for k in [k for k in m if k.startswith("_")]:
            m.pop(k)
        vers = versions()
        n, blocks = self.opt.num_samples, self.opt.seed_blocks
        row: dict[str, Any] = {"s": s, "w_ho": s - 1.0, "method": p.rule.label, "postprocess": postprocess,
                               **p.rule.row_fields(s), "protocol": str(self.cfg.eval.get("protocol", "default")),
                               "searched": self.searching}
        row.update({k: finite_or_none(v) for k, v in m.items()})
        if postprocess != "none" and self.post is not None:
            row.update(self.post.row_fields())
        row.update({
            "sampler": self.sampler.tag, "steps": len(self.sampler.timesteps), "eta": self.sampler.eta,
            "nfe": nfe, "postprocess_nfe": post_nfe, "postprocess_seconds": post_s,
            "num_samples": n, "seed_blocks": blocks, "seed": self.opt.seed, "batch_size": self.opt.batch_size,
            "seconds": round(seconds * blocks, 3),
            "samples_per_s": round(n * blocks / (seconds * blocks), 2) if seconds > 0 else None,
            "checkpoint_step": self.ckpt_step, **self.suite.info, **p.info,
            **(self.model.row_fields() if hasattr(self.model, "row_fields") else {}),
            "config_hash": config_hash(self.cfg), "device": device_name(self.device),
            "cfgx": vers.get("cfgx"), "torch": vers.get("torch"), "torchmetrics": vers.get("torchmetrics"),
        })
        return row

    def _report_scale(self, row: dict[str, Any]) -> None:
        bits = [f"s={row['s']:g}"]
        if row.get("accuracy") is not None:  # eval.classifier.source=none: no classifier columns
            bits += [f"acc {row['accuracy']:.3f}", f"FD(clf) {row['fd_classifier']:.3g}"]
        if row.get("fid") is not None:
            bits.append(f"FID {row['fid']:.2f}")
        if row["postprocess"] != "none":
            bits.insert(1, f"\\[{row['postprocess']}]")  # escaped: rich would read [flow] as markup
        bits.append(f"{row['samples_per_s'] or 0:.1f} samples/s")
        say(self.console, "  ".join(bits))
        if row.get("fid_comparable") is False and not self.fid_warned:
            self.fid_warned = True
            say(self.console, f"[yellow]note: FID from {self.opt.num_samples} samples (< 2048, the feature dimension) "
                              "is biased and not comparable with published numbers; raise eval.num_samples (50k is "
                              "standard)")

    def _who(self) -> str:
        """The dataset, or for an imported model which model on which reference set (titles name what was sampled)."""
        name = getattr(self.model, "name", None) if hasattr(self.model, "row_fields") else None
        if not name:
            return self.data.name
        return f"{name if name.startswith('py:') else Path(name).name} on {self.data.name}"

    def _save_side_by_side(self, p: Prepared, grids: dict[str, dict[str, torch.Tensor]]) -> list[Path]:
        label = p.rule.label
        paths = []
        for v, g in grids.items():
            title = (f"{self._who()}: {label} guidance, same seeds at every scale; rows are classes"
                     + ("" if v == "none" else f"; postprocess={v}"))
            # Plain CFG keeps samples.png; each other rule gets its own file beside it.
            stem = "samples" + ("" if label == "cfg" else f"_{label.replace('@', '_')}")
            paths.append(self.run_dir / (f"{stem}.png" if v == "none" else f"{stem}_{v}.png"))
            save_side_by_side(g, paths[-1], title)
        return paths


def run_sweep(cfg: DictConfig, run_dir: Path, data: DatasetBundle, model: torch.nn.Module, ckpt_step: int,
              device: torch.device, console=None, hub: LoggerHub | None = None) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every scale in ``cfg.guidance.scales`` (every rank calls this); returns this
    sweep's rows on rank 0, [] elsewhere. ``hub`` (started by the caller) gets every row and image."""
    t0 = time.perf_counter()
    sweeper = Sweeper(cfg, run_dir, data, model, ckpt_step, device, console, hub)
    try:
        rows = sweeper.run([float(v) for v in cfg.guidance.scales])
    except BaseException as e:
        if distributed.active() and distributed.is_main() and not getattr(e, "agreed", False):
            distributed.broadcast_object(STOP)  # the other ranks wait for a plan: release them
        raise
    finally:
        release_all(Path(run_dir) / "sweep")
    if rows is None:
        return []
    if console is not None:
        console.print(console_table(rows, title=f"{data.name}: {', '.join(p.rule.label for p in sweeper.rules)} "
                                                f"guidance, {sweeper.sampler.name} {len(sweeper.sampler.timesteps)} "
                                                f"steps, {sweeper.opt.num_samples} samples/scale"))
        best = best_scale_console(rows)  # this sweep's rows: one protocol
        if best is not None:
            console.print(best)
        console.print(f"sweep took {time.perf_counter() - t0:.1f}s; wrote {run_dir}/metrics.csv, metrics.json, "
                      "metrics.md and plots")
    return rows
