"""``cfgx toy``: guidance on exact-score Gaussian mixtures, seen from the classifier's side.

Reproduces the toy analysis of Zhao & Schwing 2025, "Studying Classifier(-Free)
Guidance From a Classifier-Centric Perspective" (arXiv 2503.10638): classifier
guidance (CG) and classifier-free guidance (CFG) push denoising trajectories away
from the classifier's decision boundary; the push is stronger when the classes
overlap, and under CG the trajectories depend on *which* classifier guides
(exact posterior vs. learned linear vs. learned MLP).

- ``gmm1d``: two classes N(-mu, 0.05^2) / N(+mu, 0.05^2) for mu in {1.0, 0.5, 0.1}.
  One figure per mu with x_t against t for the true conditional model and for CG
  (exact / linear / MLP classifier) and CFG (exact scores) at every scale; every
  panel starts from the same initial noise, so paths can be compared one to one.
- ``gmm2d``: a ring mixture whose decision boundaries cross the plane; final
  samples per scale over the exact clean posterior's decision boundaries, CFG
  (exact scores) and CG with a learned MLP classifier.

Everything runs on exact closed-form scores (``ExactDenoiser``), so differences
between panels are guidance alone, not learning error of a denoiser.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cfgx.backbones.exact import ExactClassifier, ExactDenoiser
from cfgx.backbones.noisy_classifier import noisy_accuracy
from cfgx.backbones.toy_classifiers import (
    LinearNoisyClassifier,
    MLPNoisyClassifier,
    train_noisy_classifier,
)
from cfgx.console import say
from cfgx.cpu import torch_threads
from cfgx.data.gmm import GaussianMixture, gmm1d, gmm2d
from cfgx.diffusion.guidance import GuidanceSpec
from cfgx.diffusion.samplers import Sampler, build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.metrics.classifier import boundary_stats
from cfgx.sample import make_eps_fn
from cfgx.store.rundir import atomic_savefig, atomic_write_json

DATASETS = ("gmm1d", "gmm2d")
MUS_1D = (1.0, 0.5, 0.1)
STD_1D = 0.05
# Near-boundary threshold in 1D as a fraction of mu: an absolute delta would call every sample of
# the mu = 0.1 case "near" and none of the mu = 1.0 case, hiding the comparison across mu.
DELTA_REL_1D = 0.5
# Logit-margin threshold in 2D, the same default as the sweep's boundary statistics.
DELTA_MARGIN_2D = 1.0
# Autoguidance on the toy: the guide is the exact model of the mixture with components this much broader.
TOY_GUIDE_STD = 1.5
CLASS_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def _run_paths(eps_fn, sampler: Sampler, n: int, dim: int, seed: int) -> torch.Tensor:
    """Trajectories [steps + 1, n, dim]; a fresh generator per call gives every panel the same noise."""
    traj: list[torch.Tensor] = []
    sampler.sample(eps_fn, (n, dim), torch.Generator().manual_seed(seed), "cpu", trajectory=traj)
    return torch.stack(traj)


def _path_times(sampler: Sampler) -> list[float]:
    # x before step i sits at noise level seq[i]; in the 1-indexed DDPM convention (x_0 clean) that
    # is t = seq[i] + 1, and the sampler's final output is x_0 at t = 0.
    return [t + 1.0 for t in sampler.timesteps] + [0.0]


def _seeded(seed: int, cls, *args, **kwargs) -> torch.nn.Module:
    """Build ``cls`` with a seeded initialisation, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kwargs)


def _train_toy_classifiers(mixture: GaussianMixture, schedule: NoiseSchedule, steps: int,
                           seed: int) -> dict[str, torch.nn.Module]:
    """Exact, linear and MLP noisy classifiers; the learned ones get their own seeded streams."""
    lin = train_noisy_classifier(_seeded(seed, LinearNoisyClassifier, mixture.dim, mixture.num_classes,
                                         schedule.num_steps),
                                 mixture, schedule, steps=steps,
                                 generator=torch.Generator().manual_seed(seed + 11))
    mlp = train_noisy_classifier(_seeded(seed + 1, MLPNoisyClassifier, mixture.dim, mixture.num_classes,
                                         num_steps=schedule.num_steps),
                                 mixture, schedule, steps=steps,
                                 generator=torch.Generator().manual_seed(seed + 12))
    for m in (lin, mlp):
        m.requires_grad_(False)  # guidance differentiates w.r.t. x_t only
    return {"exact": ExactClassifier(mixture, schedule), "linear": lin, "mlp": mlp}


