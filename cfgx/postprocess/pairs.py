"""Training pairs of the flow postprocessor: generated samples, each with a real same-class partner.

x̂ is drawn from the run at several guidance scales and paired with a uniformly random one of its
k nearest real samples *of the same class* (Zhao & Schwing 2025 draw among the k nearest to avoid
the bad local optimum of a deterministic nearest neighbour). Distances are in pixel space or in a
feature extractor's space. ``pairs.pt`` caches the pairs of a run: generation is the expensive part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfgx.console import say
from cfgx.data import to_uint8
from cfgx.data.base import DatasetBundle
from cfgx.errors import CfgxError
from cfgx.postprocess.settings import FlowSettings
from cfgx.sample import balanced_labels, decoded, generate, sample_shape
from cfgx.store.cached import load_or_make

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
PAIRS_NAME = "pairs.pt"


def features(x: torch.Tensor, feature_fn: FeatureFn | None, batch: int) -> torch.Tensor:
    """[N, F] float32 features: the flattened sample (pixel space) or ``feature_fn`` in batches."""
    if feature_fn is None:
        return x.reshape(len(x), -1).float()
    return torch.cat([feature_fn(x[i:i + batch]).reshape(min(batch, len(x) - i), -1).float().cpu()
                      for i in range(0, len(x), batch)])


def knn_indices(query: torch.Tensor, query_labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                k: int, generator: torch.Generator | None = None,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-class k nearest neighbours of each query row, and one drawn uniformly among them.

    ``query`` [N, F] and ``ref`` [M, F] are feature rows. Returns (chosen [N],
    topk [N, k']) as indices into ``ref``, where k' = min(k, smallest class size).
    Distances are computed ``chunk`` x ``chunk`` with a running top-k, so memory is
    O(chunk^2 + N k) whatever N and M are.
    """
    if k < 1:
        raise CfgxError(f"postprocess.k must be >= 1, got {k}")
    query_labels, ref_labels = query_labels.long().cpu(), ref_labels.long().cpu()
    classes = query_labels.unique().tolist()
    sizes = {c: int((ref_labels == c).sum()) for c in classes}
    empty = [c for c, n in sizes.items() if n == 0]
    if empty:
        raise CfgxError(f"no real samples of class(es) {empty} to pair generated samples with; the real "
                        "set must cover every generated label")
    kk = min(k, *sizes.values())
    topk = torch.empty(len(query), kk, dtype=torch.long)
    for c in classes:
        qi = (query_labels == c).nonzero().flatten()
        ri = (ref_labels == c).nonzero().flatten()
        rc = ref[ri].float()
        for qs in range(0, len(qi), chunk):
            q = query[qi[qs:qs + chunk]].float()
            best_d = torch.full((len(q), 0), math.inf)
            best_i = torch.empty(len(q), 0, dtype=torch.long)
            for rs in range(0, len(ri), chunk):
                # Direct differences, not the matmul expansion: the order then matches a brute-force oracle.
                d = torch.cdist(q, rc[rs:rs + chunk], compute_mode="donot_use_mm_for_euclid_dist")
                cand_d = torch.cat([best_d, d], 1)
                cand_i = torch.cat([best_i, torch.arange(rs, rs + d.shape[1]).expand(len(q), -1)], 1)
                best_d, pos = cand_d.topk(min(kk, cand_d.shape[1]), dim=1, largest=False)
                best_i = cand_i.gather(1, pos)
            topk[qi[qs:qs + chunk]] = ri[best_i]
    pick = torch.randint(0, kk, (len(query),), generator=generator)
    return topk.gather(1, pick[:, None]).squeeze(1), topk


