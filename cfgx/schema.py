"""The config schema, derived from the config groups themselves, and the one validation pass over it.

Every key of every yaml under ``configs/`` is a schema entry; its type is inferred from its defaults
(the union over every option of the group that sets it: ``eval.features`` is ``auto`` in one file and
a list in another, so both are legal). Type alone cannot say "positive" or "a probability", so
``RANGES`` adds a range per key where it matters, and ``ALSO`` declares what a key whose default is
``null`` may hold (a new key with a ``null`` default declares its types there; without an entry any
value passes the type check). ``cross_checks`` holds the rules that span keys (the beta schedule,
``pr_k`` below the sample count). ``check(cfg)`` runs it all before any run dir or network exists.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cfgx.errors import CfgxError

_SKIP_ROOT = ("defaults", "hydra")
MAX_SCALE = 1e3  # beyond this eps differences overflow the data range many times over: no useful row
SEED_MAX = 2**32 - 1  # numpy's RandomState accepts seeds in [0, 2**32)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple, ListConfig)):
        return "list"
    if isinstance(v, (dict, DictConfig)):
        return "dict"
    return type(v).__name__


def _leaves(d: Any, prefix: str, out: dict[str, set[str]]) -> None:
    if isinstance(d, dict) and d:
        for k, v in d.items():
            _leaves(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix:
        out.setdefault(prefix, set()).add("str" if isinstance(d, str) and "${" in d else _type_name(d))


def _package(path) -> str:
    head = path.read_text().lstrip().splitlines()[:1]
    if head and head[0].replace(" ", "").startswith("#@package_global_"):
        return ""
    return path.parent.name


@functools.lru_cache(maxsize=4)
def schema(root: Path) -> dict[str, frozenset[str]]:
    """Every config key (dotted path) -> the type names its defaults take across the groups under ``root``."""
    out: dict[str, set[str]] = {}
    top = OmegaConf.to_container(OmegaConf.load(root / "config.yaml"), resolve=False) or {}
    _leaves({k: v for k, v in top.items() if k not in _SKIP_ROOT}, "", out)
    for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted(group.glob("*.yaml")):
            d = OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}
            d = {k: v for k, v in d.items() if k != "defaults"}
            pkg = _package(f)
            _leaves(d, pkg, out)
    return {k: frozenset(v) for k, v in out.items()}


# Types a key may hold beyond those of its defaults: what a null-default key holds when set (a null-default
# key without an entry takes any value), and the second form of keys such as train.compile (auto | bool).
ALSO: dict[str, tuple[str, ...]] = {
    "train.compile": ("bool",), "eval.inception_batch_size": ("int",), "guidance.method": ("list",),
    **{f"logger.{k}": ("str",) for k in ("csv.dir", "tensorboard.dir", "mlflow.tracking_uri", "mlflow.run_name",
                                        "wandb.dir", "wandb.entity", "wandb.name")},
    "train.snapshot_every": ("int",),
    "guidance.classifier.steps": ("int",), "guidance.classifier.batch_size": ("int",),
    "guidance.classifier.lr": ("int", "float"), "guidance.classifier.width": ("int",),
    "guidance.classifier.hidden": ("int",), "guidance.apg.norm_threshold": ("int", "float"),
    "guidance.autoguidance.guide": ("str",), "eval.inception_weights": ("str",),
    "dataset.root": ("str",), "dataset.test_root": ("str",), "dataset.inner_radius": ("int", "float"),
    "run": ("str",),
    "eval.reference": ("str",), "eval.dinov2_weights": ("str",), "eval.real_samples": ("str",),
    "cpu_threads": ("int",), "postprocess.unet": ("str",),
}

_pos = (lambda v: v > 0, "must be > 0")
_nonneg = (lambda v: v >= 0, "must be >= 0")
_prob = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_unit = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
# Range constraints where the type is not enough (numbers are also checked finite). Keys absent from a
# config (a run older than the key) are skipped; null passes (a null-default key's "not set").
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: _pos for k in (
        "train.steps", "train.batch_size", "train.lr", "train.log_every", "train.ckpt_every", "train.grad_clip",
        "train.snapshot_every", "eval.num_samples", "eval.batch_size", "eval.grid_per_class",
        "eval.seed_blocks", "eval.pr_k", "eval.dc_k", "eval.kid_subsets", "eval.kid_subset_size",
        "eval.boundary_delta", "eval.classifier.steps", "eval.classifier.batch_size", "eval.classifier.lr",
        "eval.classifier.width", "sampler.steps", "diffusion.num_steps", "diffusion.beta_start",
        "diffusion.beta_end", "dist.timeout_min", "launcher.nproc", "dataset.resolution", "dataset.channels",
        "dataset.std", "dataset.n_train", "dataset.n_test", "dataset.num_classes", "dataset.components_per_class",
        "dataset.radius", "backbone.ch", "backbone.num_res_blocks", "backbone.heads", "guidance.classifier.steps",
        "guidance.classifier.batch_size", "guidance.classifier.lr", "guidance.classifier.width",
        "guidance.classifier.hidden", "guidance.apg.norm_threshold", "guidance.cfgpp.s_at_lambda1",
        "postprocess.k", "postprocess.samples_per_scale", "postprocess.pair_batch_size", "postprocess.t_scale",
        "postprocess.mlp_hidden", "postprocess.mlp_depth", "postprocess.steps", "postprocess.batch_size",
        "postprocess.lr", "postprocess.grad_clip", "postprocess.ckpt_every", "postprocess.apply_steps",
        "postprocess.apply_batch_size")},
    **{k: _nonneg for k in ("train.warmup_steps", "train.weight_decay", "postprocess.warmup_steps",
                            "dataset.split_seed", "dataset.seed", "postprocess.pair_seed", "postprocess.seed",
                            "dataset.inner_radius")},
    "train.ema_decay": _prob, "postprocess.ema_decay": _prob, "cond_drop.p": _prob, "backbone.dropout": _prob,
    "train.grad_clip": (lambda v: v > 0, "must be > 0 or null (no clipping): a negative max norm flips the "
                                         "gradient"),
    "sampler.eta": _unit, "guidance.rescale.phi": _unit,
    "cpu_threads": (lambda v: v == "auto" or (not isinstance(v, str) and v >= 1), "must be auto or an integer >= 1"),
    "eval.real_samples": (lambda v: v == "all" or (not isinstance(v, str) and v > 0),
                          "must be a positive integer or all"),
    "guidance.auto_tol": _pos,
    "seed": (lambda v: 0 <= v <= SEED_MAX, f"must be in [0, {SEED_MAX}] (numpy's seed range)"),
    "eval.seed": (lambda v: 0 <= v <= 2**31 - 1, f"must be in [0, {2**31 - 1}] (sample i draws seed eval.seed+i)"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "postprocess.apply_method": ("euler", "heun"), "postprocess.init": ("run", "scratch"),
    "guidance.rescale.space": ("x0", "eps"), "guidance.schedule": ("constant", "linear", "cosine"),
    "sampler.spacing": ("linspace", "leading"), "sampler.variance": ("fixed_small", "fixed_large", "learned"),
}
# Keys that take a number or one word (their range check reads both).
WORD_OR_NUMBER = ("cpu_threads", "eval.real_samples")
RANGES.update({k: (lambda v, c=c: v in c, "valid: " + ", ".join(c)) for k, c in CHOICES.items()})


def _type_ok(v: Any, types: frozenset[str] | tuple[str, ...]) -> bool:
    t = _type_name(v)
    if t == "null":
        return True
    return t in types or (t == "int" and "float" in types)


def _read(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) for ``key``; an interpolation that does not resolve is one line."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=False, default=KeyError)
    except (OmegaConfBaseException, RecursionError, ValueError) as e:
        raise CfgxError(f"{key} does not resolve ({' '.join(str(e).split()[:12])}); give it a plain value, "
                        f"e.g. {key}=<value>") from None
    if node is KeyError:
        return False, None
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return True, OmegaConf.to_container(node, resolve=True)
        except (OmegaConfBaseException, RecursionError, ValueError) as e:
            raise CfgxError(f"{key} does not resolve ({' '.join(str(e).split()[:12])}); give it plain values") from None
    return True, node


def check_types(cfg: DictConfig, root: Path) -> None:
    """Every known key holds a value of its schema type; raises CfgxError naming the key and an example."""
    sch = schema(root)
    for key, types in sch.items():
        present, v = _read(cfg, key)
        if not present or v is None or v == "???":
            continue
        allowed = tuple(t for t in types if t != "null") + ALSO.get(key, ())
        if not allowed:
            continue
        if not _type_ok(v, allowed):
            allowed = tuple(t for t in allowed if t != "int") if "float" in allowed else allowed
            want = " or ".join(sorted({"integer" if t == "int" else "number" if t == "float" else
                                       "true/false" if t == "bool" else "string" if t == "str" else t
                                       for t in allowed}))
            nan = f" ({v!r} is not a number)" if isinstance(v, str) and {"int", "float"} & set(allowed) else ""
            raise CfgxError(f"{key}={v!r} must be {'an' if want.startswith('i') else 'a'} {want}{nan}; "
                            f"set {key}=<{want.split(' or ')[0]}>")


def check_ranges(cfg: DictConfig) -> None:
    for key, (ok, why) in RANGES.items():
        present, v = _read(cfg, key)
        if not present or v is None or isinstance(v, (bool, list, dict)):
            continue
        if isinstance(v, str) != (key in CHOICES) and key not in WORD_OR_NUMBER:  # type errors: check_types'
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise CfgxError(f"{key}={v!r} is not finite; give a finite number")
        if not ok(v):
            raise CfgxError(f"{key}={v!r} {why}; set a value that is, e.g. {key}=<value>")


def cross_checks(cfg: DictConfig) -> None:
    """Rules that span keys."""
    n = OmegaConf.select(cfg, "eval.num_samples")
    real = OmegaConf.select(cfg, "eval.real_samples")
    for key in ("eval.pr_k", "eval.dc_k"):
        k = OmegaConf.select(cfg, key)
        for what, count in (("eval.num_samples", n), ("eval.real_samples", real)):
            if isinstance(k, int) and isinstance(count, int) and k >= count:
                raise CfgxError(f"{key}={k} must be below {what}={count} (k nearest neighbours among the samples)")
    b0, b1 = OmegaConf.select(cfg, "diffusion.beta_start"), OmegaConf.select(cfg, "diffusion.beta_end")
    if str(OmegaConf.select(cfg, "diffusion.schedule")) == "linear":
        if not (0 < b0 < b1 < 1):
            raise CfgxError(f"diffusion.beta_start={b0}, beta_end={b1}: need 0 < beta_start < beta_end < 1 "
                            "(each alpha = 1 - beta must lie in (0, 1)); e.g. 0.0001 and 0.02")
    for s in OmegaConf.select(cfg, "guidance.scales") or []:
        if isinstance(s, (int, float)) and abs(float(s)) > MAX_SCALE:
            raise CfgxError(f"guidance scale {s!r} is beyond +-{MAX_SCALE:g}: the guided eps is then dominated by "
                            "float error and its samples overflow the data range; use scales within +-1000")
    variance, sampler = OmegaConf.select(cfg, "sampler.variance"), OmegaConf.select(cfg, "sampler.name")
    if variance not in (None, "fixed_small") and sampler != "ddpm":
        raise CfgxError(f"sampler.variance={variance} is a choice of the ancestral DDPM sampler; sampler={sampler} "
                        "has none; add sampler=ddpm (or drop sampler.variance)")
    src = OmegaConf.select(cfg, "eval.classifier.source", default=None)
    if src is not None and not re.fullmatch(r"auto|own|none|torchvision:\w+:.+", str(src)):
        raise CfgxError(f"eval.classifier.source={src!r}; valid: auto, own, none, torchvision:ARCH:PATH "
                        "(e.g. torchvision:resnet50:/path/to/resnet50-11ad3fa6.pth)")
    device = str(OmegaConf.select(cfg, "device", default="auto"))
    if device.split(":")[0] == "meta":
        raise CfgxError("device='meta' holds no data (shapes only); use auto, cpu or cuda[:N]")


def check(cfg: DictConfig, root: Path) -> None:
    """The one validation pass over the groups under ``root``: types of every key, ranges, cross-key rules."""
    check_types(cfg, root)
    check_ranges(cfg)
    cross_checks(cfg)


def check_output_dirs(overrides: list[str]) -> None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` given on the command line: a folder cfgx can create, checked
    before Hydra makes it (an unwritable one is otherwise a traceback from inside Hydra)."""
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if not eq or key not in ("hydra.run.dir", "hydra.sweep.dir") or "${" in value:
            continue
        target = Path(value).expanduser().absolute()
        base = next(p for p in (target, *target.parents) if p.exists())
        if not base.is_dir():
            raise CfgxError(f"{key}={value}: {base} is a file, not a folder; pick a folder you can write")
        try:  # a real probe: os.access says yes to root for /proc, where nothing can be created
            tempfile.TemporaryDirectory(dir=base, prefix=".cfgx-probe-").cleanup()
        except OSError as e:
            raise CfgxError(f"{key}={value}: cannot create folders in {base} ({e.strerror}); pick a folder "
                            "you can write") from None
