"""Per-class decision of the data audit: is a class's set of penultimate features split in two, and which part is
the poison?

Activation clustering (Chen et al. 2018, arXiv:1811.03728) clusters each class's penultimate activations in two and
calls the smaller cluster poison when it holds under 35% of its class. That rule throws the poison away exactly when
it is the larger part of its class (all-to-one poisoning at 10% of a 10-class set makes the target class half
poison), and ART's variant (the smaller cluster, always) also flags half of every clean class. Here the class-level
decision and the choice of the poisoned side are separate tests, neither of which looks at cluster sizes
(docs/commands/scan.md, "Data audit", gives the formulas and the measurements behind each constant):

1. **Split.** The class's centred features are projected on their top d principal directions
   (d = min(32, n // 20)). 2-means on the top 10 of them, 1-D 2-means along each of those 10 alone, and the top and
   bottom 15% of the class along each of those 10, start a
   discriminant refinement (LDA-k-means, Ding & Li, ICML 2007): Fisher's direction w = S_w^-1 (m_1 - m_0) of the
   current two clusters, then 2-means on the projections p = z . w, until the assignment stops changing (at most 20
   rounds). A split passes when its separation |mean_1 - mean_0| / pooled within-cluster sd along w is >= 6.0 and a
   valley separates the clusters (the rows near the midpoint are at most 0.3 x those near the emptier cluster's
   mean); a side under max(5, 1% of the class) rows does not count. Of the passing splits the one that explains
   the most variance is kept (the class is flagged), else the best-separated one is reported.
2. **Which cluster is the poison.** The one *farther from the other classes along w*: the direction that separates
   the two clusters is the trigger's, the rows of the other classes carry no trigger, so along w they sit with the
   clean cluster. This does not depend on which cluster is larger.
3. **Collapse.** A class whose rows all carry the trigger (clean-label SIG that takes every image of its class) has
   no clean cluster to split from, but the trigger pulls all its features together: the class is flagged whole when
   its spread (median distance to its mean) is under half the median spread of the other classes, or when it is
   split but the side a split would keep is that collapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SEPARATION_THRESHOLD = 6.0  # flag a class whose split separates at least this much (5.5 before the tail starts)
VALLEY_THRESHOLD = 0.3  # and whose density between the two clusters is at most this share of theirs
VALLEY_WINDOW = 0.1  # the density windows: +-0.1 x the distance between the two cluster means
COLLAPSE_RATIO = 0.5  # flag a whole class whose spread is under this share of the other classes' median spread
MAX_DIMS = 32  # principal directions the split works in
ROWS_PER_DIM = 20  # and at most one per this many rows of the class (the statistic's null grows with d / n)
INIT_DIMS = 10  # 2-means on this many top principal directions starts the refinement (Chen et al. reduce to 10)
ROUNDS = 20  # discriminant refinement rounds at most
RIDGE = 1e-3  # S_w + RIDGE * trace(S_w) / d * I: a well-posed solve when a cluster is flat in some direction
MIN_ROWS = 20  # a class with fewer rows is not tested
# tail starts: the top and bottom 15% of the class along each of the first INIT_DIMS directions. 2-means
# starts cut the bulk of a class in two and miss a cluster of a tenth of it (CIFAR-10 Blended at 1% poisoning: 500 of
# 5,500 rows, separable at 7.6 along their discriminant, never found from the 2-means starts)
TAIL_SHARES = (0.15,)
MIN_SIDE, MIN_SIDE_SHARE = 5, 0.01  # a split whose smaller side holds fewer rows (or less of the class) is not one


def two_means(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Cluster labels (0/1) from Lloyd's algorithm, seeded by the two points farthest apart along the first column."""
    first = points[:, 0]
    centres = torch.stack([points[first.argmin()], points[first.argmax()]])
    assign = torch.zeros(len(points), dtype=torch.long)
    for step in range(iterations):
        new = torch.cdist(points, centres).argmin(1)
        if step > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in range(2):
            if (assign == j).any():
                centres[j] = points[assign == j].mean(0)
    return assign


def tail(values: torch.Tensor, share: float, side: int) -> torch.Tensor:
    """A start that puts the `share` of rows with the largest (side 1) or smallest (side -1) values in cluster 1."""
    order = (side * values).argsort(descending=True, stable=True)
    assign = torch.zeros(len(values), dtype=torch.long)
    assign[order[: max(2, math.ceil(share * len(values)))]] = 1
    return assign


