"""``model=py:package.module:factory``: any external denoiser through a Python entry point.

The factory (called with the keyword arguments given, none by default) returns a ``Pretrained``, or a
``(net, Conventions)`` pair: the network ``net(x', time, y)``, what it predicts and how it is timed
(see cfgx/pretrained/adapter.py), optionally a separate unconditional network and a latent codec.
The module is imported from ``sys.path`` (the current directory included, as ``python -m`` does):
it is the user's own code, run as any script would be.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.pretrained.adapter import Conventions, ExternalDenoiser, LatentCodec

PREFIX = "py:"


@dataclass
class Pretrained:
    """What a factory returns: the network, its conventions, and what it optionally brings."""

    net: Any
    conventions: Conventions
    uncond: Any = None
    codec: LatentCodec | None = None
    shape: tuple[int, ...] | None = None  # (C, H, W) of what the network denoises, when it knows

    def denoiser(self, schedule: NoiseSchedule, name: str = "external") -> ExternalDenoiser:
        """cfgx's ``model(x, t, y) -> eps`` on ``schedule`` (the one the sampler walks)."""
        return ExternalDenoiser(self.net, self.conventions, schedule, uncond=self.uncond, name=name,
                                codec=self.codec, sample_shape=self.shape)


def parse_spec(spec: str) -> tuple[str, str]:
    """``py:pkg.mod:factory`` -> ("pkg.mod", "factory"), or a one-line error showing the form."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    module, _, func = body.partition(":")
    if not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
        raise CfgxError(f"model={spec!r} is not an entry point; write model=py:package.module:factory "
                        "(a function returning the network and its Conventions)")
    return module, func


def load_entry(spec: str, **kwargs: Any) -> Pretrained:
    """Import ``spec``'s module, call its factory, and check what it returned."""
    module, func = parse_spec(spec)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like python -m: the user's own module in the current folder
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CfgxError(f"model={spec}: cannot import {module!r} ({e}); put it on PYTHONPATH or in the current "
                        "folder") from None
    factory = getattr(mod, func, None)
    if not callable(factory):
        raise CfgxError(f"model={spec}: {module} has no function {func!r}")
    out = factory(**kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Conventions):
        out = Pretrained(out[0], out[1])
    if not isinstance(out, Pretrained) or not callable(out.net):
        raise CfgxError(f"model={spec}: the factory must return cfgx.pretrained.entry.Pretrained or "
                        f"(net, Conventions), got {type(out).__name__}")
    out.conventions.check(out.uncond is not None)
    return out
