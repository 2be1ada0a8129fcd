"""Guidance rules: one module per rule, each a small class registered by name.

``guidance.method=NAME`` picks ``RULES[NAME]``; its options are the block ``guidance.NAME`` of
``configs/guidance/default.yaml``. The sweep, the toy, config validation and sampling ask the
registry and never name a rule. Adding a rule is one module in this folder decorated with
``@register`` (every module here is imported below), plus one YAML block; a rule in another
package registers through the ``cfgx.guidance`` entry-point group. See README, "Adding a guidance rule".
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

from cfgx.diffusion.guidance.apg import apg_eps
from cfgx.diffusion.guidance.autoguidance import autoguidance_eps
from cfgx.diffusion.guidance.base import (
    RULES,
    SCHEDULES,
    GuidanceRule,
    GuidedEps,
    Models,
    Prepared,
    RuleEnv,
    Step,
    cfg_eps,
    cond_uncond,
    edm_sigma,
    get_rule,
    make_rule,
    null_labels_like,
    register,
    rule_names,
    scheduled_scale,
)
from cfgx.diffusion.guidance.cfgpp import cfgpp_eps, cfgpp_lambda
from cfgx.diffusion.guidance.cfgzero import cfg_zero_star_eps
from cfgx.diffusion.guidance.classifier import cg_eps, classifier_grad
from cfgx.diffusion.guidance.interval import interval_eps
from cfgx.diffusion.guidance.rescale import rescale_eps

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")  # each rule module registers its class
for _ep in entry_points(group="cfgx.guidance"):
    _ep.load()  # rules of installed packages: [project.entry-points."cfgx.guidance"] name = "pkg.module"

__all__ = [
    "RULES", "SCHEDULES", "GuidanceRule", "GuidedEps", "Models", "Prepared", "RuleEnv", "Step", "apg_eps",
    "autoguidance_eps", "cfg_eps", "cfg_zero_star_eps", "cfgpp_eps", "cfgpp_lambda", "cg_eps", "classifier_grad",
    "cond_uncond", "edm_sigma", "get_rule", "interval_eps", "make_rule", "null_labels_like", "register",
    "rescale_eps", "rule_names", "scheduled_scale",
]