def _two_means_1d(p: torch.Tensor, assign: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """1-D Lloyd from the given assignment: each value goes to the nearer cluster mean (labels keep their meaning)."""
    for _ in range(iterations):
        if not ((assign == 0).any() and (assign == 1).any()):
            return assign
        cut = (p[assign == 0].mean() + p[assign == 1].mean()) / 2
        new = (p > cut).long() if p[assign == 1].mean() > p[assign == 0].mean() else (p <= cut).long()
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def likelihood_side(p: torch.Tensor, side: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """The rows of a flagged split that belong to `side` by a two-Gaussian likelihood along the projection: each
    cluster with its own mean, standard deviation and share, a row to the one of higher weighted density, repeated
    until the assignment stops changing (classification EM). The 2-means cut sits midway between the means, which
    assigns the spread-out tail of a broad poison cluster to a tight clean one (CIFAR-10 BadNets at 1%: 13 poisoned
    rows 4-12 clean standard deviations out, kept as clean)."""
    for _ in range(iterations):
        if int(side.sum()) < 2 or int((~side).sum()) < 2:
            return side
        log_density = []
        for part in (side, ~side):
            values = p[part]
            sd = max(float(values.std()), 1e-12)
            share = float(part.double().mean())
            log_density.append(math.log(share) - math.log(sd) - 0.5 * ((p - values.mean()) / sd) ** 2)
        new = log_density[0] > log_density[1]
        if torch.equal(new, side):
            break
        side = new
    return side


def valley(p: torch.Tensor, assign: torch.Tensor) -> float:
    """Rows near the midpoint between the two cluster means / rows near the emptier of the two means (each count
    within +-VALLEY_WINDOW x the distance between the means): near 0 when a gap separates the clusters, about 1 or
    more when one distribution's tail was cut off."""
    means = [float(p[assign == j].mean()) for j in range(2)]
    half = VALLEY_WINDOW * abs(means[1] - means[0])
    near = lambda x: int(((p - x).abs() <= half).sum())  # noqa: E731
    return near((means[0] + means[1]) / 2) / max(1, min(near(means[0]), near(means[1])))


def separation(p: torch.Tensor, assign: torch.Tensor) -> float:
    """|mean_1 - mean_0| / the pooled within-cluster standard deviation (n - 2 degrees of freedom) of 1-D values."""
    a, b = p[assign == 0], p[assign == 1]
    if len(a) < 2 or len(b) < 2:
        return 0.0
    within = (float((a - a.mean()).pow(2).sum()) + float((b - b.mean()).pow(2).sum())) / (len(p) - 2)
    return abs(float(b.mean() - a.mean())) / max(math.sqrt(within), 1e-12)


@dataclass
class Split:
    """A class's two-way split along its discriminant direction."""

    assign: torch.Tensor  # (n,) 0/1 per row of the class
    projection: torch.Tensor  # (n,) p = z . w
    separation: float
    valley: float
    dims: int
    rounds: int
    mean: torch.Tensor  # the class mean (D,)
    basis: torch.Tensor  # (d, D) principal directions
    direction: torch.Tensor  # (d,) w

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Other rows' positions along the same direction."""
        return ((features.double() - self.mean) @ self.basis.T) @ self.direction


def _refine(z: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """LDA-k-means from a starting assignment: Fisher's direction of the two clusters, then 1-D 2-means on the
    projections, until the assignment stops changing. Returns (assign, projection, direction, rounds)."""
    n, dims = z.shape
    eye = torch.eye(dims, dtype=torch.float64)
    for rounds in range(1, ROUNDS + 1):
        if int((assign == 0).sum()) < 2 or int((assign == 1).sum()) < 2:
            return None
        m0, m1 = z[assign == 0].mean(0), z[assign == 1].mean(0)
        resid = torch.cat([z[assign == 0] - m0, z[assign == 1] - m1])
        within = resid.T @ resid / (n - 2)
        within += RIDGE * float(within.trace()) / dims * eye
        direction = torch.linalg.solve(within, m1 - m0)
        projection = z @ direction
        new = _two_means_1d(projection, assign)
        if torch.equal(new, assign) or rounds == ROUNDS:
            if int((new == 0).sum()) < 2 or int((new == 1).sum()) < 2:
                return None
            return new, projection, direction, rounds
        assign = new
    return None


def discriminant_split(
    features: torch.Tensor, threshold: float = SEPARATION_THRESHOLD, valley_threshold: float = VALLEY_THRESHOLD
) -> Split | None:
    """A class's two-way split (None when the class is too small or degenerate to split).

    Starts: 2-means on the top INIT_DIMS principal directions, 1-D 2-means along each of those directions on
    its own (a cluster of a tenth of the class can sit along the second or fourth direction while 2-means on ten
    cuts the bulk of the class), and the 15% tails of each of those directions on either side (`tail`: a
    cluster of a tenth or less that 2-means, which favours halves, cuts through); each start is refined by
    `_refine`. Of the refined splits that pass the test
    (separation >= threshold, valley <= valley_threshold) the one that explains the largest share of the class's
    variance in the principal directions is kept, n_0 n_1 / n ||m_1 - m_0||^2 / sum ||z||^2 (the 2-means
    criterion: a poison made of several sub-clusters, one per source class, is kept whole rather than one tight
    sub-cluster of it); when none passes, the best-separated one, as evidence."""
    x = features.double()
    n = len(x)
    mean = x.mean(0)
    centred = x - mean
    _, sing, vh = torch.linalg.svd(centred, full_matrices=False)
    rank = int((sing > sing[0] * 1e-9).sum()) if len(sing) and sing[0] > 0 else 0
    dims = min(MAX_DIMS, n // ROWS_PER_DIM, rank)
    if n < MIN_ROWS or dims < 1:
        return None
    basis = vh[:dims]
    z = centred @ basis.T
    init = min(INIT_DIMS, dims)
    min_side = max(MIN_SIDE, math.ceil(MIN_SIDE_SHARE * n))
    starts = [two_means(z[:, :init])] + [two_means(z[:, j : j + 1]) for j in range(init)]
    starts += [tail(z[:, j], share, side) for j in range(init) for share in TAIL_SHARES for side in (1, -1)]
    total = float(z.pow(2).sum())
    best: Split | None = None
    best_key = (False, 0.0)
    for start in starts:
        refined = _refine(z, start)
        if refined is None:
            continue
        assign, projection, direction, rounds = refined
        sizes = torch.bincount(assign, minlength=2)
        if int(sizes.min()) < min_side:  # a few outliers, not a cluster
            continue
        split = Split(
            assign,
            projection,
            separation(projection, assign),
            valley(projection, assign),
            dims,
            rounds,
            mean,
            basis,
            direction,
        )
        passes = split.separation >= threshold and split.valley <= valley_threshold
        gap = z[assign == 1].mean(0) - z[assign == 0].mean(0)
        explained = float(sizes[0] * sizes[1]) / n * float(gap.pow(2).sum()) / max(total, 1e-300)
        key = (passes, explained if passes else split.separation)
        if best is None or key > best_key:
            best, best_key = split, key
    return best


def spread(features: torch.Tensor) -> float:
    """Median distance of a class's rows to their mean."""
    x = features.double()
    return float((x - x.mean(0)).norm(dim=1).median()) if len(x) else 0.0


@dataclass
class ClassEvidence:
    index: int
    rows: int
    decision: str  # "split", "collapsed", "clean" or "not tested"
    reason: str
    separation: float | None = None
    valley: float | None = None
    dims: int | None = None
    rounds: int | None = None
    spread_ratio: float | None = None  # the class's spread / the other classes' median spread
    kept_spread_ratio: float | None = None  # the same for the side a split keeps
    cluster_rows: list[int] = field(default_factory=list)  # [poison side, other side] when a split was made
    others_position: float | None = None  # the other classes' median along w: 0 = the kept cluster, 1 = the poison
    flagged_rows: int = 0

    @property
    def flagged(self) -> bool:
        return self.decision in ("split", "collapsed")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "rows": self.rows,
            "flagged": self.flagged,
            "decision": self.decision,
            "reason": self.reason,
            "separation": self.separation,
            "valley": self.valley,
            "spread_ratio": self.spread_ratio,
            "kept_spread_ratio": self.kept_spread_ratio,
            "dims": self.dims,
            "rounds": self.rounds,
            "clusters": None
            if not self.cluster_rows
            else {"poison_side": self.cluster_rows[0], "kept_side": self.cluster_rows[1]},
            "others_position": self.others_position,
            "flagged_rows": self.flagged_rows,
        }


@dataclass
class ClassAudit:
    classes: list[ClassEvidence]
    scores: torch.Tensor  # (N,) each row's position on its class's discriminant axis, in within-cluster sds,
    # positive on the side called poison, 0 at the midpoint between the two cluster means
    flagged: torch.Tensor  # (N,) bool: rows the audit flags
    class_flagged: torch.Tensor  # (N,) bool: rows of a flagged class


def _ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def _judge(
    ev: ClassEvidence,
    split: Split | None,
    feats: torch.Tensor,
    rows: torch.Tensor,
    others: torch.Tensor,
    reference: float | None,
    threshold: float,
    collapse_ratio: float,
    scores: torch.Tensor,
) -> torch.Tensor:
    """Fill in one class's evidence and row scores; returns the class's flagged rows."""
    none = rows[:0]
    if split is not None:
        ev.separation, ev.valley, ev.dims, ev.rounds = split.separation, split.valley, split.dims, split.rounds
        p, a = split.projection, split.assign
        means = [float(p[a == j].mean()) for j in range(2)]
        if others.any():
            centre = float(split.project(feats[others]).median())
            poison = 0 if abs(centre - means[0]) > abs(centre - means[1]) else 1
            ev.others_position = (centre - means[1 - poison]) / (means[poison] - means[1 - poison])
        else:  # a single class: nothing to compare with, the smaller cluster is called the poison
            poison = int((a == 1).sum() < (a == 0).sum())
        sd = abs(means[1] - means[0]) / max(split.separation, 1e-12)
        sign = 1.0 if means[poison] > means[1 - poison] else -1.0
        scores[rows] = sign * (p - (means[0] + means[1]) / 2) / max(sd, 1e-12)
        ev.cluster_rows = [int((a == poison).sum()), int((a != poison).sum())]
        if split.separation >= threshold and split.valley <= VALLEY_THRESHOLD:
            ev.kept_spread_ratio = _ratio(spread(feats[rows[a != poison]]), reference)
            if ev.kept_spread_ratio is not None and ev.kept_spread_ratio < collapse_ratio:
                ev.decision = "collapsed"
                ev.reason = (
                    f"split (separation {split.separation:.2f}, valley {split.valley:.2f}), but the side it would "
                    f"keep is collapsed too (spread {ev.kept_spread_ratio:.2f} x the other classes' median < "
                    f"{collapse_ratio}): the whole class is flagged"
                )
                return rows
            ev.decision = "split"
            where = (
                f"the other classes sit at {ev.others_position:.2f} along it (0 = the kept cluster, 1 = the flagged)"
                if ev.others_position is not None
                else "no other class to compare with: the smaller cluster"
            )
            side = likelihood_side(p, a == poison)
            moved = int((side != (a == poison)).sum())
            ev.reason = (
                f"separation {split.separation:.2f} >= {threshold} and valley {split.valley:.2f} <= "
                f"{VALLEY_THRESHOLD}; flagged: the cluster farther from the other classes along the split, its rows "
                f"drawn by likelihood along it ({moved} moved from the midpoint cut); {where}"
            )
            return rows[side]
    if ev.spread_ratio is not None and ev.spread_ratio < collapse_ratio:
        ev.decision = "collapsed"
        ev.reason = (
            f"spread {ev.spread_ratio:.2f} x the other classes' median < {collapse_ratio}: the whole class is flagged "
            "(every row shares one dominant feature)"
        )
        return rows
    sep = (
        "no split"
        if ev.separation is None or ev.valley is None
        else f"separation {ev.separation:.2f} (flag >= {threshold}), valley {ev.valley:.2f} "
        f"(flag <= {VALLEY_THRESHOLD})"
    )
    spr = "" if ev.spread_ratio is None else f", spread {ev.spread_ratio:.2f} x the other classes' median"
    ev.reason = sep + spr
    return none


def audit_classes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    threshold: float = SEPARATION_THRESHOLD,
    collapse_ratio: float = COLLAPSE_RATIO,
) -> ClassAudit:
    """The per-class decisions, each row's score and the flagged rows (see the module docstring)."""
    feats = features.double()
    n = len(feats)
    scores = torch.zeros(n, dtype=torch.float64)
    flagged = torch.zeros(n, dtype=torch.bool)
    class_flagged = torch.zeros(n, dtype=torch.bool)
    rows_of = [(labels == c).nonzero().flatten() for c in range(num_classes)]
    spreads = {c: spread(feats[r]) for c, r in enumerate(rows_of) if len(r) >= MIN_ROWS}
    evidence = []
    for c, rows in enumerate(rows_of):
        if len(rows) < MIN_ROWS:
            evidence.append(ClassEvidence(c, len(rows), "not tested", f"fewer than {MIN_ROWS} rows"))
            continue
        others = [s for k, s in spreads.items() if k != c]
        reference = float(torch.tensor(others).median()) if others else None
        ev = ClassEvidence(c, len(rows), "clean", "", spread_ratio=_ratio(spreads[c], reference))
        split = discriminant_split(feats[rows], threshold)
        members = _judge(ev, split, feats, rows, labels != c, reference, threshold, collapse_ratio, scores)
        flagged[members] = True
        ev.flagged_rows = len(members)
        if ev.flagged:
            class_flagged[rows] = True
        evidence.append(ev)
    return ClassAudit(evidence, scores, flagged, class_flagged)
