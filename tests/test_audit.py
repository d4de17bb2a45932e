"""`cleanse scan --audit-data`: the per-class split and collapse tests on planted features, which cluster is called
the poison at every share of its class, the flagged set's precision and recall, --write-clean, the report's table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.data import load_data, save_dataset
from cleanse.report.render import audit_summary, audit_table
from cleanse.scan.activation_clustering import (
    SEPARATION_THRESHOLD,
    VALLEY_THRESHOLD,
    audit_classes,
    discriminant_split,
    likelihood_side,
    separation,
    tail,
    two_means,
)
from cleanse.scan.audit import audit_features, precision_recall, ranking_order, set_precision_recall

runner = CliRunner()
D = 16
CLASSES = [f"c{k}" for k in range(5)]


def blobs(rows_per_class: int = 400, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean classes: one Gaussian blob each, its mean on its own axis, decreasing variance along the axes."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.5, D)
    feats, labels = [], []
    for c in range(classes):
        centre = torch.zeros(D)
        centre[c] = 12.0
        feats.append(centre + torch.randn(rows_per_class, D, generator=gen) * scale)
        labels.append(torch.full((rows_per_class,), c))
    return torch.cat(feats), torch.cat(labels)


def plant(
    feats: torch.Tensor, labels: torch.Tensor, cls: int, count: int, axis: int = D - 1, shift: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add `count` rows to class `cls`, copies of other classes' rows moved along a low-variance axis (the trigger's
    direction): a dirty-label poison. Returns the features, labels and the poisoned mask."""
    gen = torch.Generator().manual_seed(1)
    donors = (labels != cls).nonzero().flatten()
    picked = donors[torch.randperm(len(donors), generator=gen)[:count]]
    extra = feats[picked].clone()
    extra[:, axis] += shift
    truth = torch.cat([torch.zeros(len(labels), dtype=torch.bool), torch.ones(count, dtype=torch.bool)])
    return torch.cat([feats, extra]), torch.cat([labels, torch.full((count,), cls)]), truth


def test_separation_and_two_means_by_hand():
    p = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0], dtype=torch.float64)
    assign = torch.tensor([0, 0, 0, 1, 1, 1])
    # means 1 and 11; within sum of squares 2 + 2 = 4 over n - 2 = 4 -> sd 1 -> separation 10
    assert separation(p, assign) == pytest.approx(10.0)
    assert separation(p, torch.tensor([0, 1, 1, 1, 1, 1])) == 0.0  # a side of one row: no split
    points = torch.cat([torch.zeros(5, 2), torch.full((3, 2), 4.0)])
    assert two_means(points).tolist() == [0] * 5 + [1] * 3


def test_a_clean_set_flags_nothing():
    feats, labels = blobs()
    result = audit_classes(feats, labels, 5)
    assert not result.flagged.any() and not result.class_flagged.any()
    assert all(ev.decision == "clean" and ev.separation < SEPARATION_THRESHOLD for ev in result.classes)
    assert all(ev.valley > VALLEY_THRESHOLD for ev in result.classes)
    assert all(0.5 < ev.spread_ratio < 2 for ev in result.classes)


@pytest.mark.parametrize("count", [40, 400, 600, 1200])  # 9%, half, 60% and 75% of class 2
def test_the_planted_poison_is_flagged_at_any_share_of_its_class(count):
    feats, labels, truth = plant(*blobs(), cls=2, count=count)
    result = audit_classes(feats, labels, 5)
    ev = result.classes[2]
    assert [e.index for e in result.classes if e.flagged] == [2]
    assert ev.decision == "split" and ev.separation >= SEPARATION_THRESHOLD
    # the poison side is the planted rows whether they are the smaller or the larger cluster
    assert torch.equal(result.flagged, truth), (count, ev.cluster_rows)
    assert ev.cluster_rows == [count, 400] and ev.flagged_rows == count
    assert abs(ev.others_position) < 0.5  # the other classes sit nearer the clean cluster along the split
    assert (result.scores[truth] > 0).all() and (result.scores[labels.eq(2) & ~truth] < 0).all()


