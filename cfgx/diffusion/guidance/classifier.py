"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from cfgx import distributed
from cfgx.backbones.noisy_classifier import get_guidance_classifier
from cfgx.diffusion.guidance.base import GuidanceRule, Models, Prepared, RuleEnv, Step, null_labels_like, register


def classifier_grad(classifier: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t), computed with autograd even inside no_grad sampling."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logp = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
        sel = logp.gather(1, y.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(sel, x_in)
    return grad


def cg_eps(model: torch.nn.Module, classifier: torch.nn.Module, sigma_t: torch.Tensor,
           x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_hat = eps(x, null) - s * sigma_t * grad log p_phi(c | x_t) on the unconditional branch.
    With an exact classifier and s = 1 this is the exact conditional eps."""
    eps = model(x, t, null_labels_like(y, model.num_classes)).float()
    if scale == 0:
        return eps
    grad = classifier_grad(classifier, x, t, y)
    sig = sigma_t.view(-1, *([1] * (x.dim() - 1)))
    return eps - scale * sig * grad.float()


@dataclass(frozen=True)
class ClassifierOptions:
    """The noise-conditional classifier's training settings; None = cfgx/backbones/noisy_classifier.py's
    per-data-kind recipe."""

    steps: int | None
    batch_size: int | None
    lr: float | None
    width: int | None
    hidden: int | None


@register
class ClassifierGuidance(GuidanceRule):
    """Guides the unconditional prediction with a classifier trained on noisy inputs (never the
    evaluation classifier). s = 0 is unconditional; each other step adds the classifier's
    forward/backward to the cost."""

    name = "classifier"
    Options = ClassifierOptions
    needs = ("classifier",)
    schedulable = False

    def training_options(self) -> dict[str, Any]:
        """The set options (null ones dropped, so the per-data-kind defaults apply)."""
        return {k: v for k, v in self.raw.items() if v is not None}

    def tag(self) -> str:
        return "classifier"  # the sweep appends the trained classifier's key

    def info(self) -> dict[str, Any]:
        # The classifier's settings are recorded by its key (guidance_classifier), not here.
        return {"guidance_schedule": self.schedule, "guidance_options": json.dumps({})}

    def prepare(self, env: RuleEnv) -> Prepared:
        with distributed.main_first():  # rank 0 trains and caches it in the run dir, the others load it
            clf, info = get_guidance_classifier(env.run_dir, env.data, env.schedule, env.device,
                                                self.training_options(), env.console)
        # Rows from a differently trained guidance classifier are other rows.
        return Prepared(self, f"classifier-{str(info.get('key'))[:6]}",
                        {**self.info(), "guidance_classifier": info.get("key"),
                         "guidance_classifier_val_acc": json.dumps(info.get("val_accuracy"))}, classifier=clf)

    def extra_nfe(self, s: float, steps: int) -> float:
        return steps if s != 0 else 0  # the classifier's forward/backward, one per step

    def eps(self, step: Step, m: Models, state: None):
        return cg_eps(m.model, m.classifier, step.schedule.sigma(step.t), step.x, step.t, step.y, step.s)
