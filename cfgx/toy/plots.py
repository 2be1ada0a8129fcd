"""Figures of the toy analysis: 1-D trajectories, 2-D samples, the lab's boundary margins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cfgx.data.gmm import GaussianMixture
from cfgx.report.plotting import pyplot
from cfgx.store.atomic import atomic_savefig

CLASS_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def plot_1d(path: Path, mu: float, std: float, times: list[float], trajs: dict[tuple[str, str, float], torch.Tensor],
             y: torch.Tensor, scales: Sequence[float], n_plot: int) -> None:
    plt = pyplot()

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
    fig.suptitle(f"gmm1d μ={mu:g}, σ={std:g} (Zhao & Schwing 2025): every panel starts from the same "
                 "initial noise; guided paths bend away from the boundary", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def plot_2d(path: Path, mixture: GaussianMixture, finals: dict[tuple[str, float], torch.Tensor],
             y: torch.Tensor, scales: Sequence[float]) -> None:
    plt = pyplot()

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
    from matplotlib.colors import ListedColormap  # matplotlib loads when a figure is drawn (see pyplot)

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


def plot_lab_margins(path: Path, rows: list[dict[str, Any]], scales: Sequence[float]) -> None:
    """One panel per rule: its mean boundary margin vs s, with exact CFG dashed for reference."""
    plt = pyplot()

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
