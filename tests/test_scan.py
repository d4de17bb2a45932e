"""`cleanse scan`: the anomaly tests (leave-one-out z, MAD), the batched reverse-engineering, the data audit, and the
command end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import synthetic, trained_once
from torch import nn
from typer.testing import CliRunner

from cleanse.attacks import load_trigger, poison_dataset
from cleanse.cli import app
from cleanse.data import load_data
from cleanse.data.dataset import save_dataset
from cleanse.errors import CleanseError
from cleanse.models import save_model
from cleanse.scan import anomaly_index, flag_small, reverse_triggers
from cleanse.scan.reverse import Budget
from cleanse.scan.spectral import spectral_scores

runner = CliRunner()


def test_anomaly_index_matches_hand_computation():
    norms = torch.tensor([4.0, 6.0, 8.0, 10.0, 30.0])
    # median 8; |n - 8| = 4, 2, 0, 2, 22 -> MAD 2 -> scale 1.4826 * 2 = 2.9652
    expected = torch.tensor([4, 2, 0, 2, 22]) / 2.9652
    assert torch.allclose(anomaly_index(norms), expected, atol=1e-4)
    assert flag_small(norms, threshold=1.0) == [0]  # 30 is far out too, but on the large side: never flagged
    assert flag_small(norms, threshold=2.0) == []  # 4 / 2.9652 = 1.35


def test_anomaly_index_on_the_log_scale():
    norms = torch.tensor([4.0, 40.0, 50.0, 60.0, 80.0])
    logs = norms.double().log()  # median log 50; |dev| = log(12.5), log(1.25), 0, log(1.2), log(1.6) -> MAD log(1.25)
    mad = 1.4826 * torch.log(torch.tensor(1.25, dtype=torch.float64))
    assert torch.allclose(anomaly_index(norms, "log"), ((logs - logs[2]).abs() / mad).float(), atol=1e-5)
    assert anomaly_index(norms, "log")[0].item() == pytest.approx(7.635, abs=1e-3)  # log(12.5) / (1.4826 log 1.25)
    assert flag_small(norms, threshold=3.5, scale="log") == [0]
    assert flag_small(norms, threshold=3.5, scale="linear") == []  # raw: (50 - 4) / (1.4826 * 10) = 3.10
    with pytest.raises(CleanseError, match="--scale 'cubic' is unknown"):
        anomaly_index(norms, "cubic")


def test_anomaly_index_even_count_and_mad_floor():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0])  # median 2.5 (mean of the middle two), |dev| 1.5, .5, .5, 1.5 -> MAD 1.0
    assert torch.allclose(anomaly_index(norms), torch.tensor([1.5, 0.5, 0.5, 1.5]) / 1.4826, atol=1e-4)
    same = torch.tensor(
        [50.0, 50.0, 50.0, 50.0, 5.0]
    )  # MAD 0: the floor is 1% of the median (0.5), never a division by 0
    assert anomaly_index(same)[4].item() == pytest.approx(45 / 0.5)
    assert flag_small(same) == [4]
    assert flag_small(torch.full((6,), 7.0)) == []
    with pytest.raises(CleanseError, match="at least 3 classes"):
        anomaly_index(torch.tensor([1.0, 2.0]))


def test_leave_one_out_z_matches_hand_computation():
    norms = torch.tensor([4.0, 40.0, 50.0, 60.0, 80.0])
    logs = norms.double().log()
    others = logs[1:]  # class 0 against the other four: mean and sample std (n - 1) of their logs
    z0 = (others.mean() - logs[0]) / others.std()
    assert anomaly_index(norms, "log", "loo-z")[0].item() == pytest.approx(float(z0), rel=1e-5)
    assert float(z0) == pytest.approx(8.980, abs=1e-3)  # (4.0193 - log 4 = 1.3863) / 0.2932
    rest = torch.cat([logs[:3], logs[4:]])  # class 3 (60): above the others' mean, so never flagged however far
    assert anomaly_index(norms, "log", "loo-z")[3].item() == pytest.approx(
        float((logs[3] - rest.mean()).abs() / rest.std()), rel=1e-5
    )
    assert flag_small(norms, threshold=3.5, scale="log", statistic="loo-z") == [0]
    # Raw norms: the others' mean 57.5 and sample std 17.078 -> (57.5 - 4) / 17.078 = 3.13.
    assert anomaly_index(norms, "linear", "loo-z")[0].item() == pytest.approx((57.5 - 4) / 17.0783, rel=1e-4)
    same = torch.tensor([50.0, 50.0, 50.0, 50.0, 5.0])  # the others' std is 0: floored at 1% of their mean log
    assert anomaly_index(same, "log", "loo-z")[4].item() == pytest.approx(
        float((torch.log(torch.tensor(10.0))) / (0.01 * torch.log(torch.tensor(50.0)))), rel=1e-5
    )
    with pytest.raises(CleanseError, match="--statistic 'zscore' is unknown; choose one of: loo-z, mad"):
        anomaly_index(norms, "log", "zscore")


class Tiny(nn.Module):
    """3 classes on 6x6 images; class 2 answers to a bright top-left pixel (a planted backdoor)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        return out + torch.stack([torch.zeros_like(x[:, 0, 0, 0])] * 2 + [20 * x[:, :, 0, 0].mean(1)], 1)