def _classifier_accuracy(classifiers: dict[str, torch.nn.Module], mixture: GaussianMixture,
                         schedule: NoiseSchedule, seed: int, n: int = 4000) -> dict[str, dict[str, float]]:
    """Held-out accuracy of each classifier on fresh mixture samples, noised to a few t (same noise for all)."""
    x0, y = mixture.sample(n, torch.Generator().manual_seed(seed + 99))
    return {name: noisy_accuracy(clf, x0, y, schedule, "cpu", seed) for name, clf in classifiers.items()}


def _stats_1d(x: torch.Tensor, y: torch.Tensor, mixture: GaussianMixture, mu: float) -> dict[str, float]:
    """Boundary statistics of final 1D samples; the boundary of the symmetric mixture is x = 0."""
    x = x.reshape(-1).double()
    # Signed so that positive = on the requested class's side, the side guidance should push toward.
    d = x * (2.0 * y.double() - 1.0)
    logp = mixture.class_log_posterior(x[:, None], 1.0)
    b = boundary_stats(logp)
    return {
        "mean_signed_distance": float(d.mean()),
        "rel_signed_distance": float(d.mean() / mu),
        "median_signed_distance": float(d.median()),
        "near_boundary_frac": float((x.abs() < DELTA_REL_1D * mu).double().mean()),
        "accuracy": float((d > 0).double().mean()),
        "mean_abs_error_to_class_mean": float((d - mu).abs().mean()),
        "posterior_margin": b["margin"],
    }


def _panel_specs(scales: Sequence[float]) -> list[tuple[str, str, float]]:
    specs = [("true_conditional", "exact", 1.0)]
    for s in scales:
        specs.append(("cfg", "exact", float(s)))
        for clf in ("exact", "linear", "mlp"):
            specs.append(("cg", clf, float(s)))
    return specs


def _eps_fn(method: str, den: ExactDenoiser, clf: torch.nn.Module | None, schedule: NoiseSchedule,
            y: torch.Tensor, s: float):
    # The toy tables say "cg"; the sampling code calls the same thing guidance.method=classifier.
    return make_eps_fn(den, y, s, "classifier" if method == "cg" else "cfg", clf, schedule)


