"""Spectral signatures (Tran et al. 2018): poisoned samples stand out along the top singular vector of a class's
features. A comparison ranking of the data audit; the flagged set comes from the per-class tests
(cleanse/scan/activation_clustering.py).

Per class c with features R_c (n_c, D): centre them and take the top right singular vector v of the centred matrix;
p_i = (r_i - mean) . v. The paper flags the 1.5 * eps * n_c samples with the largest p_i^2 per class. To rank all
samples of all classes in one list we score them as a one-sided robust z-score (our choice): orient v so that the
projections are right-skewed (the minority cluster lies in the long tail), then z_i = (p_i - median) / (1.4826 * MAD).
Dividing p_i^2 by the class mean instead let the chi-square tails of clean classes outrank the poisoned samples
(docs/commands/scan.md, "Data audit"). Inside a class the direction does separate a poison that is half of it (the
kept CIFAR-10 BadNets model: the top 5,000 of class 0 are 99.2% poisoned), but across classes the z-score does not:
with the poison at half the class, the median sits between the two groups and the MAD is inflated, so clean rows of
other classes outrank poisoned ones (precision 0.744 at k there; issue 32).
"""

from __future__ import annotations

import torch

from cleanse.scan.anomaly import MAD_SCALE


def spectral_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scores = torch.zeros(len(features))
    feats = features.double()
    for cls in labels.unique():
        rows = (labels == cls).nonzero().flatten()
        if len(rows) < 3:
            continue
        centred = feats[rows] - feats[rows].mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        p = centred @ vh[0]
        if (p - p.mean()).pow(3).mean() < 0:  # orient the long tail to the positive side
            p = -p
        median = p.median()
        mad = MAD_SCALE * (p - median).abs().median()
        scores[rows] = ((p - median) / mad.clamp_min(1e-12)).float()
    return scores