def test_a_small_cluster_along_a_minor_direction_is_found():
    # 5% of the class along the direction of least variance: 2-means on the top directions cuts the bulk instead;
    # the start along that direction alone finds it
    feats, labels, truth = plant(*blobs(), cls=1, count=21, axis=D - 1, shift=5.0)
    split = discriminant_split(feats[labels == 1])
    assert split is not None and split.separation >= SEPARATION_THRESHOLD
    result = audit_classes(feats, labels, 5)
    assert torch.equal(result.flagged, truth)


def test_tail_starts_take_the_extreme_share_of_one_direction():
    values = torch.tensor([3.0, -1.0, 7.0, 0.0, 5.0, -4.0, 2.0, 1.0, 6.0, -2.0], dtype=torch.float64)
    assert tail(values, 0.2, 1).tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]  # the two largest
    assert tail(values, 0.3, -1).tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # the three smallest
    assert int(tail(values, 0.01, 1).sum()) == 2  # never a side of fewer than two rows


def test_the_likelihood_side_takes_the_broad_clusters_tail_the_midpoint_cut_leaves():
    # a tight clean cluster (sd 0.5 around 0) and a broad poison cluster (10 rows from 4 to 16): the 2-means cut
    # midway between the means (about 5) leaves 4.0 and 4.5 with the clean rows, 8 and 9 clean sds out
    clean = torch.linspace(-1.0, 1.0, 200, dtype=torch.float64)
    broad = torch.tensor([4.0, 4.5, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 16.0], dtype=torch.float64)
    p = torch.cat([clean, broad])
    midpoint_cut = p > (clean.mean() + broad[2:].mean()) / 2
    assert midpoint_cut[200:].tolist() == [False, False] + [True] * 8
    side = likelihood_side(p, midpoint_cut)
    assert side.tolist() == [False] * 200 + [True] * 10
    assert torch.equal(likelihood_side(p, side), side)  # a fixed point


def test_a_cut_off_tail_is_not_a_split():
    # a heavy tail along one direction: 2-means can cut it off far out (a large separation), but no valley
    # separates the cut-off rows from the rest, so nothing is flagged
    feats, labels = blobs()
    gen = torch.Generator().manual_seed(3)
    rows = labels == 0
    feats[rows, D - 1] = -torch.rand(int(rows.sum()), generator=gen).log() * 6.0  # exponential, mean 6
    split = discriminant_split(feats[rows])
    assert split is not None and split.valley > VALLEY_THRESHOLD
    assert not audit_classes(feats, labels, 5).flagged.any()


def test_a_few_outliers_are_not_a_split():
    feats, labels = blobs()
    feats[:3, D - 1] += 30.0  # three rows of class 0 far out: under 1% of the class and under 5 rows
    result = audit_classes(feats, labels, 5)
    assert not result.flagged.any()
    assert result.classes[0].cluster_rows and min(result.classes[0].cluster_rows) >= 5


def test_a_collapsed_class_is_flagged_whole():
    # every row of class 3 carries the trigger: its features pull together (a tenth of the usual spread)
    feats, labels = blobs()
    rows = labels == 3
    feats[rows] = feats[rows].mean(0) + (feats[rows] - feats[rows].mean(0)) * 0.1
    result = audit_classes(feats, labels, 5)
    ev = result.classes[3]
    assert ev.decision == "collapsed" and ev.spread_ratio < 0.2 and ev.flagged_rows == 400
    assert torch.equal(result.flagged, rows) and torch.equal(result.class_flagged, rows)