def _plot_1d(path: Path, mu: float, times: list[float], trajs: dict[tuple[str, str, float], torch.Tensor],
             y: torch.Tensor, scales: Sequence[float], n_plot: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("cfg", "exact", "CFG (exact scores)"), ("cg", "exact", "CG, exact classifier"),
            ("cg", "linear", "CG, linear classifier"), ("cg", "mlp", "CG, MLP classifier")]
    ncol = len(scales) + 1
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.7 * ncol, 2.3 * len(rows)), sharex=True,
                             sharey=True, squeeze=False)
    ref = trajs[("true_conditional", "exact", 1.0)][:, :n_plot, 0]
    lim = float(max(v[:, :n_plot].abs().max() for v in trajs.values())) * 1.05
    colors = [CLASS_COLORS[int(c)] for c in y[:n_plot]]

    def draw(ax, tr: torch.Tensor, title: str, with_ref: bool) -> None:
        ax.axhline(0.0, color="k", lw=1.2, zorder=1)  # decision boundary of the symmetric mixture
        for m in (-mu, mu):
            ax.axhline(m, color="0.6", lw=0.7, ls=":", zorder=1)
        for i in range(tr.shape[1]):
            if with_ref:
                ax.plot(times, ref[:, i], color="0.55", lw=0.7, ls="--", zorder=2)
            ax.plot(times, tr[:, i], color=colors[i], lw=1.1, zorder=3)
        ax.set_title(title, fontsize=8)
        ax.set_yscale("symlog", linthresh=mu)
        ax.set_ylim(-lim, lim)
        ax.set_xlim(times[0], times[-1])  # t decreases left to right: denoising reads forwards

    draw(axes[0][0], ref, "true conditional (exact, s=1)", with_ref=False)
    for r, (method, clf, label) in enumerate(rows):
        if r > 0:
            axes[r][0].axis("off")
        for c, s in enumerate(scales, start=1):
            tr = trajs[(method, clf, float(s))][:, :n_plot, 0]
            draw(axes[r][c], tr, f"{label}, s={s:g}", with_ref=True)
    # The unused cells of the reference column hold the legend, so no guided panel is covered.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=CLASS_COLORS[0], label="class 0 (−μ) requested"),
               Line2D([], [], color=CLASS_COLORS[1], label="class 1 (+μ) requested"),
               Line2D([], [], color="0.55", ls="--", label="true conditional, same noise"),
               Line2D([], [], color="k", label="decision boundary x = 0"),
               Line2D([], [], color="0.6", ls=":", label="class means ±μ")]
    axes[1][0].legend(handles=handles, loc="center", fontsize=8, frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("t (T → 0, denoising left → right)", fontsize=8)
    for r in range(len(rows)):
        axes[r][1].set_ylabel("x_t (symlog; linear in ±μ)", fontsize=8)
    axes[0][0].set_ylabel("x_t (symlog; linear in ±μ)", fontsize=8)
    fig.suptitle(f"gmm1d μ={mu:g}, σ={STD_1D:g} (Zhao & Schwing 2025): every panel starts from the same "
                 "initial noise; guided paths bend away from the boundary", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def _run_1d(out_dir: Path, scales: list[float], sampler: Sampler, schedule: NoiseSchedule, n_paths: int,
            seed: int, classifier_steps: int, n_plot: int, mus: Sequence[float], console) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    clf_acc: dict[str, Any] = {}
    files = []
    y = torch.arange(n_paths) % 2
    times = _path_times(sampler)
    for mu in mus:
        mixture = gmm1d(mu=float(mu), std=STD_1D)
        den = ExactDenoiser(mixture, schedule)
        classifiers = _train_toy_classifiers(mixture, schedule, classifier_steps, seed)
        clf_acc[f"{mu:g}"] = _classifier_accuracy(classifiers, mixture, schedule, seed)
        trajs = {}
        for method, clf_name, s in _panel_specs(scales):
            fn = _eps_fn(method, den, classifiers[clf_name], schedule, y, s)
            tr = _run_paths(fn, sampler, n_paths, 1, seed)
            trajs[(method, clf_name, s)] = tr
            rows.append({"mu": float(mu), "method": method, "classifier": clf_name, "s": s,
                         **{k: round(v, 5) for k, v in _stats_1d(tr[-1], y, mixture, float(mu)).items()}})
        name = f"trajectories_1d_mu{mu:g}.png"
        _plot_1d(out_dir / name, float(mu), times, trajs, y, scales, min(n_plot, n_paths))
        files.append(name)
        say(console, f"gmm1d μ={mu:g}: wrote {name}")
    return {"rows": rows, "classifier_accuracy": clf_acc, "files": files,
            "delta": f"{DELTA_REL_1D:g}*mu (|x| below it counts as near the boundary x=0)",
            "std": STD_1D, "mus": [float(m) for m in mus]}


def _plot_2d(path: Path, mixture: GaussianMixture, finals: dict[tuple[str, float], torch.Tensor],
             y: torch.Tensor, scales: Sequence[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = torch.cat(list(finals.values()))
    lim = max(1.8, float(pts.abs().quantile(0.995)) * 1.1)
    g = torch.linspace(-lim, lim, 241, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    logp = mixture.class_log_posterior(torch.stack([gx.flatten(), gy.flatten()], 1), 1.0)
    logp = logp.reshape(*gx.shape, -1)
    region = logp.argmax(-1).numpy()
    # For each class, log p(c|x) - max over the others is 0 exactly on its boundary: one contour per
    # class traces every boundary, including ones an argmax-level contour would draw twice or miss.
    edges = []
    for c in range(mixture.num_classes):
        others = torch.cat([logp[..., :c], logp[..., c + 1:]], -1).max(-1).values
        edges.append((logp[..., c] - others).numpy())
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(list(CLASS_COLORS[:mixture.num_classes]))
    rows = [("cfg", "CFG (exact scores)"), ("cg", "CG, MLP classifier")]
    ncol = len(scales)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.0 * ncol, 3.1 * len(rows)), squeeze=False)
    colors = [CLASS_COLORS[int(c)] for c in y]
    for r, (method, label) in enumerate(rows):
        for c, s in enumerate(scales):
            ax = axes[r][c]
            levels = [-0.5 + k for k in range(mixture.num_classes + 1)]
            ax.contourf(gx.numpy(), gy.numpy(), region, levels=levels, cmap=cmap, alpha=0.12)
            for e in edges:
                ax.contour(gx.numpy(), gy.numpy(), e, levels=[0.0], colors="k", linewidths=0.9)
            x = finals[(method, float(s))]
            ax.scatter(x[:, 0], x[:, 1], s=4, c=colors, alpha=0.7, linewidths=0)
            ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker="x", c="k", s=18)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_title(f"{label}, s={s:g}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle("gmm2d: final samples (colour = requested class) over the exact clean posterior's "
                 "decision boundaries (black); x = component means", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def _run_2d(out_dir: Path, scales: list[float], sampler: Sampler, schedule: NoiseSchedule, n_paths: int,
            seed: int, classifier_steps: int, console) -> dict[str, Any]:
    mixture = gmm2d()
    den = ExactDenoiser(mixture, schedule)
    mlp = train_noisy_classifier(_seeded(seed + 1, MLPNoisyClassifier, 2, mixture.num_classes,
                                         num_steps=schedule.num_steps),
                                 mixture, schedule, steps=classifier_steps,
                                 generator=torch.Generator().manual_seed(seed + 12)).requires_grad_(False)
    acc = _classifier_accuracy({"exact": ExactClassifier(mixture, schedule), "mlp": mlp}, mixture, schedule,
                               seed)
    y = torch.arange(n_paths) % mixture.num_classes
    finals: dict[tuple[str, float], torch.Tensor] = {}
    rows = []
    for s in scales:
        for method, clf in (("cfg", None), ("cg", mlp)):
            fn = _eps_fn(method, den, clf, schedule, y, float(s))
            x = _run_paths(fn, sampler, n_paths, 2, seed)[-1]
            finals[(method, float(s))] = x
            logp = mixture.class_log_posterior(x, 1.0)
            b = boundary_stats(logp, DELTA_MARGIN_2D)
            rows.append({"method": method, "classifier": "exact" if method == "cfg" else "mlp", "s": float(s),
                         "margin": round(b["margin"], 5),
                         "accuracy": round(float((logp.argmax(1) == y).double().mean()), 5),
                         "near_boundary_frac": round(b["near_boundary"], 5),
                         "confidence": round(b["confidence"], 5),
                         "mean_radius": round(float(x.norm(dim=1).mean()), 5)})
    _plot_2d(out_dir / "samples_2d.png", mixture, finals, y, scales)
    lab = _lab_rows(mixture, den, schedule, sampler, y, scales, n_paths, seed)
    rows += lab
    _plot_lab_margins(out_dir / "margins_2d.png", rows, scales)
    say(console, "gmm2d: wrote samples_2d.png and margins_2d.png")
    return {"rows": rows, "classifier_accuracy": acc, "files": ["samples_2d.png", "margins_2d.png"],
            "delta": f"clean-posterior logit margin < {DELTA_MARGIN_2D:g} counts as near the boundary"}


def _lab_specs(sampler: Sampler) -> list[GuidanceSpec]:
    """Every guidance-lab rule with the defaults of configs/guidance/default.yaml."""
    from omegaconf import OmegaConf

    from cfgx.config import config_dir

    d = OmegaConf.to_container(OmegaConf.load(config_dir() / "guidance" / "default.yaml"), resolve=True)
    specs = [GuidanceSpec("cfg", "linear"), GuidanceSpec("cfg", "cosine"),
             GuidanceSpec("interval", options=d["interval"]), GuidanceSpec("rescale", options=d["rescale"]),
             GuidanceSpec("apg", options=d["apg"]), GuidanceSpec("cfgzero"),
             GuidanceSpec("autoguidance", options={"guide": f"exact, component std x {TOY_GUIDE_STD}"})]
    if sampler.name == "ddim":
        specs.append(GuidanceSpec("cfgpp", options=d["cfgpp"]))
    return specs


def _lab_rows(mixture: GaussianMixture, den: ExactDenoiser, schedule: NoiseSchedule, sampler: Sampler,
              y: torch.Tensor, scales: Sequence[float], n_paths: int, seed: int) -> list[dict[str, Any]]:
    """Mean clean-posterior boundary margin per (rule, s), on the same initial noise as the CFG panels.

    Autoguidance's "bad version" is the exact model of the same mixture with broader components
    (a blurrier density, as an under-trained network would learn), so the rule is not a no-op.
    """
    bad = ExactDenoiser(GaussianMixture(means=mixture.means, stds=mixture.stds * TOY_GUIDE_STD,
                                        weights=mixture.weights, component_class=mixture.component_class,
                                        num_classes=mixture.num_classes), schedule)
    rows = []
    for spec in _lab_specs(sampler):
        for s in scales:
            if spec.method == "cfgpp" and s > float(spec.options["s_at_lambda1"]):
                continue  # lambda > 1 is outside CFG++'s range
            fn = make_eps_fn(den, y, float(s), spec, None, schedule, sampler.timesteps, bad)
            x = _run_paths(fn, sampler, n_paths, 2, seed)[-1]
            logp = mixture.class_log_posterior(x, 1.0)
            b = boundary_stats(logp, DELTA_MARGIN_2D)
            rows.append({"method": spec.label, "classifier": "exact", "s": float(s), "margin": round(b["margin"], 5),
                         "accuracy": round(float((logp.argmax(1) == y).double().mean()), 5),
                         "near_boundary_frac": round(b["near_boundary"], 5), "confidence": round(b["confidence"], 5),
                         "mean_radius": round(float(x.norm(dim=1).mean()), 5)})
    return rows


def _plot_lab_margins(path: Path, rows: list[dict[str, Any]], scales: Sequence[float]) -> None:
    """One panel per rule: its mean boundary margin vs s, with exact CFG dashed for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "cfg"))
    ncol = min(5, len(methods))
    nrow = math.ceil(len(methods) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.9 * ncol, 2.6 * nrow), squeeze=False, sharey=True)
    ref = sorted((r["s"], r["margin"]) for r in rows if r["method"] == "cfg")
    for ax, m in zip(axes.flat, methods):
        pts = sorted((r["s"], r["margin"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in ref], [p[1] for p in ref], "--", color="0.55", lw=1, label="CFG")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, color="tab:blue", label=m)
        ax.set_title("CG (MLP classifier)" if m == "cg" else m, fontsize=9)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("mean boundary margin", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("gmm2d, exact scores: mean clean-posterior logit margin (top-1 minus top-2) of the final "
                 "samples per guidance rule and s; dashed: CFG", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def run_toy(dataset: str, out_dir: Path, scales: list[float] = [1, 2, 4, 8], sampler: str = "ddim",  # noqa: B006
            steps: int = 100, n_paths: int = 512, seed: int = 0, console=None, *,
            classifier_steps: int = 400, n_plot: int = 8,
            mus: Sequence[float] = MUS_1D) -> dict[str, Any]:
    """Run the toy guidance analysis of Zhao & Schwing 2025 (arXiv 2503.10638) into ``out_dir``.

    ``dataset`` is "gmm1d" or "gmm2d". ``n_paths`` is the number of trajectories per
    (mu, method, scale) in 1D and of samples per panel in 2D; the first ``n_plot``
    1D paths are drawn. Labels alternate over classes and every panel reuses the
    same noise (seed), so differences between panels are guidance alone. The
    learned noisy classifiers train for ``classifier_steps`` steps on fresh mixture
    samples. Writes the figures and ``toy_summary.json``; returns the summary.
    """
    if dataset not in DATASETS:
        raise CfgxError(f"cfgx toy has no dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    scales = [float(s) for s in scales]
    if not scales or any(not math.isfinite(s) for s in scales):
        raise CfgxError(f"toy scales must be a non-empty list of finite numbers, got {scales}; "
                        "pass e.g. scales=[1,2,4,8]")
    if n_paths < 2 or steps < 1:
        raise CfgxError(f"toy needs n_paths >= 2 and steps >= 1 (got n_paths={n_paths}, steps={steps}); "
                        "raise them")
    out_dir = Path(out_dir)
    schedule = NoiseSchedule("linear", 1000)
    try:
        # Toy data is unbounded: no x0 clipping, or guided samples would be clamped at +-1.
        smp = build_sampler(sampler, schedule, steps, eta=0.0, clip_x0=None)
    except ValueError as e:
        raise CfgxError(f"{e}; fix the toy sampler/steps options") from None
    t0 = time.perf_counter()
    with torch_threads(1):
        if dataset == "gmm1d":
            body = _run_1d(out_dir, scales, smp, schedule, n_paths, seed, classifier_steps, n_plot, mus,
                           console)
        else:
            body = _run_2d(out_dir, scales, smp, schedule, n_paths, seed, classifier_steps, console)
    summary = {"dataset": dataset, "paper": "Zhao & Schwing 2025, arXiv 2503.10638",
               "scale_convention": "eps = eps(x,null) + s*(eps(x,c) - eps(x,null)); s=1 conditional",
               "sampler": smp.name, "steps": len(smp.timesteps), "n_paths": n_paths, "seed": seed,
               "scales": scales, "classifier_steps": classifier_steps, **body,
               "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out_dir / "toy_summary.json", summary)
    return summary
