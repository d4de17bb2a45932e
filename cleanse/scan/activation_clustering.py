"""Activation clustering (Chen et al. 2018): a poisoned class splits into two clusters, one small.

Per class: project the centred features onto their top `dims` principal
components (the paper uses ICA to 10 dimensions; PCA is our deterministic
stand-in), split them with 2-means, and call the smaller cluster suspicious when
its share is below `max_share` (0.35 in the paper). The score of a sample is
1 - its cluster's share when that cluster is the suspicious one, scaled by how
much closer it sits to its own centroid than to the other (so the ranking is
continuous), and 0 otherwise.
"""

from __future__ import annotations

import torch


def two_means(points: torch.Tensor, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Cluster labels (0/1) from Lloyd's algorithm, seeded by the two points farthest apart along the top component."""
    first = points[:, 0]
    centres = torch.stack([points[first.argmin()], points[first.argmax()]])
    assign = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, assign) and _ > 0:
            break
        assign = new
        for j in range(2):
            if (assign == j).any():
                centres[j] = points[assign == j].mean(0)
    return assign


def clustering_scores(
    features: torch.Tensor, labels: torch.Tensor, dims: int = 10, max_share: float = 0.35
) -> tuple[torch.Tensor, dict[int, float]]:
    """Per-sample suspicion scores and, per class, the share of its smaller cluster."""
    scores = torch.zeros(len(features))
    shares: dict[int, float] = {}
    feats = features.double()
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().flatten()
        if len(rows) < 4:
            continue
        centred = feats[rows] - feats[rows].mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ vh[: min(dims, vh.shape[0])].T
        assign = two_means(points)
        sizes = torch.bincount(assign, minlength=2)
        small = int(sizes.argmin())
        share = float(sizes[small]) / len(rows)
        shares[int(cls)] = share
        if share >= max_share or sizes[small] == 0:
            continue
        centres = torch.stack([points[assign == j].mean(0) for j in range(2)])
        dist = torch.cdist(points, centres)
        margin = (dist[:, 1 - small] - dist[:, small]) / (
            dist.sum(1) + 1e-12
        )  # in (-1, 1): >0 closer to the small cluster
        in_small = assign == small
        scores[rows[in_small]] = ((1 - share) * (1 + margin[in_small]) / 2).float()
    return scores, shares
