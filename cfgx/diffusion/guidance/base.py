"""What every guidance rule shares: the rule base class, the per-step input, and the sampler-facing driver.

Convention used everywhere in cfgx (scale ``s``):

    eps_hat = eps(x, null) + s * (eps(x, c) - eps(x, null))

s = 0 is unconditional, s = 1 conditional, s > 1 guided. Ho & Salimans (2022) write the same
thing with w = s - 1. Each rule says from its paper what its formula gives at s = 0 and s = 1; the
driver never short-cuts a scale on a rule's behalf.

Denoiser contract: ``model(x, t, y) -> eps`` with ``y`` a LongTensor of labels in [0, num_classes];
index ``model.num_classes`` is the reserved null label. Classifier contract (classifier guidance):
``classifier(x_t, t) -> logits``.

Rules defined on the denoised prediction D = x0_hat (APG, rescale) convert with
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar),   so  d eps = -sqrt(abar / (1 - abar)) d x0,
and return eps_cfg plus the correction in float64: where the correction vanishes (phi = 0, eta = 1,
...) the result is CFG's eps to the last bit or within float32 rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError

SCHEDULES = ("constant", "linear", "cosine")


def scheduled_scale(kind: str, s: float, index: int, num_steps: int) -> float:
    """Guidance weight schedules (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
    Schedulers", TMLR): monotonically *increasing* weights, low at high noise and high near the data.

    With progress u = i / (N - 1) over the N sampling steps (u = 0 at the noisiest step):
    ``linear`` s_i = 2 s u and ``cosine`` s_i = s (1 - cos(pi u)); both have mean exactly s over
    the N steps (the cosine terms cancel in pairs), so a row's s is the schedule's mean and rows
    stay comparable with constant CFG at the same s. ``constant`` is s at every step.
    """
    if kind == "constant" or num_steps <= 1:
        return s
    u = index / (num_steps - 1)
    if kind == "linear":
        return 2.0 * s * u
    if kind == "cosine":
        return s * (1.0 - math.cos(math.pi * u))
    raise CfgxError(f"unknown guidance schedule {kind!r}; valid: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------- maths shared by several rules

def null_labels_like(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.full_like(y, num_classes)


def cond_uncond(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps(x, c), eps(x, null)) in float32 from one batch of 2B (one launch per step on a GPU)."""
    null = null_labels_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    # Under bf16 autocast the network returns bf16; the difference cond - uncond is small and
    # multiplied by s, so combine in float32 or the rounding error grows with the scale.
    cond, uncond = out.float().chunk(2)
    return cond, uncond


def cfg_eps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Classifier-free guided eps (Ho & Salimans 2022) in the cfgx convention.

    s = 0 and s = 1 need one network evaluation; any other scale runs cond and
    null as one batch of 2B so the GPU sees a single launch per step.
    """
    if scale == 0:
        return model(x, t, null_labels_like(y, model.num_classes)).float()
    if scale == 1:
        return model(x, t, y).float()
    cond, uncond = cond_uncond(model, x, t, y)
    return uncond + scale * (cond - uncond)


def edm_sigma(abar: float) -> float:
    """The EDM noise level of a VP step: x_t / sqrt(abar) = x0 + sigma * n, sigma = sqrt((1-abar)/abar)."""
    return math.sqrt((1.0 - abar) / abar) if abar > 0 else math.inf


def bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def x0_of(x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    return (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def eps_plus_x0_delta(eps: torch.Tensor, delta_x0: torch.Tensor, abar: float) -> torch.Tensor:
    """eps of the prediction whose x0 is x0(eps) + delta_x0 (delta in float64, result float32)."""
    return (eps.double() - math.sqrt(abar / (1.0 - abar)) * delta_x0).float()


# ---------------------------------------------------------------- rules

@dataclass(frozen=True)
class Models:
    """The networks a rule may use: the denoiser, and what ``needs`` asks for."""

    model: torch.nn.Module
    classifier: torch.nn.Module | None = None
    guide: torch.nn.Module | None = None


@dataclass(frozen=True)
class Step:
    """One sampling step as a rule sees it: x_t, t, the labels, this step's scale and abar_t."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    s: float
    abar: float
    schedule: NoiseSchedule


@dataclass(frozen=True)
class RuleEnv:
    """What a rule may need to load its extra models before a sweep samples anything."""

    run_dir: Path
    cfg: DictConfig
    data: Any
    schedule: NoiseSchedule
    device: torch.device
    console: Any = None


@dataclass(frozen=True)
class Prepared:
    """A rule ready to sample: its extra models, its row-key tag and the columns naming it."""

    rule: GuidanceRule
    tag: str
    info: dict[str, Any]
    classifier: torch.nn.Module | None = None
    guide: torch.nn.Module | None = None

    def models(self, model: torch.nn.Module) -> Models:
        return Models(model, self.classifier, self.guide)


@dataclass(frozen=True)
class NoOptions:
    """A rule without options."""


class GuidanceRule:
    """One guidance rule: its name, options, requirements and eps computation.

    A subclass sets ``name`` (what ``guidance.method`` says), ``Options`` (a frozen dataclass whose
    fields are the keys of its block ``guidance.<name>`` in ``configs/guidance/default.yaml``; the
    defaults live there, never here), ``needs`` (extra models: "classifier", "guide"), ``samplers``
    (the samplers it is defined for; None = all), ``schedulable`` (whether ``@linear``/``@cosine``
    apply), and implements ``eps``. ``check`` validates the options next to the maths that uses them.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[tuple[str, ...]] = ()
    samplers: ClassVar[tuple[str, ...] | None] = None
    schedulable: ClassVar[bool] = True

    def __init__(self, options: dict[str, Any] | None = None, schedule: str = "constant", check: bool = True) -> None:
        self.raw = dict(options or {})
        self.schedule = schedule
        if schedule not in SCHEDULES:
            raise CfgxError(f"unknown guidance schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if schedule != "constant" and not self.schedulable:
            raise CfgxError(f"guidance.method={self.name} takes no weight schedule (got {schedule}); schedules "
                            f"apply to {', '.join(r for r in rule_names() if get_rule(r).schedulable)}")
        self.opts = self._parse(self.raw)
        if check:  # check=False: a caller that hands the rule its models itself (the toy) skips load options
            self.check()

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> Any:
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise CfgxError(f"guidance.{cls.name} has no option {unknown[0]!r}; valid: {', '.join(fields) or 'none'}")
        missing = [f for f in fields if f not in raw]
        if missing:
            raise CfgxError(f"guidance.{cls.name}.{missing[0]} is not set; set it, e.g. in the {cls.name} block of "
                            "configs/guidance/default.yaml")
        return cls.Options(**raw)

    # ---- what a sweep asks of a rule
    @property
    def label(self) -> str:
        """Human name: 'cfg', 'cfg@linear', 'apg', ..."""
        return self.name if self.schedule == "constant" else f"{self.name}@{self.schedule}"

    def tag(self) -> str:
        """File-name part of the row key: plain 'cfg' stays 'cfg' (old rows keep their keys)."""
        if self.name == "cfg" and self.schedule == "constant":
            return "cfg"
        blob = json.dumps({"s": self.schedule, "o": self.raw}, sort_keys=True, default=str)
        sched = "" if self.schedule == "constant" else f"_{self.schedule}"
        return f"{self.name}{sched}-{hashlib.sha256(blob.encode()).hexdigest()[:6]}"

    def check(self) -> None:
        """Raise CfgxError on a bad option value (one line naming the fix)."""

    def check_scales(self, scales: list[float]) -> None:
        """Raise CfgxError on a scale the rule is not defined for."""

    def check_sampler(self, sampler: str) -> None:
        if self.samplers is not None and sampler not in self.samplers:
            raise CfgxError(f"guidance.method={self.name} is defined for {'/'.join(self.samplers)} only, not "
                            f"sampler={sampler}; use sampler={self.samplers[0]}")

    def check_models(self, models: Models) -> None:
        for need in self.needs:
            if getattr(models, need) is None:
                raise CfgxError(f"guidance.method={self.name} needs a {need} model")

    def info(self) -> dict[str, Any]:
        """Columns naming the rule's settings in every row it produces."""
        return {"guidance_schedule": self.schedule, "guidance_options": json.dumps(self.raw, sort_keys=True)}

    def prepare(self, env: RuleEnv) -> Prepared:
        """Load what ``needs`` names (a sweep calls this once per rule, before sampling anything)."""
        return Prepared(self, self.tag(), self.info())

    def row_fields(self, s: float) -> dict[str, Any]:
        """Columns this rule adds to a row at scale s."""
        return {}

    def extra_nfe(self, s: float, steps: int) -> float:
        """Network evaluations per sample that the counted denoiser calls do not see."""
        return 0

    def new_state(self) -> Any:
        """Per-batch state carried across the steps of one trajectory (APG's momentum)."""
        return None

    def eps(self, step: Step, m: Models, state: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class GuidedEps:
    """eps_fn(x_t, t) for one batch under ``rule``: the samplers' view of every rule.

    Holds what a rule needs per step (abar_t, the step's index for schedules, the rule's state),
    so one instance serves exactly one batch of samples.
    """

    def __init__(self, rule: GuidanceRule, models: Models, y: torch.Tensor, scale: float, sampler) -> None:
        rule.check_sampler(sampler.name)
        rule.check_models(models)
        self.rule, self.models, self.y, self.scale = rule, models, y, float(scale)
        self.schedule = sampler.schedule
        self.index = {int(t): i for i, t in enumerate(sampler.timesteps)}
        self.num_steps = len(sampler.timesteps)
        self.state = rule.new_state()

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        ti = int(t.reshape(-1)[0])
        s = scheduled_scale(self.rule.schedule, self.scale, self.index.get(ti, 0), self.num_steps)
        step = Step(x, t, self.y, s, float(self.schedule.alpha_bars[ti]), self.schedule)
        return self.rule.eps(step, self.models, self.state)


# ---------------------------------------------------------------- the registry

RULES: dict[str, type[GuidanceRule]] = {}


def register(cls: type[GuidanceRule]) -> type[GuidanceRule]:
    """Class decorator: make ``cls`` selectable as ``guidance.method=<cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    RULES[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    return sorted(RULES)


def get_rule(name: str) -> type[GuidanceRule]:
    if name not in RULES:
        raise CfgxError(f"unknown guidance.method {name!r}; valid: {', '.join(rule_names())} "
                        "(a list compares several: guidance.method=[cfg,interval,apg])")
    return RULES[name]


def make_rule(name: str, schedule: str = "constant", **options: Any) -> GuidanceRule:
    """A rule from Python: ``make_rule("rescale", phi=0.7, space="x0")``."""
    return get_rule(name)(options, schedule)


def finite(rule: str, key: str, v: Any) -> float:
    """``v`` as a float, or CfgxError naming guidance.<rule>.<key>."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise CfgxError(f"guidance.{rule}.{key}={v!r} is not a finite number")
    return float(v)
