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
from cfgx.config import default_rule
from cfgx.console import say
from cfgx.cpu import torch_threads
from cfgx.data.gmm import GaussianMixture, gmm1d, gmm2d
from cfgx.diffusion.guidance import RULES, GuidanceRule, GuidedEps, Models
from cfgx.diffusion.samplers import Sampler, build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.metrics.classifier import boundary_stats
from cfgx.store.atomic import atomic_write_json
from cfgx.toy.plots import plot_1d, plot_2d, plot_lab_margins

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


def _eps_fn(method: str, den: ExactDenoiser, clf: torch.nn.Module | None, sampler: Sampler,
            y: torch.Tensor, s: float):
    # The toy tables say "cg"; the sampling code calls the same thing guidance.method=classifier.
    return GuidedEps(default_rule("classifier" if method == "cg" else "cfg"), Models(den, clf), y, s, sampler)


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
            fn = _eps_fn(method, den, classifiers[clf_name], sampler, y, s)
            tr = _run_paths(fn, sampler, n_paths, 1, seed)
            trajs[(method, clf_name, s)] = tr
            rows.append({"mu": float(mu), "method": method, "classifier": clf_name, "s": s,
                         **{k: round(v, 5) for k, v in _stats_1d(tr[-1], y, mixture, float(mu)).items()}})
        name = f"trajectories_1d_mu{mu:g}.png"
        plot_1d(out_dir / name, float(mu), STD_1D, times, trajs, y, scales, min(n_plot, n_paths))
        files.append(name)
        say(console, f"gmm1d μ={mu:g}: wrote {name}")
    return {"rows": rows, "classifier_accuracy": clf_acc, "files": files,
            "delta": f"{DELTA_REL_1D:g}*mu (|x| below it counts as near the boundary x=0)",
            "std": STD_1D, "mus": [float(m) for m in mus]}


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
            fn = _eps_fn(method, den, clf, sampler, y, float(s))
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
    plot_2d(out_dir / "samples_2d.png", mixture, finals, y, scales)
    lab = _lab_rows(mixture, den, schedule, sampler, y, scales, n_paths, seed)
    rows += lab
    plot_lab_margins(out_dir / "margins_2d.png", rows, scales)
    say(console, "gmm2d: wrote samples_2d.png and margins_2d.png")
    return {"rows": rows, "classifier_accuracy": acc, "files": ["samples_2d.png", "margins_2d.png"],
            "delta": f"clean-posterior logit margin < {DELTA_MARGIN_2D:g} counts as near the boundary"}


# The lab panels in the order the figure shows them; rules registered later join at the end.
LAB = ("cfg@linear", "cfg@cosine", "interval", "rescale", "apg", "cfgzero", "autoguidance", "cfgpp")


def _lab_rules(sampler: Sampler) -> list[GuidanceRule]:
    """Every guidance rule but those the CFG/CG panels show, with configs/guidance/default.yaml's options.

    The toy hands autoguidance its guide model itself, so options that say where to load a model
    from are not checked (``check=False``).
    """
    extra = [n for n, cls in sorted(RULES.items()) if n not in LAB and n != "cfg" and "classifier" not in cls.needs]
    rules = [default_rule(entry, check=False) for entry in (*LAB, *extra)]
    return [r for r in rules if r.samplers is None or sampler.name in r.samplers]


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
    for rule in _lab_rules(sampler):
        for s in scales:
            try:
                rule.check_scales([float(s)])
            except CfgxError:
                continue  # outside the rule's range (CFG++: lambda > 1)
            fn = GuidedEps(rule, Models(den, guide=bad), y, float(s), sampler)
            x = _run_paths(fn, sampler, n_paths, 2, seed)[-1]
            logp = mixture.class_log_posterior(x, 1.0)
            b = boundary_stats(logp, DELTA_MARGIN_2D)
            rows.append({"method": rule.label, "classifier": "exact", "s": float(s), "margin": round(b["margin"], 5),
                         "accuracy": round(float((logp.argmax(1) == y).double().mean()), 5),
                         "near_boundary_frac": round(b["near_boundary"], 5), "confidence": round(b["confidence"], 5),
                         "mean_radius": round(float(x.norm(dim=1).mean()), 5)})
    return rows


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