def tiny_data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 6, 6, 3, generator=gen) * 100).to(torch.uint8)
    return images, torch.arange(n) % 3


def test_batched_reverse_engineering_equals_class_by_class():
    model = Tiny().eval()
    images, labels = tiny_data()
    budget = Budget(steps=20, batch=8, round_steps=5, patience=1)
    together = reverse_triggers(model, images, labels, [0, 1, 2], budget, seed=3)
    for k in range(3):
        alone = reverse_triggers(model, images, labels, [k], budget, seed=3)
        assert torch.allclose(alone.masks[0], together.masks[k], atol=1e-5)
        assert torch.allclose(alone.patterns[0], together.patterns[k], atol=1e-5)
        assert alone.mask_l1[0].item() == pytest.approx(together.mask_l1[k].item(), rel=1e-5)
    assert together.masks.shape == (3, 6, 6) and together.patterns.shape == (3, 3, 6, 6)
    assert (
        0 <= together.masks.min()
        and together.masks.max() <= 1
        and 0 <= together.patterns.min()
        and together.patterns.max() <= 1
    )
    assert len(together.history) == 4  # one row per round of 5 steps


def test_early_stop_retires_a_settled_class_and_changes_no_other():
    model = Tiny().eval()
    images, labels = tiny_data(90)
    budget = Budget(steps=150, batch=16, round_steps=5, patience=1, early_stop=2)
    together = reverse_triggers(model, images, labels, [0, 1, 2], budget, seed=3)
    fixed = reverse_triggers(model, images, labels, [0, 1, 2], replace(budget, early_stop=0), seed=3)
    assert fixed.steps_run.tolist() == [150, 150, 150]
    stopped = [k for k in range(3) if together.steps_run[k] < 150]
    assert stopped, together.steps_run
    for k in range(3):
        alone = reverse_triggers(model, images, labels, [k], budget, seed=3)
        assert alone.steps_run[0] == together.steps_run[k]  # a class stops at the same step alone or batched
        assert torch.allclose(alone.masks[0], together.masks[k], atol=1e-5)
        assert alone.mask_l1[0].item() == pytest.approx(together.mask_l1[k].item(), rel=1e-5)
    for k in stopped:
        end = int(together.steps_run[k]) // 5  # rounds the class took part in
        costs = [row["cost"][k] for row in together.history[:end]]
        # raised and lowered (successive pairs: costs[1:] is one shorter, by design)
        assert any(b > a for a, b in zip(costs, costs[1:], strict=False)) and any(
            b < a for a, b in zip(costs, costs[1:], strict=False)
        )
        best = [row["best_size"][k] for row in together.history[:end]]
        assert all(best[-i] >= 0.99 * best[-i - 1] for i in range(1, budget.early_stop + 1))  # no round shrank it by 1%
        assert together.history[end - 1]["active"][k] is False and together.history[end - 2]["active"][k] is True
        assert all(
            row["best_size"][k] == best[-1] for row in together.history[end:]
        )  # retired: its best state is frozen
        # it kept the state it had at retirement, not the one the batch's full run reached
        assert together.mask_l1[k].item() == pytest.approx(best[-1], rel=1e-6)


def test_reverse_engineering_finds_the_planted_backdoor_small():
    model = Tiny().eval()
    images, labels = tiny_data(90)
    rev = reverse_triggers(model, images, labels, [0, 1, 2], Budget(steps=150, batch=16, round_steps=5, patience=1))
    assert bool(rev.reached[2])
    assert rev.mask_l1[2] < 0.5 * min(rev.mask_l1[0], rev.mask_l1[1])
    assert rev.masks[2][0, 0] == rev.masks[2].max()  # the top-left pixel carries the trigger