def test_a_split_whose_kept_side_is_collapsed_flags_the_whole_class():
    # a fully poisoned class with two tight sub-groups: the split is real, but the side it would keep is as
    # collapsed as the poison, so the class goes whole
    feats, labels = blobs()
    rows = (labels == 4).nonzero().flatten()
    tight = feats[rows].mean(0) + (feats[rows] - feats[rows].mean(0)) * 0.05
    tight[: len(rows) // 3, 0] += 3.0
    feats[rows] = tight
    result = audit_classes(feats, labels, 5)
    ev = result.classes[4]
    assert ev.separation >= SEPARATION_THRESHOLD and ev.decision == "collapsed" and ev.kept_spread_ratio < 0.5
    assert result.flagged[rows].all() and result.flagged.sum() == len(rows)


def test_small_classes_are_not_tested():
    feats, labels = blobs()
    keep = (labels != 0) | (torch.arange(len(labels)) < 10)  # class 0 keeps 10 rows
    result = audit_classes(feats[keep], labels[keep], 5)
    assert result.classes[0].decision == "not tested" and not result.flagged.any()


def test_precision_recall_at_k_and_of_the_flagged_set_by_hand():
    truth = torch.tensor([True, False, False, True, False])
    assert precision_recall(torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2]), truth, 2) == {"precision": 0.5, "recall": 0.5}
    assert precision_recall(torch.tensor([0.9, 0.1, 0.1, 0.7, 0.2]), truth, 2) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(torch.zeros(5), torch.zeros(5, dtype=torch.bool), 2) == {"precision": None, "recall": None}
    flagged = torch.tensor([True, True, False, False, False])
    assert set_precision_recall(flagged, truth) == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "flagged": 2,
        "true_positives": 1,
    }
    none = set_precision_recall(torch.zeros(5, dtype=torch.bool), truth)
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] == 0.0
    # flagged classes first, each by score; ties keep row order
    order = ranking_order(torch.tensor([5.0, 1.0, 2.0, 2.0]), torch.tensor([False, True, True, True]))
    assert order.tolist() == [2, 3, 1, 0]


def test_audit_features_reports_per_class_evidence_and_both_precisions():
    feats, labels, truth = plant(*blobs(), cls=2, count=600)
    audit = audit_features(feats, labels, CLASSES, rate=600 / len(labels), truth=truth)
    doc = audit.doc
    assert doc["flagged_classes"] == [2] and doc["flagged_rows"] == 600 and doc["k"] == 600
    assert doc["flagged_set"]["precision"] == 1.0 and doc["flagged_set"]["recall"] == 1.0
    assert doc["precision_recall"]["split"] == {"precision": 1.0, "recall": 1.0}
    assert set(doc["precision_recall"]) == {"split", "spectral"}
    c2 = doc["classes"][2]
    assert c2["decision"] == "split" and c2["clusters"] == {"poison_side": 600, "kept_side": 400}
    assert c2["poisoned_rows"] == 600 and c2["flagged_poisoned"] == 600 and "farther from the other" in c2["reason"]
    top = doc["ranking"][:600]
    assert all(r["flagged"] and r["poisoned"] and r["label"] == 2 for r in top)
    header, rows = audit_table(doc)
    assert len(rows) == 5 and rows[2][header.index("decision")] == "split *" and rows[2][-1] == "600 (600 flagged)"
    assert "600 of 2600 rows flagged in class(es) 2" in audit_summary(doc)


def _audit_set(tmp_path):
    """1,000 synthetic rows, 250 of them other classes' images with a 12 x 12 white square, relabelled 0 and marked
    poisoned: a feature even an untrained network separates, so the end-to-end test needs no training."""
    data = synthetic("train").subset(torch.arange(1000))
    rows = (data.labels != 0).nonzero().flatten()[:250]
    data.images[rows, :12, :12] = 255
    data.labels[rows] = 0
    data.poisoned = torch.zeros(1000, dtype=torch.bool)
    data.poisoned[rows] = True
    data.meta = {"attack": {"name": "square", "rate": 0.25}}
    save_dataset(data, tmp_path / "suspect.safetensors")
    return tmp_path / "suspect.safetensors", rows


