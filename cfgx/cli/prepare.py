"""``cfgx prepare``: fetch what evaluation needs while a network is available.

``cfgx prepare inception dinov2`` fetches named artifacts (:data:`ARTIFACTS`) into the torch hub
cache, where cfgx looks by default, and checks their hash; ``cfgx prepare dataset=X`` also
downloads that dataset (and the Inception weights). cfgx itself never downloads at run time: on an
offline machine a missing file is one line naming it, and this command (or a copy by hand) fixes it.

To add an artifact (a pretrained diffusion model, another feature network), add one
:class:`Artifact` to :data:`ARTIFACTS`: its URL, file name, hash, and the key that points at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgx.cli.common import console as make_console
from cfgx.config import compose, normalize_overrides
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.metrics.dinov2 import DINOV2_FILENAME, DINOV2_URL
from cfgx.metrics.inception import INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_URL
from cfgx.pretrained.hub import fetch_pretrained
from cfgx.store.digest import sha256_of


@dataclass(frozen=True)
class Artifact:
    """A file cfgx can fetch: where from, what it is called, how to check it, which key uses it."""

    url: str
    filename: str
    sha256: str | None  # full hex digest or a prefix of it (torch hub's file-name convention); None: unchecked
    config_key: str     # the key that points at a copy elsewhere
    what: str
    value: str = "{path}"  # what config_key is set to (a classifier source names its architecture too)

    def default_path(self) -> Path:
        """Where cfgx looks when ``config_key`` is null: the torch hub checkpoint cache."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename


ARTIFACTS: dict[str, Artifact] = {
    "inception": Artifact(INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_FILENAME, "6726825d", "eval.inception_weights",
                          "FID Inception-v3 (torch-fidelity's port of the TF 2015-12-05 graph)"),
    "dinov2": Artifact(DINOV2_URL, DINOV2_FILENAME, None, "eval.dinov2_weights",
                       "DINOv2 ViT-L/14, official facebookresearch state dict (FD_DINOv2)"),
    "resnet50": Artifact("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "resnet50-11ad3fa6.pth",
                         "11ad3fa6", "eval.classifier.source", "torchvision ResNet-50 IMAGENET1K_V2 (80.9% top-1), "
                         "an ImageNet evaluation classifier", "torchvision:resnet50:{path}"),
}

Downloader = Callable[[str, str], None]


def _download(url: str, dst: str) -> None:
    torch.hub.download_url_to_file(url, dst, progress=True)


def fetch(name: str, dest: Path | None = None, download: Downloader | None = None) -> tuple[Path, bool]:
    """Artifact ``name`` at ``dest`` (default: the torch hub cache), downloaded if absent; (path, fetched now)."""
    if name not in ARTIFACTS:
        raise CfgxError(f"cfgx prepare: unknown artifact {name!r}; known: {', '.join(ARTIFACTS)}")
    art = ARTIFACTS[name]
    path = Path(dest).expanduser() if dest is not None else art.default_path()
    if path.is_file():
        return path, False
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        (download or _download)(art.url, str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise CfgxError(f"could not download {name} ({type(e).__name__}: {str(e)[:80]}); on a machine with "
                        f"internet fetch {art.url} and put it at {path} (or set {art.config_key}=PATH)") from None
    digest = sha256_of(tmp)
    if art.sha256 is not None and not digest.startswith(art.sha256):
        tmp.unlink(missing_ok=True)
        raise CfgxError(f"{name} from {art.url} has sha256 {digest[:16]}..., expected {art.sha256}...: "
                        "the download is corrupt or the file changed upstream; try again")
    tmp.replace(path)
    return path, True


def cmd_prepare(args: list[str]) -> int:
    """``cfgx prepare [NAME|OWNER/MODEL ...] [dataset=X]``: named artifacts, hub models (configs + safetensors);
    with a dataset, it and the Inception weights."""
    names = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    console = make_console()
    if not names or overrides:
        cfg = compose(normalize_overrides(overrides) + ["dataset.download=true"])
        data = build_dataset(cfg.dataset)
        console.print(f"dataset {data.name}: {len(data.train)} training images ready")
        names = names or ["inception"]
        dests = {"inception": cfg.eval.get("inception_weights"), "dinov2": cfg.eval.get("dinov2_weights")}
    else:
        dests = {}
    for name in [n for n in names if "/" in n]:  # a hub id (facebook/DiT-XL-2-256): a pretrained model's folder
        names.remove(name)
        folder = fetch_pretrained(name, Path("~/.cache/cfgx/pretrained").expanduser() / name.replace("/", "--"))
        console.print(f"{name}: saved to {folder}; next: cfgx import model={folder} dataset.root=<reference images>")
    for name in names:
        path, fetched = fetch(name, Path(str(dests[name])) if dests.get(name) else None)
        art = ARTIFACTS[name]
        named = art.value != "{path}" or path != art.default_path()  # a source must always be named
        console.print(f"{name} ({art.what}): {'saved to' if fetched else 'present at'} {path}"
                      + (f"; set {art.config_key}={art.value.format(path=path)}" if named else ""),
                      soft_wrap=True)  # a path to copy: never wrapped
    return 0
