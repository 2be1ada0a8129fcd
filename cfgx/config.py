"""Composing, normalising and validating configs.

The configs themselves live in ``configs/`` (Hydra groups). This module is the
single place that knows how CLI words map onto them and which values are legal,
so a typo or an out-of-range value fails before any work starts, as one line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cfgx import schema
from cfgx.errors import CfgxError
from cfgx.loggers import check_loggers
from cfgx.protocol import apply_eval_preset
from cfgx.sweep.search import auto_overrides, auto_settings

GROUPS = ("dataset", "backbone", "cond_drop", "guidance", "sampler", "train", "eval", "postprocess",
          "experiment", "logger")
# Parts of a run's config that define the trained model; a sweep may not change them.
TRAINING_KEYS = ("dataset", "backbone", "cond_drop", "diffusion", "train", "seed")
# Parts a sweep may set on top of a run's saved config (how it is evaluated, not what was trained).
EVAL_KEYS = ("eval", "guidance", "sampler", "device", "paths", "postprocess", "dist", "launcher", "logger")
# Parts that belong to one command, never inherited from the run's saved config: 'cfgx sweep' logs where its
# own command line says (logger=...), whatever the training command logged to.
COMMAND_KEYS = ("logger",)
# How a run executes, not what it learns: toggling these resumes the same run (snapshots are
# copies of the EMA weights and change nothing either).
EXECUTION_KEYS = ("compile", "channels_last", "snapshot_every")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)"


def config_dir() -> Path:
    """configs/ at the repo root (checkout, editable install) or cfgx/configs in a wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if (cand / "config.yaml").is_file():
            return cand
    raise CfgxError(f"cfgx's configs/ folder is missing (looked beside {here}); reinstall cfgx")


def group_options(group: str) -> list[str]:
    d = config_dir() / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _split_values(value: str) -> list[str]:
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    return [p.strip() for p in v.split(",") if p.strip() != ""]


def parse_scales(value: str) -> list[float]:
    """'0,1,3,7' or '[0,1,3,7]' -> [0.0, 1.0, 3.0, 7.0]; rejects non-numeric and non-finite."""
    parts = _split_values(value)
    if not parts:
        raise CfgxError("guidance scales are empty; give numbers, e.g. guidance=0,1,3,7")
    out = []
    for p in parts:
        try:
            s = float(p)
        except ValueError:
            raise CfgxError(f"guidance scale {p!r} is not a number; give numbers, e.g. "
                            "guidance=0,1,3,7") from None
        if not math.isfinite(s):
            raise CfgxError(f"guidance scale {p!r} is not finite; give finite numbers, e.g. "
                            "guidance=0,1,3,7") from None
        out.append(s)
    return out


def _is_number_list(value: str) -> bool:
    parts = _split_values(value)
    return bool(parts) and all(re.fullmatch(_NUMBER, p, flags=re.I) for p in parts)


def normalize_overrides(args: list[str], multirun: bool = False) -> list[str]:
    """Map cfgx's shorthand onto Hydra overrides.

    - ``guidance=0,1,3,7`` (numbers) -> ``guidance.scales=[0,1,3,7]``: a list of
      scales, never a Hydra multirun. ``guidance=<name>`` still picks a preset.
    - ``cond_drop=0.1`` -> ``cond_drop.p=0.1`` (and ``-m cond_drop=0,0.1,0.2``
      stays a multirun sweep over ``cond_drop.p``).
    - ``logger=tensorboard,mlflow`` -> ``logger=[tensorboard,mlflow]``: several loggers at once (Hydra
      merges each option's block into ``logger``), never a multirun.
    """
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            out.append(a)
            continue
        if key == "guidance" and value.split(":")[0] == "auto":  # guidance=auto[:LO:HI]: search the best s
            out += auto_overrides(value)
        elif key == "guidance" and (_is_number_list(value) or "," in value or value.startswith("[")):
            scales = parse_scales(value)
            out.append("guidance.scales=[" + ",".join(repr(s) for s in scales) + "]")
        elif key == "logger" and "," in value:
            out.append("logger=[" + ",".join(_split_values(value)) + "]")
        elif key == "cond_drop" and _is_number_list(value):
            out.append(f"cond_drop.p={value}")
        elif key in ("guidance.scales",):
            out.append("guidance.scales=[" + ",".join(repr(s) for s in parse_scales(value)) + "]")
        else:
            out.append(a)
    return out


