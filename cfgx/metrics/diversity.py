"""Fidelity/diversity metrics on feature vectors, which no library we depend on provides.

- improved precision / recall (Kynkäänniemi et al. 2019),
- density / coverage (Naeem et al. 2020),
- Vendi score (Friedman & Dieng 2023),
- mean within-class pairwise distance.

All k-NN and cross-distance work runs in ``chunk_size`` x ``chunk_size`` blocks,
so 50k x 50k distance matrices never exist; memory is O(chunk_size^2 + N k).
Distances are computed in float64 because these metrics compare distances to
radii, and float32 Gram-trick distances in 2048-d flip those comparisons.
Inputs stay on their device (pass CUDA tensors to run there).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cfgx.errors import CfgxError

DEFAULT_CHUNK = 1024


def as_features(x: torch.Tensor, what: str, min_rows: int = 1) -> torch.Tensor:
    """``x`` as a float64 ``[N, D]`` feature matrix of at least ``min_rows`` finite rows, else a one-line error.

    The input check of every feature metric (these and cfgx.metrics.standard's FID/KID).
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise CfgxError(
            f"{what} must be a [N, D] feature matrix, got shape {tuple(x.shape)}: flatten to [N, D]"
        )
    if x.shape[0] < min_rows:
        raise CfgxError(f"{what} needs at least {min_rows} samples, got {x.shape[0]}: evaluate more samples")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise CfgxError(f"{what} contains NaN or inf: check the images fed to the feature extractor")
    return x


def _check_pair(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k < 1:
        raise CfgxError(f"nearest-neighbour k must be >= 1, got {k}: set a positive k")
    x = as_features(real, "real features", k + 1)
    y = as_features(fake, "fake features", k + 1)
    if x.shape[1] != y.shape[1]:
        raise CfgxError(
            f"real and fake feature dims differ ({x.shape[1]} vs {y.shape[1]}): use one extractor for both"
        )
    return x, y.to(x.device)


def _blocks(
    a: torch.Tensor, b: torch.Tensor, chunk_size: int
) -> Iterator[tuple[int, int, Iterator[tuple[int, torch.Tensor]]]]:
    """For each row block of ``a``: (start, end, iterator of (col start, distance block to ``b``))."""
    if chunk_size < 1:
        raise CfgxError(f"chunk_size must be >= 1, got {chunk_size}: set a positive chunk size")
    for i in range(0, a.shape[0], chunk_size):
        rows = a[i : i + chunk_size]

        def cols(rows: torch.Tensor = rows) -> Iterator[tuple[int, torch.Tensor]]:
            for j in range(0, b.shape[0], chunk_size):
                yield j, torch.cdist(rows, b[j : j + chunk_size])

        yield i, i + rows.shape[0], cols()


def knn_radii(feats: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point (float64, ``[N]``).

    Taken as the (k+1)-th smallest distance including the point itself, as the
    reference implementations of both Kynkäänniemi et al. and Naeem et al. do
    (an exact duplicate therefore counts as a neighbour at distance 0).
    """
    x = as_features(feats, "features", k + 1)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i0, i1, cols in _blocks(x, x, chunk_size):
        best = torch.empty(i1 - i0, 0, dtype=torch.float64, device=x.device)
        for _, d in cols:
            # Running top-(k+1): merge this block's candidates with the best so far.
            merged = torch.cat([best, d], dim=1)
            best = merged.topk(min(k + 1, merged.shape[1]), dim=1, largest=False).values
        out[i0:i1] = best[:, k]
    return out


def _ball_counts(
    queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk_size: int, strict: bool
) -> torch.Tensor:
    """For each query, how many balls ``B(centers[j], radii[j])`` contain it."""
    counts = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    for i0, i1, cols in _blocks(queries, centers, chunk_size):
        for j0, d in cols:
            r = radii[j0 : j0 + d.shape[1]].unsqueeze(0)
            inside = d < r if strict else d <= r
            counts[i0:i1] += inside.sum(dim=1)
    return counts


def _nearest_distance(queries: torch.Tensor, refs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    out = torch.empty(queries.shape[0], dtype=torch.float64, device=queries.device)
    for i0, i1, cols in _blocks(queries, refs, chunk_size):
        # amin, not min(dim=): the latter also computes indices and costs ~10 ms per call on CPU.
        out[i0:i1] = torch.stack([d.amin(dim=1) for _, d in cols], dim=1).amin(dim=1)
    return out


def improved_precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk_size: int = DEFAULT_CHUNK
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and
    Recall Metric for Assessing Generative Models").

    Each set's manifold is the union of balls around its points with radius the
    distance to the k-th nearest neighbour. Precision: fraction of fake samples
    inside the real manifold; recall: fraction of real samples inside the fake
    manifold. Boundary counts as inside (``<=``), as in the authors' code.
    """
    x, y = _check_pair(real, fake, k)
    r_real = knn_radii(x, k, chunk_size)
    r_fake = knn_radii(y, k, chunk_size)
    precision = (_ball_counts(y, x, r_real, chunk_size, strict=False) > 0).double().mean()
    recall = (_ball_counts(x, y, r_fake, chunk_size, strict=False) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk_size: int = DEFAULT_CHUNK
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
    for Generative Models").

    With real k-NN balls ``B(x_i, r_i)``: density = ``sum_j #{i: y_j in B_i} / (k M)``
    (can exceed 1), coverage = fraction of real ``x_i`` whose ball holds at least one
    fake sample, i.e. whose nearest fake lies within ``r_i``. Strict ``<``, as in the
    authors' ``prdc`` code. Only real balls are used, so a few fake outliers cannot
    inflate either number the way they inflate recall.
    """
    x, y = _check_pair(real, fake, k)
    r_real = knn_radii(x, k, chunk_size)
    density = _ball_counts(y, x, r_real, chunk_size, strict=True).sum().double() / (k * y.shape[0])
    coverage = (_nearest_distance(x, y, chunk_size) < r_real).double().mean()
    return float(density), float(coverage)


def vendi_score(feats: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric
    for Machine Learning"), order 1, cosine-similarity kernel.

    ``exp(-sum_i l_i log l_i)`` over the eigenvalues ``l_i`` of ``K / n`` with
    ``K = X X^T`` on L2-normalised rows. ``X X^T / n`` and ``X^T X / n`` share their
    nonzero eigenvalues, so the smaller of the (n x n) and (d x d) Gram matrices is
    used: 50k samples of 2048-d features cost one 2048 x 2048 eigendecomposition.
    Ranges from 1 (all samples identical) to min(n, d) (mutually orthogonal).
    """
    x = as_features(feats, "features", 1)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise CfgxError(
            "Vendi score got an all-zero feature vector (cosine similarity undefined): "
            "check the extractor output"
        )
    x = x / norms
    n, d = x.shape
    gram = (x @ x.T) if n <= d else (x.T @ x)
    lam = torch.linalg.eigvalsh(gram / n).clamp(min=0)
    lam = lam[lam > 0]
    entropy = -(lam * lam.log()).sum()
    return float(entropy.exp())


def within_class_pairwise_distance(
    feats: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> float:
    """Mean Euclidean distance between distinct pairs of samples of the same class,
    averaged over classes with equal weight.

    A per-class diversity measure for conditional generation: strong guidance
    collapses samples of a class together, which this shows while class-agnostic
    metrics can stay flat. Classes with fewer than 2 samples are skipped; NaN if
    no class has 2.
    """
    x = as_features(feats, "features", 1)
    labels = torch.as_tensor(labels).to(x.device).flatten()
    if labels.shape[0] != x.shape[0]:
        raise CfgxError(
            f"labels ({labels.shape[0]}) and features ({x.shape[0]}) differ in length: "
            "pass one label per sample"
        )
    per_class = []
    for c in torch.unique(labels):
        xc = x[labels == c]
        n = xc.shape[0]
        if n < 2:
            continue
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i0, _, cols in _blocks(xc, xc, chunk_size):
            for j0, d in cols:
                if i0 == j0:
                    # Gram-trick cdist leaves ~1e-8 instead of 0 on the diagonal.
                    d.fill_diagonal_(0)
                total += d.sum()
        # The diagonal is zero, so the full-matrix sum counts each pair twice.
        per_class.append(total / (n * (n - 1)))
    if not per_class:
        return float("nan")
    return float(torch.stack(per_class).mean())