def test_spectral_scores_put_the_planted_outliers_first():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=gen) * 0.1
    labels = torch.arange(200) % 2
    outliers = torch.tensor([0, 2, 4, 6, 8])  # class 0 rows shifted along one direction
    feats[outliers, 3] += 3.0
    scores = spectral_scores(feats, labels)
    assert set(scores.argsort(descending=True)[:5].tolist()) == set(outliers.tolist())
    assert scores[labels == 1].median().abs().item() < 1e-6  # a robust z-score: each class's median is 0
    feats[outliers, 3] -= 6.0  # the same outliers on the other side: the skew orients the direction, same top 5
    assert set(spectral_scores(feats, labels).argsort(descending=True)[:5].tolist()) == set(outliers.tolist())


@pytest.fixture(scope="module")
def scan_files(badnets_setup, clean_model, tmp_path_factory):
    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("scan")
    save_model(model, folder / "bd.safetensors")
    save_model(clean_model, folder / "clean.safetensors")
    trigger.save(folder / "bd.trigger.safetensors")
    return folder


@pytest.fixture(scope="module")
def backdoored_scan(tmp_path_factory):
    """`cleanse scan` of `badnets_setup`'s model, `--budget fast`, every detector: what it printed and its folder.
    Run once for the whole run (conftest.trained_once), since under pytest-xdist more than one worker may ask."""
    folder = trained_once(tmp_path_factory, "badnets-scan")
    return SimpleNamespace(**json.loads((folder / "result.json").read_text())), folder / "bd.scan"


@pytest.mark.slow
def test_scan_flags_the_backdoored_model_with_exit_1_and_the_right_target(backdoored_scan):
    result, out = backdoored_scan
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "scan.json").read_text())
    assert doc["detectors_run"] == ["mmbd", "patch", "additive", "warp"]  # every detector the inputs allow
    assert doc["backdoored"] is True and doc["suspected_targets"] == [0]
    patch = doc["detectors"]["patch"]
    sizes = {n: [round(c["statistic"], 2) for c in d["classes"]] for n, d in doc["detectors"].items()}
    print(f"synthetic BadNets scan: {sizes}, evidence {doc['evidence']}")
    c0 = patch["classes"][0]
    assert "patch" in doc["evidence"]["0"] and doc["classes"][0]["flagged_by"] == doc["evidence"]["0"]
    assert c0["flagged"] and c0["anomaly_index"] > 3 and c0["trigger_file"] == "trigger-0-patch.safetensors"
    assert c0["attack_success_rate"] > 0.8 and c0["tar"] is not None
    assert c0["statistic"] == c0["mask_l1"] and c0["score"] == c0["anomaly_index"]
    assert {"index", "mask_l1", "anomaly_index", "attack_success_rate", "tar", "trigger_file", "steps_run"} <= set(c0)
    assert (
        patch["early_stop_rounds"] == 5
        and patch["steps_run_total"] == sum(c["steps_run"] for c in patch["classes"]) <= 10 * 200
    )
    row = doc["classes"][0]
    assert row["patch"] == {"statistic": c0["mask_l1"], "score": c0["anomaly_index"], "flagged": True, "reached": True}
    assert set(row["mmbd"]) == {"statistic", "score", "flagged"} and 0 <= row["mmbd"]["score"] <= 1
    families = ("patch", "additive", "warp")
    triggers = sorted(
        d["classes"][k]["trigger_file"]
        for d in doc["detectors"].values()
        for k in range(10)
        if d["classes"][k].get("trigger_file")
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scan.json", "run.json", "sheet.png", *triggers] + [f"class-{k}-{f}.png" for k in range(10) for f in families]
    )
    trig = load_trigger(out / "trigger-0-patch.safetensors")
    assert trig.origin == "scan" and trig.target == 0 and trig.kind == "blend"
    for name in triggers:  # each in its family's format
        family = name.removesuffix(".safetensors").split("-")[-1]
        assert load_trigger(out / name).kind == {"patch": "blend", "additive": "additive", "warp": "warp"}[family]
    assert json.loads((out / "run.json").read_text())["command"] == "scan"