def check_group_choices(overrides: list[str]) -> None:
    """Unknown group options fail as one line listing the valid ones."""
    for a in overrides:
        key, eq, value = a.partition("=")
        key = key.lstrip("+~")
        if not eq or key not in GROUPS:
            continue
        valid = group_options(key)
        for v in _split_values(value) if "," in value or value.startswith("[") else [value]:
            if v not in valid:
                raise CfgxError(f"unknown {key} {v!r}; valid: {', '.join(valid)} "
                                f"(add configs/{key}/{v}.yaml for a new one)")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose configs/config.yaml with Hydra overrides, as the CLI would (no multirun)."""
    # why: hydra costs ~150 ms to import and 'cfgx --help' loads this module
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = normalize_overrides(list(overrides or []))
    check_group_choices(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides)
        except Exception as e:  # Hydra's own override/struct errors, flattened to one line
            raise CfgxError(one_line_hydra_error(e)) from None
    apply_eval_preset(cfg, overrides, config_dir())  # eval=fid50k's numbers beat the dataset's eval block
    return cfg


def one_line_hydra_error(e: Exception) -> str:
    msg = " ".join(str(e).split())
    if not msg and e.__cause__ is not None:
        msg = " ".join(str(e.__cause__).split())
    m = re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        return (f"unknown config key {m.group(1)!r} ({msg.split('.')[0]}); check the spelling "
                "with 'cfgx train --cfg job' or add it with +key=value")
    return f"bad override: {msg}"


def override_key(o: str) -> str:
    """The config path an override sets: '+eval.seed=3' -> 'eval.seed'."""
    return o.lstrip("+~").split("=", 1)[0]


def touches(overrides: list[str], key: str) -> bool:
    """Whether any override sets ``key`` or something under it."""
    return any(override_key(o).split(".")[0] == key for o in overrides)


def selects(overrides: list[str], group: str) -> bool:
    """Whether any override picks an option of ``group`` (``group=name``, not ``group.key=value``)."""
    return any(override_key(o) == group for o in overrides)


def check_eval_overrides(overrides: list[str]) -> None:
    """Overrides for evaluating an existing run may not change what it trained; raises CfgxError."""
    for o in overrides:
        if override_key(o) == "experiment":  # a preset pins training too; its run keeps its evaluation settings
            raise CfgxError(f"'{o}' is a preset for a new run; train with 'cfgx train {o}' (its run keeps the "
                            "preset's evaluation settings, so a plain 'cfgx sweep' uses them)")
        if override_key(o).split(".")[0] in TRAINING_KEYS:
            raise CfgxError(f"'{o}' changes training, but sweep evaluates an existing run; train a new run "
                            f"with 'cfgx train {o}' instead")


def merge_eval_overrides(saved: DictConfig, overrides: list[str], fresh: DictConfig | None = None) -> DictConfig:
    """A run's saved config with evaluation overrides on top (a copy; ``saved`` is left as it is).

    ``fresh`` is ``compose(overrides)`` (composed here when not given). An evaluation block the run's
    config lacks, or whose group the overrides pick (``sampler=ddim``), comes whole from ``fresh``;
    dotted overrides (``eval.num_samples=64``) then land on top of the run's own settings.
    """
    fresh = compose(overrides) if fresh is None else fresh
    merged = copy.deepcopy(saved)
    for key in EVAL_KEYS:
        if key not in merged or selects(overrides, key) or key in COMMAND_KEYS:
            merged[key] = fresh[key]  # a new group choice replaces the run's whole block
        elif OmegaConf.is_dict(merged[key]) and OmegaConf.is_dict(fresh[key]):
            # Keys newer than the run take today's defaults, so readers never need a default of their own.
            base = copy.deepcopy(fresh[key])
            OmegaConf.set_struct(base, False)  # the run may hold keys today's block lacks (+guidance.myrule.k)
            merged[key] = OmegaConf.merge(base, merged[key])
    judge = OmegaConf.select(saved, "eval.classifier.source")
    if selects(overrides, "eval") and judge not in (None, "auto"):
        # A preset (eval=fid50k) is a protocol: counts, reference, features. The judge named for this run
        # (cfgx import ... eval.classifier.source=torchvision:...) is not part of it and stays.
        OmegaConf.update(merged, "eval.classifier.source", judge, merge=False, force_add=True)
    for o in overrides:
        path = override_key(o)
        if "." in path and path.split(".")[0] in EVAL_KEYS:
            OmegaConf.update(merged, path, OmegaConf.select(fresh, path), merge=False, force_add=True)
    # The cache belongs to whoever runs cfgx (CFGX_CACHE or paths.cache= on their command line), never to
    # the run dir: a copied or downloaded run's config.yaml must not pick where cfgx reads and writes.
    OmegaConf.update(merged, "paths.cache", OmegaConf.select(fresh, "paths.cache"), merge=False, force_add=True)
    return merged


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CfgxError(msg)


def _num(cfg: DictConfig, key: str) -> float:
    v = OmegaConf.select(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CfgxError(f"{key}={v!r} is not a number; set {key}=<number>")
    return v


def validate(cfg: DictConfig) -> None:
    """Range/type checks that Hydra's struct mode does not do. Raises CfgxError.

    The type of every key comes from cfgx/schema.py (derived from configs/); its ranges and cross-key rules
    run after the checks below, whose messages are older.
    """
    schema.check_types(cfg, config_dir())
    for key in ("seed", "eval.seed"):
        v = OmegaConf.select(cfg, key)
        _require(isinstance(v, int) and not isinstance(v, bool), f"{key}={v!r} must be an integer; e.g. {key}=0")
    p = _num(cfg, "cond_drop.p")
    _require(0 <= p < 1, f"cond_drop={p} is outside [0, 1); use e.g. cond_drop=0.1 "
                         "(Ho & Salimans: 0.1-0.2 work well)")
    for key in ("train.steps", "train.batch_size"):
        v = _num(cfg, key)
        _require(v == int(v) and v > 0, f"{key}={v} must be a positive integer; e.g. {key}=1000")
    snap = OmegaConf.select(cfg, "train.snapshot_every")
    if snap is not None:
        _require(not isinstance(snap, bool) and isinstance(snap, int) and snap > 0,
                 f"train.snapshot_every={snap!r} must be a positive integer (steps) or null; e.g. 250")
    _require(_num(cfg, "train.lr") > 0, f"train.lr={cfg.train.lr} must be > 0")
    _require(0 <= _num(cfg, "train.ema_decay") < 1, "train.ema_decay must be in [0, 1); e.g. 0.999")
    for key in ("eval.num_samples", "eval.batch_size", "sampler.steps"):
        v = _num(cfg, key)
        _require(v == int(v) and v > 0, f"{key}={v} must be a positive integer")
    for key in ("eval.seed_blocks", "eval.real_samples", "eval.pr_k", "eval.dc_k"):
        if OmegaConf.select(cfg, key) not in (None, "all"):  # None: runs older than the key; all: whole split
            v = _num(cfg, key)
            _require(v == int(v) and v > 0, f"{key}={v} must be a positive integer")
    ibs = OmegaConf.select(cfg, "eval.inception_batch_size", default="auto")
    _require(ibs == "auto" or (isinstance(ibs, int) and not isinstance(ibs, bool) and ibs > 0),
             f"eval.inception_batch_size={ibs!r} must be a positive integer or auto")
    _require(int(cfg.sampler.steps) <= int(cfg.diffusion.num_steps),
             f"sampler.steps={cfg.sampler.steps} exceeds diffusion.num_steps={cfg.diffusion.num_steps}")
    _require(0 <= _num(cfg, "sampler.eta") <= 1, "sampler.eta must be in [0, 1]")
    scales = cfg.guidance.scales
    _require(scales is not None and len(scales) > 0, "guidance.scales is empty; e.g. guidance=0,1,3,7")
    for s in scales:
        _require(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(float(s)),
                 f"guidance scale {s!r} is not a finite number; e.g. guidance=0,1,3,7")
    guidance_rules(cfg)  # every rule's options, one line per problem
    auto = auto_settings(cfg)  # guidance=auto: its range, tolerance and metric
    for rule in guidance_rules(cfg) if auto else ():
        rule.check_scales([auto[0], auto[1]])  # e.g. CFG++'s lambda <= 1 over the whole search range
    _require(cfg.diffusion.schedule in ("linear", "cosine"),
             f"diffusion.schedule={cfg.diffusion.schedule!r}; valid: linear, cosine")
    from cfgx.diffusion.samplers import SAMPLERS  # why: it imports torch, which 'cfgx --help' must not load

    _require(cfg.sampler.name in SAMPLERS,
             f"sampler.name={cfg.sampler.name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    _require(cfg.train.precision in ("auto", "fp32", "bf16"),
             f"train.precision={cfg.train.precision!r}; valid: auto, fp32, bf16")
    comp = OmegaConf.select(cfg, "train.compile", default="auto")
    _require(comp == "auto" or isinstance(comp, bool), f"train.compile={comp!r}; valid: auto, true, false")
    backend = OmegaConf.select(cfg, "dist.backend", default="auto")
    _require(backend in ("auto", "gloo", "nccl"),
             f"dist.backend={backend!r}; valid: auto (nccl on CUDA, gloo on CPU), gloo, nccl")
    nproc = OmegaConf.select(cfg, "launcher.nproc", default=1)
    _require(isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1,
             f"launcher.nproc={nproc!r} must be a positive integer (processes on this machine)")
    schema.check_ranges(cfg)
    schema.cross_checks(cfg)
    check_loggers(cfg)  # a logger whose package is missing: one line now, before any run dir or training


def _methods(cfg: DictConfig) -> list[str]:
    m = OmegaConf.select(cfg, "guidance.method")
    if isinstance(m, str):
        m = _split_values(m) if "," in m or m.startswith("[") else [m]
    return [str(v).strip() for v in (m or [])]


def rule_block(cfg: DictConfig | None, name: str) -> dict[str, Any]:
    """guidance.<name>: the run's block over configs/guidance/default.yaml's (runs older than a key lack it)."""
    defaults = OmegaConf.load(config_dir() / "guidance" / "default.yaml").get(name) or OmegaConf.create({})
    saved = None if cfg is None else OmegaConf.select(cfg, f"guidance.{name}")
    merged = OmegaConf.merge(defaults, saved) if saved is not None else defaults
    return OmegaConf.to_container(merged, resolve=True) or {}  # type: ignore[return-value]


def default_rule(entry: str, check: bool = True):
    """``name`` or ``name@schedule`` with the options of configs/guidance/default.yaml (Python API, toy)."""
    # torch-heavy (the rules' maths): imported here so that 'cfgx --help' stays fast.
    from cfgx.diffusion.guidance import get_rule

    name, _, sched = entry.partition("@")
    return get_rule(name)(rule_block(None, name), sched or "constant", check=check)


def guidance_rules(cfg: DictConfig) -> list:
    """The rules ``guidance.method`` asks for, each built from its block and checked; raises CfgxError.

    ``guidance.method`` is one name or a list; ``name@schedule`` gives one entry a weight schedule,
    else ``guidance.schedule`` applies to the entries that take one. Which rules exist, their options
    and checks belong to cfgx/diffusion/guidance/; this only reads the config.
    """
    # torch-heavy (the rules' maths): imported here so that 'cfgx --help' stays fast.
    from cfgx.diffusion.guidance import get_rule, rule_names

    methods = _methods(cfg)
    _require(bool(methods), f"guidance.method is empty; valid: {', '.join(rule_names())}")
    default_sched = str(OmegaConf.select(cfg, "guidance.schedule", default="constant") or "constant")
    rules = []
    for entry in methods:
        name, _, sched = entry.partition("@")
        cls = get_rule(name)
        rule = cls(rule_block(cfg, name), sched or (default_sched if cls.schedulable else "constant"))
        rule.check_sampler(str(cfg.sampler.name))
        rule.check_scales([float(s) for s in cfg.guidance.scales])
        rules.append(rule)
    return rules


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig | dict, keys: tuple[str, ...] = TRAINING_KEYS) -> str:
    """Short stable hash of the parts of a config that define a trained model."""
    d = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    sub = {k: d.get(k) for k in keys}
    if isinstance(sub.get("train"), dict):
        sub["train"] = {k: v for k, v in sub["train"].items() if k not in EXECUTION_KEYS}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:12]
