"""Imported runs beyond the sweep: the weights are re-hashed at every load (a changed file is refused in one
line and rows carry ``model_sha256``), ``cfgx postprocess`` trains a flow on a latent DiT's decoded samples,
and a ``model=py:`` source goes through import and sweep like a diffusers folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cfgx.cli import main
from cfgx.sweep.rows import load_rows

pytest.importorskip("diffusers")
from test_pretrained_dit import save_tiny_pipeline  # noqa: E402
from test_pretrained_import import _reference_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["eval.num_samples=20", "eval.batch_size=10", "sampler.steps=4", "eval.classifier.steps=60",
         "eval.classifier.width=8", "eval.features=classifier", "eval.classifier.source=own"]
POST = ["postprocess.steps=20", "postprocess.samples_per_scale=10", "postprocess.train_scales=[1,3]",
        "postprocess.pair_batch_size=10", "postprocess.batch_size=8", "postprocess.ckpt_every=10",
        "postprocess.k=2", "postprocess.warmup_steps=2"]


def _the_run(workdir: Path) -> Path:
    (run,) = [p.parent for p in (workdir / "runs").glob("imagefolder/*/meta.json")]
    return run


def test_latent_dit_postprocess_then_changed_weights_are_refused(workdir, capsys) -> None:
    save_tiny_pipeline(workdir / "dit")
    ref = _reference_folder(workdir / "ref")
    assert main(["import", "model=dit", f"dataset.root={ref}"]) == 0
    run = _the_run(workdir)

    # The DiT is no U-Net to copy: the flow needs its own, named.
    assert main(["postprocess", f"run={run}", *SMALL, *POST]) == 2
    err = capsys.readouterr().err
    assert "postprocess.init=scratch postprocess.unet=<" in err and err.count("\n") == 1
    assert not (run / "postprocess").exists()
    post = [*POST, "postprocess.init=scratch", "postprocess.unet=tiny"]
    assert main(["postprocess", f"run={run}", *SMALL, *post]) == 0
    info = json.loads((run / "postprocess" / "info.json").read_text())
    assert info["finished"] and info["settings"]["unet"] == "tiny" and info["backbone"]["ch"] == 24
    pairs = torch.load(run / "postprocess" / "pairs.pt", weights_only=True)
    assert tuple(pairs["x_hat"].shape) == (20, 3, 16, 16)  # decoded images, not 4x8x8 latents

    assert main(["sweep", f"run={run}", "guidance=1", "postprocess=flow", *SMALL]) == 0
    rows = load_rows(run)
    assert sorted(r["postprocess"] for r in rows) == ["flow", "none"]
    sha = {r["model_sha256"] for r in rows}
    assert len(sha) == 1 and re.fullmatch(r"[0-9a-f]{12}", sha.pop())

    # Another file in the imported place: rows would name weights that were not sampled.
    from safetensors.torch import load_file, save_file

    vae = workdir / "dit" / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(vae)
    first = sorted(sd)[0]
    sd[first] = sd[first] + 1e-3
    save_file(sd, vae)
    capsys.readouterr()
    before = sorted(p.name for p in (run / "sweep" / "rows").iterdir())
    assert main(["sweep", f"run={run}", "guidance=3", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "imported weights changed since cfgx import: vae/diffusion_pytorch_model.safetensors" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in (run / "sweep" / "rows").iterdir()) == before


FACTORY = '''
import torch
from torch import nn
from cfgx.pretrained.adapter import Conventions
from cfgx.pretrained.entry import Pretrained


class TinyX0Net(nn.Module):
    """D(x; sigma, y): a class-conditional x0 predictor in EDM's convention, random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(4, 3)   # 3 classes and the null label 3
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, sigma, y):
        c = 1 / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        return c * x + 0.1 * torch.tanh(self.conv(x)) + 0.3 * self.emb(y)[:, :, None, None]


def factory():
    return Pretrained(TinyX0Net(), Conventions("x0", "edm", num_classes=3, null_index=3), shape=(3, 16, 16))
'''


def test_py_source_imports_and_sweeps(workdir, monkeypatch, capsys) -> None:
    (workdir / "tiny_edm_source.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(workdir))
    ref = _reference_folder(workdir / "ref", classes=3, per_class=4)
    assert main(["import", "model=py:tiny_edm_source:factory", f"dataset.root={ref}"]) == 0
    run = _the_run(workdir)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["imported"]["loader"] == "py" and meta["imported"]["weights_sha256"] == {}
    assert main(["sweep", f"run={run}", "guidance=0,1,3", *SMALL]) == 0
    rows = sorted(load_rows(run), key=lambda r: r["s"])
    assert [r["s"] for r in rows] == [0.0, 1.0, 3.0]
    for r in rows:
        assert r["model"] == "py:tiny_edm_source:factory" and r["model_prediction"] == "x0"
        assert r["model_time"] == "edm" and r["model_sha256"] is None and r["accuracy"] is not None
    assert rows[0]["fd_classifier"] != rows[2]["fd_classifier"]  # the scale reached the network


ADM_LIKE = '''
import torch
from torch import nn
from cfgx.pretrained.adapter import Conventions
from cfgx.pretrained.entry import Pretrained


class TinyUNetModel(nn.Module):
    """guided-diffusion's UNetModel interface: forward(x, timesteps, y=None) -> [eps, v] (learn_sigma)."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.emb = nn.Embedding(classes, 6) if classes else None

    def forward(self, x, timesteps, y=None):
        h = self.conv(x) + (timesteps.float() / 1000)[:, None, None, None]
        if self.emb is not None:
            h = h + self.emb(y)[:, :, None, None]
        return torch.cat([0.5 * torch.tanh(h[:, :3]), torch.tanh(h[:, 3:])], dim=1)


def factory():
    torch.manual_seed(0)
    cond, uncond = TinyUNetModel(3), TinyUNetModel(0)
    conv = Conventions("eps", "ddpm", num_classes=3, null_index=None, learned_sigma=True,
                       schedule={"kind": "linear", "num_steps": 1000})
    return Pretrained(cond, conv, uncond=uncond, shape=(3, 16, 16))
'''


def test_two_network_learned_variance_py_source(workdir, monkeypatch) -> None:
    """ADM's layout (a conditional and a separate unconditional network, learned variance) imported through
    py: and swept with its own sampler: the README's worked example, in small."""
    (workdir / "tiny_adm_source.py").write_text(ADM_LIKE)
    monkeypatch.syspath_prepend(str(workdir))
    ref = _reference_folder(workdir / "ref", classes=3, per_class=4)
    assert main(["import", "model=py:tiny_adm_source:factory", f"dataset.root={ref}"]) == 0
    run = _the_run(workdir)
    assert main(["sweep", f"run={run}", "guidance=0,1,2", "sampler=ddpm", "sampler.variance=learned",
                 *SMALL]) == 0
    rows = sorted(load_rows(run), key=lambda r: r["s"])
    assert [(r["s"], r["sampler"], r["nfe"]) for r in rows] == [(0.0, "ddpm-learned", 4), (1.0, "ddpm-learned", 4),
                                                              (2.0, "ddpm-learned", 8)]
