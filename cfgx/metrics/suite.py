"""The evaluation suite: the real side prepared once, then every metric for a set of samples.

Feature spaces (``eval.features``):
- ``classifier``: the evaluation classifier (``eval.classifier.source``: cfgx's own, a torchvision
  network, or none: :mod:`cfgx.metrics.torchvision_classifier`). Accuracy, Fréchet distance in
  its features, within-class diversity, decision-boundary statistics.
- ``inception``: the FID InceptionV3, one forward pass per image for FID, IS, KID and
  precision/recall/density/coverage/Vendi.
- ``dinov2``: DINOv2 ViT-L/14 CLS features (EDM2's protocol, :mod:`cfgx.metrics.dinov2`) for
  ``fd_dinov2``; with ``eval.dinov2_pr=true`` also precision/recall/density/coverage/Vendi there
  (columns suffixed ``_dinov2``).
``auto`` picks classifier only for 8x8 digits and the toys (Inception features of
8 px images mean little) and both spaces elsewhere.

Precision/recall, density/coverage and Vendi are computed in the *primary* space:
Inception when it is on, else the classifier, else DINOv2; the ``feature_space`` column says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cfgx import distributed
from cfgx.console import say
from cfgx.data import DatasetBundle, stack_dataset, to_uint8
from cfgx.errors import CfgxError
from cfgx.metrics.classifier import boundary_stats, classifier_metrics
from cfgx.metrics.dinov2 import dinov2_extractor, real_dinov2_features, resolve_dinov2_path
from cfgx.metrics.diversity import (
    density_coverage,
    improved_precision_recall,
    vendi_score,
    within_class_pairwise_distance,
)
from cfgx.metrics.eval_classifier import build_eval_classifier, classify, get_eval_classifier
from cfgx.metrics.feature_cache import FeatureCache
from cfgx.metrics.inception import FeatureExtractor
from cfgx.metrics.reference import load_reference
from cfgx.metrics.sfid import sfid_from_features
from cfgx.metrics.standard import fid_from_features, inception_score_from_logits, kid_from_features
from cfgx.metrics.torchvision_classifier import (
    CLASSIFIER_COLUMNS,
    NOTE,
    ClassifierSource,
    TorchvisionClassifier,
    load_torchvision_classifier,
    parse_source,
    real_features,
)
from cfgx.store.locks import locked

INCEPTION_DIM = 2048
NO_INCEPTION = ("digits", "gmm1d", "gmm2d")


def resolve_feature_spaces(features: Any, data: DatasetBundle) -> list[str]:
    if features in (None, "auto"):
        return ["classifier"] if data.name in NO_INCEPTION or not data.is_image else ["classifier", "inception"]
    spaces = [features] if isinstance(features, str) else list(features)
    for s in spaces:
        if s not in ("classifier", "inception", "dinov2"):
            raise CfgxError(f"eval.features has {s!r}; valid: classifier, inception, dinov2 (or auto)")
    if {"inception", "dinov2"} & set(spaces) and not data.is_image:
        raise CfgxError(f"eval.features={spaces} needs images, {data.name!r} is not an image dataset; "
                        "use eval.features=[classifier]")
    return ["classifier"] + [s for s in spaces if s != "classifier"]


@dataclass(frozen=True)
class MetricSettings:
    """What the metrics read of a config (eval.*, the cache, the dataset's identity), read once."""

    features: Any
    boundary_delta: float
    pr_k: int
    dc_k: int
    kid_subsets: int
    kid_subset_size: int
    real_samples: int | None   # None: eval.real_samples=all, the whole split
    real_split: str
    inception_weights: str | None
    inception_batch_size: int | str
    classifier: dict[str, Any]
    dataset: dict[str, Any]
    cache: str
    reference: str | None = None
    dinov2_weights: str | None = None
    dinov2_pr: bool = False
    save_npz: bool = False
    classifier_source: ClassifierSource = ClassifierSource("own")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MetricSettings:
        ec = cfg.eval
        ccfg = OmegaConf.to_container(ec.classifier, resolve=True)
        source = parse_source(ccfg.pop("source", None), OmegaConf.select(cfg, "backbone.name") == "pretrained")
        return cls(OmegaConf.to_container(ec, resolve=True)["features"], float(ec.boundary_delta), int(ec.pr_k),
                   int(ec.dc_k), int(ec.kid_subsets), int(ec.kid_subset_size),
                   None if str(ec.real_samples) == "all" else int(ec.real_samples),
                   str(ec.real_split), ec.inception_weights, ec.inception_batch_size,
                   ccfg,
                   OmegaConf.to_container(cfg.dataset, resolve=True), str(cfg.paths.cache), ec.get("reference"),
                   ec.get("dinov2_weights"), bool(ec.get("dinov2_pr", False)),
                   bool(ec.get("save_npz", False)), source)


class EvalSuite:
    """Holds the evaluation classifier, the Inception extractor and the real-side features."""

    def __init__(self, cfg: DictConfig, data: DatasetBundle, device: torch.device, console=None) -> None:
        opt = MetricSettings.from_config(cfg)
        self.data, self.device, self.console = data, device, console
        self.spaces = resolve_feature_spaces(opt.features, data)
        self.no_clf = data.is_image and opt.classifier_source.kind == "none"
        if self.no_clf:
            self.spaces = [s for s in self.spaces if s != "classifier"]
            if not self.spaces:
                raise CfgxError(f"eval.features={opt.features} with eval.classifier.source=none leaves nothing to "
                                "measure; add eval.features=[inception] (or dinov2), or name a classifier: "
                                "eval.classifier.source=torchvision:ARCH:PATH")
        if "dinov2" in self.spaces:
            resolve_dinov2_path(opt.dinov2_weights)  # offline without the file: say so before any work
        # Read (and refused if wrong) before any work: the evaluation classifier trains for minutes.
        self.ref = load_reference(opt.reference)
        if self.ref is not None and "inception" not in self.spaces and {"fid", "sfid"} & set(self.ref.stats):
            raise CfgxError(f"eval.reference={self.ref.kind}:{self.ref.path} holds Inception statistics, but "
                            "Inception is off: add eval.features=[classifier,inception]")
        self.delta, self.pr_k, self.dc_k = opt.boundary_delta, opt.pr_k, opt.dc_k
        self.kid_subsets, self.kid_subset_size = opt.kid_subsets, opt.kid_subset_size
        n_real = opt.real_samples
        self.split = opt.real_split
        if self.split not in ("train", "test"):
            raise CfgxError(f"eval.real_split={self.split!r}; valid: train, test")
        if self.split == "test" and data.test is None:
            raise CfgxError(f"{data.name} has no test split; use eval.real_split=train (or give the "
                            "image folder a dataset.test_root)")
        real_x, real_y = stack_dataset(data.train if self.split == "train" else data.test)
        if n_real is not None and len(real_y) > n_real:  # a fixed, seeded subset, the same for every run
            idx = torch.randperm(len(real_y), generator=torch.Generator().manual_seed(0))[:n_real]
            real_x, real_y = real_x[idx], real_y[idx]
        self.n_real = len(real_y)
        self.real_y = real_y
        self.info: dict[str, Any] = {"real_reference": f"{data.name}:{self.split} ({self.n_real})"}

        if self.no_clf:
            self.clf = None
            self.info.update({"extractor_classifier": "none", "eval_classifier_acc": None, "classifier_note": NOTE})
        elif data.is_image and opt.classifier_source.kind == "torchvision":
            self.clf, tv_info = load_torchvision_classifier(opt.classifier_source, data.num_classes, device)
            self.info.update(tv_info)
        elif data.is_image:
            self.clf, clf_info = _shared_eval_classifier(data, opt.dataset, opt.classifier, opt.cache, device, console)
            self.info.update({"extractor_classifier": f"eval_classifier:{clf_info['key']}",
                              "eval_classifier_acc": round(clf_info["held_out_accuracy"], 4)})
        else:  # toys: the exact clean posterior is the ideal classifier, raw coordinates the features
            self.clf = None
            self.info.update({"extractor_classifier": "exact_posterior", "eval_classifier_acc": None})
        # Only rank 0 scores, so only it needs the real side (the small classifier's pass is not worth sharding).
        self.real = self._real_classifier_side(real_x, opt) if distributed.is_main() else {}

        self.inception = None
        if "inception" in self.spaces:
            self._prepare_inception(opt, real_x)
        self.dinov2, self.dinov2_pr, self.save_npz = None, opt.dinov2_pr, opt.save_npz and data.is_image
        if "dinov2" in self.spaces:
            self.dinov2 = dinov2_extractor(opt.dinov2_weights, device=device, batch_size=64)
            prov = self.dinov2.provenance()
            self.info.update({"extractor_dinov2": prov["extractor"], "dinov2_weights": prov["weights_sha256"]})
            if distributed.is_main():
                self.real["dino_cls"] = real_dinov2_features(
                    self.dinov2, to_uint8(real_x), opt.cache, console, dataset=data.name, split=self.split,
                    resolution=data.resolution, channels=data.channels, n_real=self.n_real, subset_seed=0,
                    root=str(opt.dataset.get("root")))
        if self.ref is not None:
            self._use_reference()

    def _use_reference(self) -> None:
        """Stored statistics for the Fréchet distances; the file's images (if any) for PR/KID."""
        self.info["reference"] = self.ref.describe()
        if self.ref.images is not None and self.inception is not None and distributed.is_main():
            f = self.inception(self.ref.images)
            self.real["inc_pool"], self.real["inc_spatial"] = f.pool, f.spatial
            self.info["real_reference_inception"] = f"{self.ref.kind} arr_0 ({len(self.ref.images)})"
        if self.ref.images is not None and self.dinov2 is not None and distributed.is_main():
            self.real["dino_cls"] = self.dinov2(self.ref.images).pool

    def settings_hash(self) -> str:
        """Short hash of everything besides the samples that a row's numbers depend on."""
        parts = {"spaces": self.spaces, "split": self.split, "n_real": self.n_real, "delta": self.delta,
                 "pr_k": self.pr_k, "dc_k": self.dc_k, "kid": [self.kid_subsets, self.kid_subset_size],
                 "extractors": {k: v for k, v in self.info.items() if k != "eval_classifier_acc"}}
        if self.dinov2_pr:
            parts["dinov2_pr"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:6]

    def covers(self, feats: dict[str, torch.Tensor]) -> bool:
        """Whether stored sample features hold every space this suite scores (sFID's may be absent: old files)."""
        need = (set() if self.no_clf else {"clf_feats"}) | ({"inc_pool"} if self.inception is not None else set())
        need |= {"dino_cls"} if self.dinov2 is not None else set()
        return need | ({"samples_u8"} if self.save_npz else set()) <= set(feats)

    # ------------------------------------------------------------------ features

    def _real_classifier_side(self, real_x: torch.Tensor, opt: MetricSettings) -> dict[str, torch.Tensor]:
        if not isinstance(self.clf, TorchvisionClassifier):
            return self._classifier_features(real_x)
        real = real_features(self.clf, real_x, opt.cache, self.console, dataset=self.data.name, split=self.split,
                             n_real=self.n_real, subset_seed=0, root=str(opt.dataset.get("root")),
                             resolution=self.data.resolution, extractor=self.info["extractor_classifier"],
                             weights=self.info["classifier_weights"])
        # Its accuracy on the reference images: the ceiling matched-accuracy comparisons are read against.
        self.info["eval_classifier_acc"] = round(float((real["clf_logits"].argmax(1) == self.real_y).float().mean()), 4)
        return real

    def _classifier_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.no_clf:
            return {}
        if self.clf is None:
            mixture = self.data.extra["mixture"]
            logits = mixture.class_log_posterior(x.double(), 1.0).float()
            return {"clf_feats": x.float().reshape(len(x), -1), "clf_logits": logits}
        feats, logits = classify(self.clf, x, self.device)
        return {"clf_feats": feats, "clf_logits": logits}

    def _prepare_inception(self, opt: MetricSettings, real_x: torch.Tensor) -> None:
        weights, bs = opt.inception_weights, opt.inception_batch_size
        if bs == "auto":  # 16 is the fastest on CPU (cache-sized activations); GPUs want big batches
            bs = 16 if self.device.type == "cpu" else 128
        self.inception = FeatureExtractor.inception(weights, device=self.device, batch_size=int(bs))
        prov = self.inception.provenance()
        self.info.update({"extractor_inception": prov["extractor"], "inception_weights": prov["weights_sha256"]})
        cache = FeatureCache(opt.cache)
        key = cache.key(dataset=self.data.name, split=self.split, resolution=self.data.resolution,
                        channels=self.data.channels, n_real=self.n_real, subset_seed=0,
                        root=str(opt.dataset.get("root")), **prov)
        # Rank 0 holds the cache entry's lock (so concurrent runs compute it once); the other ranks
        # only take part in the sharded computation, so they must not wait on the lock themselves.
        lock = (locked(cache.lock_path(key), f"real Inception features {cache.path(key)}", self.console)
                if distributed.is_main() else contextlib.nullcontext())
        with lock:
            hit = cache.load(key) if distributed.is_main() else None
            hit = hit if hit is None or "spatial" in hit else None  # an entry from before sFID: upgraded in place
            if not distributed.broadcast_object(hit is not None):
                say(self.console, f"computing Inception features of {self.n_real} real images (cached for every "
                                  f"run and scale: {cache.path(key)})")
                hit = self._sharded_inception_pool(real_x)
                if hit is not None:
                    cache.save(key, hit)
        if hit is not None:
            self.real["inc_pool"], self.real["inc_spatial"] = hit["pool"], hit["spatial"]

    def _sharded_inception_pool(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Inception pool3 and sFID features of ``x``, chunks over the ranks; on rank 0, None elsewhere.

        Chunks are whole multiples of the extractor's batch, so each image sees the same
        batches as in one process and the features match it exactly.
        """
        chunk = 16 * self.inception.batch_size
        local = {k: self.inception(to_uint8(x[k * chunk:(k + 1) * chunk]))
                 for k in distributed.my_share(math.ceil(len(x) / chunk))}
        parts = distributed.gather_by_index(local)
        return None if parts is None else {"pool": torch.cat([f.pool for f in parts]),
                                           "spatial": torch.cat([f.spatial for f in parts])}

    def features_in(self, space: str, x: torch.Tensor) -> torch.Tensor:
        """Features of one space only ("classifier" or "inception"), e.g. for nearest neighbours."""
        if space == "classifier":
            if self.no_clf:
                raise CfgxError(f"the classifier feature space needs an evaluation classifier; {NOTE}")
            return self._classifier_features(x)["clf_feats"]
        if space == "dinov2":
            return self.dinov2(to_uint8(x)).pool
        return self.inception(to_uint8(x)).pool

    def extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every feature the metrics need, one forward pass per image per extractor."""
        out = self._classifier_features(x)
        if self.inception is not None:
            f = self.inception(to_uint8(x))
            out["inc_pool"] = f.pool
            if f.logits is not None:
                out["inc_logits"] = f.logits
            if f.spatial is not None:
                out["inc_spatial"] = f.spatial
        if self.dinov2 is not None:
            out["dino_cls"] = self.dinov2(to_uint8(x)).pool
        if self.save_npz:  # kept with the features, so an ADM-format .npz can be written without resampling
            out["samples_u8"] = to_uint8(x).cpu()
        return out

    # ------------------------------------------------------------------ metrics

    def score(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
        n = len(labels)
        row: dict[str, Any] = {}
        if "clf_feats" in feats:
            row.update(classifier_metrics(feats["clf_feats"], feats["clf_logits"], labels, self.real["clf_feats"],
                                          self.delta))
            row["near_boundary_delta"] = self.delta
        else:  # no classifier: its columns stay, empty (classifier_note says why)
            row.update(dict.fromkeys(CLASSIFIER_COLUMNS))
        primary = next(k for k in ("inc_pool", "clf_feats", "dino_cls") if k in feats)
        row["feature_space"] = {"inc_pool": "inception", "clf_feats": "classifier", "dino_cls": "dinov2"}[primary]
        real_p, fake_p = self.real[primary], feats[primary]
        row["precision"], row["recall"] = improved_precision_recall(real_p, fake_p, k=self.pr_k)
        row["density"], row["coverage"] = density_coverage(real_p, fake_p, k=self.dc_k)
        row["vendi"] = vendi_score(fake_p)
        if "inc_pool" in feats:
            row["fid"] = fid_from_features(self.real["inc_pool"], feats["inc_pool"])
            row["fid_comparable"] = n >= INCEPTION_DIM
            # sFID: absent from features files written before it existed (eval.overwrite=true recomputes)
            row["sfid"] = (sfid_from_features(self.real["inc_spatial"], feats["inc_spatial"])
                           if "inc_spatial" in feats and "inc_spatial" in self.real else None)
            kid = kid_from_features(self.real["inc_pool"], feats["inc_pool"], subsets=self.kid_subsets,
                                    subset_size=self.kid_subset_size)
            row["kid_mean"], row["kid_std"] = kid
            is_mean, is_std = inception_score_from_logits(feats.get("inc_logits"), splits=10)
            row["is_mean"] = None if math.isnan(is_mean) else is_mean
            row["is_std"] = None if math.isnan(is_std) else is_std
            row["is_available"] = row["is_mean"] is not None
            row["diversity_within_class_inception"] = within_class_pairwise_distance(feats["inc_pool"], labels)
        if "dino_cls" in feats:
            self._score_dinov2(row, feats["dino_cls"])
        if self.ref is not None:  # stored statistics replace the reference side of the distances they cover
            for column, key in (("fid", "inc_pool"), ("sfid", "inc_spatial"), ("fd_dinov2", "dino_cls")):
                if key in feats and column in self.ref.stats:
                    row[column] = self.ref.frechet(column, feats[key])
        self._per_class(row, feats, labels)
        return row

    def _score_dinov2(self, row: dict[str, Any], fake: torch.Tensor) -> None:
        real = self.real["dino_cls"]
        row["fd_dinov2"] = fid_from_features(real, fake)
        if self.dinov2_pr:
            row["precision_dinov2"], row["recall_dinov2"] = improved_precision_recall(real, fake, k=self.pr_k)
            row["density_dinov2"], row["coverage_dinov2"] = density_coverage(real, fake, k=self.dc_k)
            row["vendi_dinov2"] = vendi_score(fake)

    def _per_class(self, row: dict[str, Any], feats: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = len(labels)
        if "clf_feats" not in feats:
            return
        # Per-class Fréchet distance needs more samples per class than feature dimensions.
        dim = feats["clf_feats"].shape[1]
        per_class = n // max(self.data.num_classes, 1)
        if per_class > dim:
            real_y = self.real_y
            vals = [fid_from_features(self.real["clf_feats"][real_y == c], feats["clf_feats"][labels == c])
                    for c in range(self.data.num_classes) if int((real_y == c).sum()) > dim]
            row["fd_classifier_per_class"] = sum(vals) / len(vals) if vals else None


def _shared_eval_classifier(data: DatasetBundle, dcfg: dict, ccfg: dict, cache_root: str, device: torch.device,
                            console=None):
    """The evaluation classifier, the same on every rank.

    Rank 0 loads it from the cache or trains it; the others receive its weights by
    broadcast, so no rank trains its own copy (which on a GPU need not come out
    bit-identical) and nodes need no shared cache folder.
    """
    if not distributed.active():
        return get_eval_classifier(data, dcfg, ccfg, cache_root, device, console)
    payload = None
    if distributed.is_main():
        clf, info = get_eval_classifier(data, dcfg, ccfg, cache_root, device, console)
        payload = ({k: v.cpu() for k, v in clf.state_dict().items()}, info)
    state, info = distributed.broadcast_object(payload)
    if distributed.is_main():
        return clf, info
    model = build_eval_classifier(data, ccfg)  # the architecture eval.classifier.arch names, as on rank 0
    model.load_state_dict(state)
    return model.to(device).eval(), info


__all__ = ["EvalSuite", "resolve_feature_spaces", "boundary_stats"]