@pytest.mark.slow
def test_scan_no_early_stop_runs_every_class_for_every_step(scan_files, tmp_path):
    out = tmp_path / "s"
    result = runner.invoke(
        app,
        [
            "scan",
            str(scan_files / "clean.safetensors"),
            "--data",
            "synthetic:test",
            "--budget",
            "full",
            "--steps",
            "10",
            "--no-early-stop",
            "--detectors",
            "patch",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.stdout)
    patch = doc["detectors"]["patch"]
    assert doc["early_stop_rounds"] == 0 and patch["steps_run_total"] == 10 * 10
    assert [c["steps_run"] for c in patch["classes"]] == [10] * 10
    assert json.loads((out / "run.json").read_text())["parameters"]["early_stop_rounds"] == 0


@pytest.mark.slow
def test_scan_passes_the_clean_model_with_exit_0(scan_files, tmp_path):
    result = runner.invoke(
        app,
        [
            "scan",
            str(scan_files / "clean.safetensors"),
            "--data",
            "synthetic:test",
            "--budget",
            "fast",
            "--detectors",
            "patch,additive",
            "-o",
            str(tmp_path / "s"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    scores = {n: [round(c["score"], 2) for c in d["classes"]] for n, d in doc["detectors"].items()}
    print(f"synthetic clean scan: anomaly indices {scores}")
    assert doc["backdoored"] is False and doc["suspected_targets"] == [] and doc["evidence"] == {}
    assert not list((tmp_path / "s").glob("trigger-*"))


@pytest.mark.slow
def test_reversed_trigger_drives_tar_ewc_to_lower_the_true_trigger_asr(backdoored_scan, scan_files, tmp_path):
    _, out = backdoored_scan
    result = runner.invoke(
        app,
        [
            "unlearn",
            str(scan_files / "bd.safetensors"),
            "--method",
            "tar-ewc",
            "--data",
            "synthetic",
            "--clean-frac",
            "0.05",
            "--trigger",
            str(out / "trigger-0-patch.safetensors"),
            "--test",
            "synthetic:test",
            "--eval-trigger",
            str(scan_files / "bd.trigger.safetensors"),
            "-o",
            str(tmp_path / "c.safetensors"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    true_before = s["before"]["eval_triggers"]["bd.trigger.safetensors"]["attack_success_rate"]
    true_after = s["after"]["eval_triggers"]["bd.trigger.safetensors"]["attack_success_rate"]
    print(
        f"scan -> tar-ewc with the reversed trigger: true-trigger ASR {true_before:.3f} -> {true_after:.3f}, "
        f"CA {s['before']['clean_accuracy']:.3f} -> {s['after']['clean_accuracy']:.3f}"
    )
    assert true_before > 0.8 and true_after < 0.10  # 0.29 when phase 1 stopped on the reversed trigger's ASR alone


@pytest.mark.slow
def test_data_audit_finds_the_poisoned_half_of_the_target_class_and_exits_0(scan_files, tmp_path):
    # the set the model learnt from: 10% BadNets, so the 500 poisoned rows are half of class 0, the larger cluster
    # as often as not; a "smaller cluster" rule would flag the clean half
    poisoned, _ = poison_dataset(synthetic("train"), "badnets", 0, 0.1, seed=0)
    save_dataset(poisoned, tmp_path / "p.safetensors")
    result = runner.invoke(
        app,
        [
            "scan",
            str(scan_files / "bd.safetensors"),
            "--audit-data",
            str(tmp_path / "p.safetensors"),
            "--write-clean",
            str(tmp_path / "c.safetensors"),
            "-o",
            str(tmp_path / "a"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["audit"]
    c0 = doc["classes"][0]
    print(
        f"synthetic data audit at 10%: {doc['flagged_set']}, class 0: {c0['reason']}, at k: {doc['precision_recall']}"
    )
    assert doc["k"] == 500 and doc["ground_truth"] is True and doc["flagged_classes"] == [0]
    assert doc["flagged_set"]["precision"] > 0.95 and doc["flagged_set"]["recall"] > 0.95
    assert c0["decision"] == "split" and c0["poisoned_rows"] == 500
    ranking = json.loads((tmp_path / "a" / "audit.json").read_text())["ranking"]
    assert len(ranking) == 5000 and ranking[0]["rank"] == 1 and ranking[0]["flagged"]
    cleaned = load_data(str(tmp_path / "c.safetensors"))
    assert len(cleaned) == 5000 - doc["flagged_rows"] and cleaned.poisoned is not None
    assert int(cleaned.poisoned.sum()) == 500 - doc["flagged_set"]["true_positives"]
    # the clean model on the clean set: nothing flagged
    result = runner.invoke(
        app,
        [
            "scan",
            str(scan_files / "clean.safetensors"),
            "--audit-data",
            "synthetic",
            "-o",
            str(tmp_path / "b"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    clean = json.loads(result.stdout)["audit"]
    print(
        "synthetic clean audit:",
        [(c["index"], round(c["separation"], 2), round(c["valley"], 2)) for c in clean["classes"]],
    )
    assert clean["flagged_rows"] == 0 and clean["flagged_classes"] == [] and clean["ground_truth"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--detectors", "warp"],
            "the warp detector reverse-engineers triggers from clean images; pass --data CLEAN_DATA or choose "
            "data-free detectors (mmbd)",
        ),
        (["--detectors", "mmbd,nc"], "unknown detector 'nc'; choose one of: mmbd, patch, additive, warp"),
        (["--detectors", ","], "--detectors is empty; choose from: mmbd, patch, additive, warp"),
        (["--alpha", "1"], "--alpha 1.0 must lie in (0, 1); MM-BD uses 0.05"),
        (["--data", "synthetic:test", "--budget", "huge"], "--budget 'huge' is unknown; choose one of: fast, full"),
        (["--data", "synthetic:test", "--threshold", "0"], "--threshold 0.0 must be positive"),
        (["--data", "synthetic:test", "--scale", "cubic"], "--scale 'cubic' is unknown; choose one of: log, linear"),
        (["--audit-data", "synthetic", "--poison-rate", "1.5"], "--poison-rate 1.5 must lie in (0, 1)"),
        (
            ["--data", "synthetic:test", "--schedule", "bandit"],
            "--schedule 'bandit' is unknown; choose one of: auto, every, screened",
        ),
        (
            ["--data", "synthetic:test", "--schedule", "screened", "--steps", "15"],
            "--schedule screened needs at least 20 steps (a screen of a quarter of them); raise --steps or use "
            "--schedule every",
        ),
    ],
)
def test_scan_bad_requests_exit_2(untrained_files, tmp_path, args, message):
    result = runner.invoke(app, ["scan", str(untrained_files / "bd.safetensors"), "-o", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "x").exists()


def test_scan_clean_images_scale_with_the_class_count(tmp_path):
    """300 classes: --n-clean 500 cannot give 2 per class and names the flag and the number that would do."""
    import numpy as np

    from tests.helpers import tiny_model

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=rng.integers(0, 256, (900, 32, 32, 3), dtype=np.uint8), y=np.repeat(np.arange(300), 3)
    )
    save_model(tiny_model(300), tmp_path / "m.safetensors")
    args = ["scan", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d.npz"), "--detectors", "patch"]
    result = runner.invoke(app, [*args, "--n-clean", "500", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "--n-clean 500 leaves 1 image(s) of class" in result.stderr
    assert "at least 2 per class are needed, raise it; --n-clean 600 or more would do" in result.stderr
    assert "--clean-n" not in result.stderr and not (tmp_path / "s").exists()


def test_the_sheet_shows_a_bounded_set_of_classes_flagged_first():
    from types import SimpleNamespace

    from cleanse.jobs.scan import SHEET_CLASSES, sheet_classes

    small = [{"score": float(k), "small_side": k % 2 == 0} for k in range(100)]
    report = SimpleNamespace(classes=small)
    other = SimpleNamespace(classes=[{"score": float("nan"), "small_side": True} for _ in range(100)])
    shown = sheet_classes(100, {"patch": report, "warp": other}, flagged={3, 5})
    assert len(shown) == SHEET_CLASSES and shown == sorted(shown)
    assert {3, 5} <= set(shown)  # flagged first, even with negative signed scores
    even_top = sorted(range(98, -1, -2))[-(SHEET_CLASSES - 2) :]  # the largest small-side scores
    assert set(shown) == {3, 5, *even_top}
    assert sheet_classes(10, {"patch": report}, flagged=set()) == list(range(10))


def test_a_class_whose_rounds_succeed_but_whose_state_never_holds_keeps_its_last_state(monkeypatch):
    """Every round's average success reaches the level, but the end-of-round check (every sixth hit-rate call here:
    five steps, then the check) always fails: no state is ever kept. Each class then keeps its last state and its
    finite size, and counts as not having reached a working trigger; an inf size would make every anomaly index
    NaN and hide a real target (seen on a 10-class synthetic model)."""
    from cleanse.scan import reverse

    calls = iter(range(1, 10_000))

    def hit_rate(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.full((len(targets),), 0.0 if next(calls) % 6 == 0 else 1.0)

    monkeypatch.setattr(reverse, "_hit_rate", hit_rate)
    model = Tiny().eval()
    images, labels = tiny_data()
    rev = reverse_triggers(model, images, labels, [0, 1, 2], Budget(steps=20, batch=8, round_steps=5), seed=3)
    assert rev.reached.tolist() == [False, False, False]
    assert torch.isfinite(rev.size).all() and rev.success.tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(rev.size, rev.masks.sum((1, 2)), rtol=1e-5)  # the last state's own size
    assert torch.isfinite(anomaly_index(rev.size, "log", "loo-z")).all()
