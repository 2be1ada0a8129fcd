"""Metrics read off the evaluation classifier, per guidance scale.

- class accuracy of samples against their requested label;
- Fréchet distance in the classifier's feature space (the primary quality figure
  where Inception makes little sense, e.g. 8x8 digits);
- within-class diversity (mean pairwise feature distance);
- decision-boundary statistics (Zhao & Schwing 2025): mean max-softmax
  confidence, entropy, logit margin (top-1 minus top-2) and the fraction of
  samples within ``delta`` of the boundary. Guidance should raise the margin and
  lower the near-boundary fraction.
"""

from __future__ import annotations

import torch

from cfgx.metrics.diversity import within_class_pairwise_distance
from cfgx.metrics.standard import fid_from_features


def boundary_stats(logits: torch.Tensor, delta: float = 1.0) -> dict[str, float]:
    logits = logits.double()
    p = logits.softmax(-1)
    top2 = logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return {"confidence": float(p.max(-1).values.mean()), "entropy": float(entropy.mean()),
            "margin": float(margin.mean()), "near_boundary": float((margin < delta).double().mean())}


def classifier_metrics(feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                       real_feats: torch.Tensor, delta: float = 1.0) -> dict[str, float]:
    """All classifier-space metrics for one set of samples with requested ``labels``."""
    out = {"accuracy": float((logits.argmax(-1) == labels).double().mean()),
           "fd_classifier": fid_from_features(real_feats, feats),
           "diversity_within_class": within_class_pairwise_distance(feats, labels)}
    out.update(boundary_stats(logits, delta))
    return out
