"""Which evaluation classifier scores the samples (``eval.classifier.source``), and a torchvision one.

- ``own``: cfgx's small classifier trained on the real split (:mod:`cfgx.metrics.eval_classifier`).
- ``none``: no classifier; the classifier columns stay empty and ``classifier_note`` says why. What a
  pretrained ImageNet model is scored with when nobody names a classifier: cfgx's own would train
  minutes-to-hours on ImageNet and judge worse than any published network.
- ``torchvision:ARCH:PATH``: any torchvision classification architecture (``resnet50``, ``vit_b_16``,
  ...) with weights from a local ``.pth``/``.pt``/``.safetensors`` state dict, read without unpickling
  code and loaded strictly. Its input is what torchvision publishes for that architecture's ImageNet
  weights (resize, center crop, ImageNet mean/std; the variant whose download hash matches the file,
  else the default); features are the input of its final linear layer, logits its output.
- ``auto`` (the default): ``none`` for imported pretrained models, ``own`` for runs cfgx trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from cfgx.console import say
from cfgx.data import to_uint8
from cfgx.errors import CfgxError
from cfgx.metrics.eval_classifier import classify
from cfgx.metrics.feature_cache import FeatureCache
from cfgx.pretrained.weights import read_hashed_state_dict
from cfgx.store.locks import locked

EXAMPLE = "eval.classifier.source=torchvision:resnet50:/path/to/resnet50-11ad3fa6.pth"
NOTE = f"no evaluation classifier (eval.classifier.source=none); name one with {EXAMPLE}"
# Row columns read off a classifier: empty (None) when there is none, so every table keeps its shape.
CLASSIFIER_COLUMNS = ("accuracy", "fd_classifier", "diversity_within_class", "confidence", "entropy", "margin",
                      "near_boundary", "fd_classifier_per_class", "eval_classifier_acc")


@dataclass(frozen=True)
class ClassifierSource:
    kind: str  # own | none | torchvision
    arch: str | None = None
    path: str | None = None


def parse_source(value: Any, pretrained: bool = False) -> ClassifierSource:
    """``eval.classifier.source`` read (``auto``: ``none`` for an imported pretrained model, else ``own``)."""
    v = "auto" if value is None else str(value)
    if v == "auto":
        return ClassifierSource("none" if pretrained else "own")
    if v in ("own", "none"):
        return ClassifierSource(v)
    kind, _, rest = v.partition(":")
    arch, _, path = rest.partition(":")
    if kind != "torchvision" or not arch or not path:
        raise CfgxError(f"eval.classifier.source={v!r}; valid: auto, own, none, torchvision:ARCH:PATH "
                        f"(e.g. {EXAMPLE})")
    return ClassifierSource("torchvision", arch, str(Path(path).expanduser()))


def _published_weights(arch: str, digest: str) -> Any:
    """torchvision's weights entry for ``arch`` whose download hash (the file name's suffix) is ``digest``'s
    prefix, else the architecture's default entry: its ``transforms()`` is the published preprocessing."""
    entries = list(torchvision.models.get_model_weights(arch))
    for w in entries:
        if digest.startswith(Path(w.url).stem.rsplit("-", 1)[-1]):
            return w
    return torchvision.models.get_model_weights(arch).DEFAULT


def _final_linear(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CfgxError(f"{type(net).__name__} has no final linear layer to read features before; name an "
                        "architecture with one (resnet50, vit_b_16, convnext_tiny, ...)")
    return names[-1]


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier split at its final linear layer: ``features`` (penultimate) and ``head``."""

    def __init__(self, net: nn.Module, head_name: str, transform: nn.Module, batch_size: int = 64) -> None:
        super().__init__()
        parent, _, leaf = head_name.rpartition(".")
        self.head = net.get_submodule(head_name)
        setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
        self.net, self.transform, self.batch_size = net.eval(), transform, batch_size
        self.feature_dim = self.head.in_features

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """cfgx's [-1, 1] images as the PNGs hold them (uint8), then torchvision's published transform."""
        x = to_uint8(x).float() / 255.0
        return self.transform(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Chunks: the resized 224 px batch is ~50x the sample batch in memory.
        return torch.cat([self.net(self.preprocess(x[i:i + self.batch_size]))
                          for i in range(0, len(x), self.batch_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _build(arch: str, state: dict[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """The architecture with as many classes as the state dict's final layer, its weights loaded strictly."""
    # the weights replace every initial value: skip the slow scipy init these two would warn about
    kwargs: dict[str, Any] = {"init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    with torch.device("meta"):  # shapes only: which layer is the final one
        head = _final_linear(torchvision.models.get_model(arch, **kwargs))
    if f"{head}.weight" not in state:
        raise CfgxError(f"the weights have no {head}.weight: not a torchvision {arch} state dict")
    kwargs["num_classes"] = int(state[f"{head}.weight"].shape[0])
    if arch in ("inception_v3", "googlenet"):  # as torchvision builds them for its published weights
        kwargs.update(transform_input=True, aux_logits=any(k.startswith(("AuxLogits.", "aux1.")) for k in state))
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip()[:160] if "\n" in str(e) else str(e)[:160]
        raise CfgxError(f"the weights do not fit torchvision's {arch} ({first}); name the architecture they "
                        "were trained as") from None
    return net.eval(), head


def load_torchvision_classifier(src: ClassifierSource, num_classes: int,
                                device: torch.device) -> tuple[TorchvisionClassifier, dict[str, Any]]:
    """The classifier ``src`` names and its row provenance; each problem is one line, before any sampling."""
    arch, path = str(src.arch), Path(str(src.path))
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise CfgxError(f"eval.classifier.source: {arch!r} is not a torchvision classification model; e.g. "
                        "resnet50, vit_b_16, convnext_tiny (torchvision.models.list_models())")
    if not path.is_file():
        raise CfgxError(f"eval.classifier.source: weights file {path} not found; download it with cfgx prepare "
                        "resnet50 (or from torchvision's model page) and give its path")
    sd, digest = read_hashed_state_dict(path)  # one open file: the digest in the rows is of the weights used
    net, head = _build(arch, sd)
    classes = net.get_submodule(head).out_features
    if classes != num_classes:
        raise CfgxError(f"the {arch} classifier at {path} has {classes} classes but the reference set has "
                        f"{num_classes}; give one class folder per classifier class, in its class-index order")
    weights = _published_weights(arch, digest)
    clf = TorchvisionClassifier(net, head, weights.transforms()).to(device).eval()
    return clf, {"extractor_classifier": f"torchvision:{arch}:{path.name}@{digest[:12]} ({weights} transforms)",
                 "classifier_weights": digest}


def real_features(clf: TorchvisionClassifier, x: torch.Tensor, cache_root: str, console=None,
                  **identity: Any) -> dict[str, torch.Tensor]:
    """Features and logits of the reference images, cached like Inception's (``identity`` holds the weights'
    hash): a large network's pass over 10k reference images is worth keeping, unlike cfgx's own small one's."""
    cache = FeatureCache(cache_root)
    key = cache.key(**identity)
    with locked(cache.lock_path(key), f"real classifier features {cache.path(key)}", console):
        hit = cache.load(key)
        if hit is None or "clf_feats" not in hit:
            say(console, f"computing classifier features of {len(x)} real images (cached: {cache.path(key)})")
            feats, logits = classify(clf, x, next(clf.parameters()).device)
            hit = {"clf_feats": feats, "clf_logits": logits}
            cache.save(key, hit)
    return hit