def test_scan_audit_data_flags_and_writes_the_cleaned_copy(untrained_files, tmp_path):
    suspect, planted = _audit_set(tmp_path)
    clean = tmp_path / "clean.safetensors"
    args = ["scan", str(untrained_files / "bd.safetensors"), "--audit-data", str(suspect), "-o", str(tmp_path / "a")]
    result = runner.invoke(app, [*args, "--write-clean", str(clean), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["audit"]
    # an untrained network: which clean classes its random features split is not the point here, the planted rows are
    assert 0 in doc["flagged_classes"] and doc["flagged_set"]["recall"] > 0.9 and doc["k"] == 250
    full = json.loads((tmp_path / "a" / "audit.json").read_text())
    flagged = {r["row"] for r in full["ranking"] if r["flagged"]}
    assert len(flagged) == doc["flagged_rows"] and len(flagged & set(planted.tolist())) > 225
    assert doc["cleaned_copy"]["rows_removed"] == len(flagged) and doc["cleaned_copy"]["file"] == str(clean)
    original, cleaned = load_data(str(suspect)), load_data(str(clean))
    kept = torch.tensor(sorted(set(range(1000)) - flagged))
    assert torch.equal(cleaned.images, original.images[kept]) and torch.equal(cleaned.labels, original.labels[kept])
    assert cleaned.poisoned is not None and torch.equal(cleaned.poisoned, original.poisoned[kept])
    assert cleaned.meta["audit"]["rows_before"] == 1000
    assert cleaned.meta["audit"]["poisoned_rows_left"] == 250 - len(flagged & set(planted.tolist()))
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["outputs"] == {"cleaned_data": str(clean), "rows": len(kept)}
    # the copy is a dataset train accepts (when no class was flagged whole): one short epoch on it
    assert cleaned.meta["audit"]["empty_classes"] == []
    trained = tmp_path / "m.safetensors"
    out = runner.invoke(
        app, ["train", str(clean), "--arch", "cnn", "--arch-arg", "width=8,16,16", "--epochs", "1", "-o", str(trained)]
    )
    assert out.exit_code == 0, out.output
    # the cleaned copy exists now: a second run needs --force for it too, and writes nothing
    again = runner.invoke(app, [*args[:-1], str(tmp_path / "b"), "--write-clean", str(clean)])
    assert again.exit_code == 2 and "output exists" in again.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--write-clean", "{tmp}/c.safetensors"], "--write-clean writes a cleaned copy of the --audit-data set"),
        (["--audit-data", "{suspect}", "--write-clean", "{tmp}/c.npz"], "give it a .safetensors name"),
        (["--audit-data", "{suspect}", "--write-clean", "{suspect}"], "output is the same file as an input"),
        (["--audit-data", "{suspect}", "--write-clean", "{tmp}/x/c.safetensors"], "lies inside the output folder"),
    ],
)
def test_write_clean_bad_requests_exit_2(untrained_files, tmp_path, extra, message):
    suspect, _ = _audit_set(tmp_path)
    extra = [e.format(tmp=tmp_path, suspect=suspect) for e in extra]
    result = runner.invoke(app, ["scan", str(untrained_files / "bd.safetensors"), "-o", str(tmp_path / "x"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "c.safetensors").exists()


def test_the_report_shows_the_audit_of_an_audit_only_scan(tmp_path):
    from cleanse.report.render import to_html, to_markdown

    feats, labels, truth = plant(*blobs(), cls=2, count=600)
    audit = audit_features(feats, labels, CLASSES, rate=None, truth=truth).doc
    summary = {k: v for k, v in audit.items() if k != "ranking"}
    doc = {
        "verdict": None,
        "models": [],
        "methods": [],
        "summary": [],
        "missing": [],
        "images": {},
        "scan": [{"model": "m.safetensors", "role": "audited", "audit": summary}],
        "provenance": [],
    }
    md = to_markdown(doc)
    assert "## Data audit with `m.safetensors`" in md and "| 2 c2 | 1000 |" in md and "split *" in md
    assert "600 of 2600 rows flagged in class(es) 2; against the file's 600 poisoned rows: precision 100.00%" in md
    page = to_html(doc, tmp_path)
    assert "<h2>Data audit with <code>m.safetensors</code></h2>" in page and "split *" in page