def knn_targets(x_hat: torch.Tensor, labels: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor, k: int,
                generator: torch.Generator | None = None, feature_fn: FeatureFn | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """The real partner of each generated sample: uniform among its k nearest same-class real samples.

    Zhao & Schwing 2025 pair by nearest neighbours and draw randomly among the k
    nearest to avoid bad local optima. Distances are in pixel space
    (``feature_fn=None``) or in ``feature_fn``'s feature space (evaluation
    classifier, Inception). Returns real samples shaped like ``x_hat``.
    """
    idx = knn_target_indices(x_hat, labels, real_x, real_y, k, generator, feature_fn, chunk)
    return real_x[idx]


def knn_target_indices(x_hat: torch.Tensor, labels: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor,
                       k: int, generator: torch.Generator | None = None, feature_fn: FeatureFn | None = None,
                       chunk: int = 1024, real_feats: torch.Tensor | None = None) -> torch.Tensor:
    """Like ``knn_targets`` but returns indices into ``real_x``; ``real_feats`` skips re-featurising."""
    q = features(x_hat, feature_fn, chunk)
    r = real_feats if real_feats is not None else features(real_x, feature_fn, chunk)
    return knn_indices(q, labels, r, real_y, k, generator, chunk)[0]


def quantize(x: torch.Tensor, data: DatasetBundle) -> torch.Tensor:
    """Images as uint8 (what FID and PNGs see anyway): 4x less disk, identical on resume."""
    if not data.is_image:
        return x.float()
    return to_uint8(x)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


def load_or_make_pairs(pdir: Path, st: FlowSettings, data: DatasetBundle, model: nn.Module, sampler,
                       device: torch.device, real_x: torch.Tensor, real_y: torch.Tensor,
                       feature_fn: FeatureFn | None, console=None) -> dict[str, Any]:
    """``pdir/pairs.pt``, or the pairs generated and matched now (and cached there).

    The caller holds the postprocessor's lock. The blob holds ``x_hat`` (quantized), ``labels``,
    ``scales``, ``target_idx`` (into ``real_x``) and the seconds generation and matching took.
    """
    path = pdir / PAIRS_NAME

    def load(pairs: dict[str, Any]) -> dict[str, Any]:
        say(console, f"reusing {len(pairs['labels'])} generated pairs from {path}")
        return pairs

    def make() -> tuple[dict[str, Any], dict[str, Any]]:
        labels = balanced_labels(st.samples_per_scale, data.num_classes)
        xs, ys, ss = [], [], []
        gen_seconds = 0.0
        shape = sample_shape(model, data)  # an imported latent model: its own shape, decoded as in the sweep
        for i, s in enumerate(st.train_scales):
            # A seed per scale so the mixed set is not the same noise guided differently; and not the
            # sweep's eval.seed, so the postprocessor is never scored on its own training inputs.
            batch = generate(model, sampler, shape, labels, s, st.pair_seed + 7919 * i, st.pair_batch_size, device)
            x, t_dec = decoded(model, batch.x)
            gen_seconds += batch.seconds + t_dec
            xs.append(quantize(x, data))
            ys.append(batch.y)
            ss.append(torch.full((len(batch.y),), s))
            say(console, f"generated {len(batch.y)} samples at s={s:g} ({batch.seconds:.1f}s)")
        x_hat_q, y_all, s_all = torch.cat(xs), torch.cat(ys), torch.cat(ss)
        t_knn = time.perf_counter()
        real_feats = features(real_x, feature_fn, 1024)
        g = torch.Generator().manual_seed(st.pair_seed)
        idx = knn_target_indices(dequantize(x_hat_q), y_all, real_x, real_y, st.k, g, feature_fn,
                                 real_feats=real_feats)
        pairs = {"x_hat": x_hat_q, "labels": y_all, "scales": s_all, "target_idx": idx,
                 "gen_seconds": round(gen_seconds, 3), "knn_seconds": round(time.perf_counter() - t_knn, 3)}
        say(console, f"paired {len(y_all)} samples with same-class {st.given['nn_space']} {st.given['k']}-NN "
                     f"real samples ({pairs['knn_seconds']:.1f}s)")
        return pairs, pairs

    return load_or_make(path, load, make, console=console, fix="delete it to restart training from scratch")
