"""The flow postprocessor's settings, read once from the ``postprocess`` config into ``FlowSettings``.

Defaults live only in ``configs/postprocess/flow.yaml``: a config given without Hydra (the
Python API, a run's older ``info.json`` that lacks a newer key) is merged over that file, never
over a second copy of its values here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cfgx.config import config_dir

NN_SPACES = ("pixels", "classifier", "inception")
METHODS = ("euler", "heun")
# Settings that only change how a trained flow is applied: a sweep may change them freely.
APPLY_KEYS = ("apply_steps", "apply_method", "apply_batch_size")
# Settings that define the training pairs, and the flow trained on them.
PAIR_KEYS = ("k", "nn_space", "train_scales", "samples_per_scale", "pair_seed", "pair_batch_size")
TRAIN_KEYS = ("per_scale", "steps", "batch_size", "lr", "warmup_steps", "ema_decay", "grad_clip", "seed",
              "init", "unet", "t_scale", "mlp_hidden", "mlp_depth")


@functools.lru_cache(maxsize=1)
def yaml_defaults() -> dict[str, Any]:
    """``configs/postprocess/flow.yaml`` as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "postprocess" / "flow.yaml"),  # type: ignore
                                  resolve=True)


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, unknown types strings)."""
    return json.loads(json.dumps(obj, default=str))


@dataclass(frozen=True)
class FlowSettings:
    """Every ``postprocess.*`` value of the flow postprocessor, typed.

    ``given`` keeps the values exactly as configured (``train_scales: [1, 2]`` stays ints): they
    are what ``info.json`` records and what the sweep's ``flow-<hash>`` tag hashes, and 1 and
    1.0 hash differently. The field order is ``info.json``'s key order.
    """

    name: str
    k: int
    nn_space: str
    train_scales: tuple[float, ...]
    per_scale: bool
    samples_per_scale: int
    pair_seed: int
    pair_batch_size: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    grad_clip: float | None
    seed: int
    ckpt_every: int
    init: str
    unet: str | None
    t_scale: float
    mlp_hidden: int
    mlp_depth: int
    apply_steps: int
    apply_method: str
    apply_batch_size: int
    given: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: FlowSettings | Mapping[str, Any] | DictConfig | None) -> FlowSettings:
        """The settings of ``cfg`` (a ``postprocess`` config or part of one) over flow.yaml's."""
        if isinstance(cfg, FlowSettings):
            return cfg
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        merged = {**yaml_defaults(), **dict(cfg or {})}
        names = [f.name for f in fields(cls) if f.name != "given"]
        v = {name: merged[name] for name in names}
        return cls(
            name=str(v["name"]), k=int(v["k"]), nn_space=str(v["nn_space"]),
            train_scales=tuple(float(s) for s in v["train_scales"]), per_scale=bool(v["per_scale"]),
            samples_per_scale=int(v["samples_per_scale"]), pair_seed=int(v["pair_seed"]),
            pair_batch_size=int(v["pair_batch_size"]), steps=int(v["steps"]), batch_size=int(v["batch_size"]),
            lr=float(v["lr"]), warmup_steps=int(v["warmup_steps"]), ema_decay=float(v["ema_decay"]),
            grad_clip=None if v["grad_clip"] is None else float(v["grad_clip"]), seed=int(v["seed"]),
            ckpt_every=int(v["ckpt_every"]), init=str(v["init"]),
            unet=None if v["unet"] is None else str(v["unet"]), t_scale=float(v["t_scale"]),
            mlp_hidden=int(v["mlp_hidden"]), mlp_depth=int(v["mlp_depth"]), apply_steps=int(v["apply_steps"]),
            apply_method=str(v["apply_method"]), apply_batch_size=int(v["apply_batch_size"]), given=v)

    def record(self, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The values as configured (all, or ``keys``), in field order: what ``info.json`` stores."""
        return {k: self.given[k] for k in (keys if keys is not None else self.given)}

    @property
    def apply_nfe(self) -> int:
        """Network evaluations per sample of applying the flow: Heun evaluates twice per step."""
        return self.apply_steps * (2 if self.apply_method == "heun" else 1)
