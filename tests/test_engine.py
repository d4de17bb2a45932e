"""The training loop's pieces and the metrics, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanse.attacks import Trigger
from cleanse.data import Dataset
from cleanse.engine.augment import flip_translate
from cleanse.engine.evaluate import der, evaluate
from cleanse.engine.train import lr_multiplier


class Constant(nn.Module):
    """Predicts `cls` unless the bottom-right pixel is white, then predicts `triggered`."""

    def __init__(self, cls: int, triggered: int, classes: int = 4) -> None:
        super().__init__()
        self.cls, self.triggered, self.classes = cls, triggered, classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        hot = x[:, 0, -2, -2] > 0.99
        out = torch.zeros(len(x), self.classes)
        out[torch.arange(len(x)), torch.where(hot, self.triggered, self.cls)] = 1
        return out + self.dummy


def test_ca_asr_ra_match_hand_computation():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    data = Dataset(torch.zeros(8, 8, 8, 3, dtype=torch.uint8), labels, ["a", "b", "c", "d"], "t")
    mask = torch.zeros(8, 8)
    mask[6, 6] = 1
    trigger = Trigger("blend", {"mask": mask, "pattern": torch.ones(3, 8, 8)}, 2, (3, 8, 8))
    m = evaluate(Constant(cls=1, triggered=2), data, trigger)
    assert m["clean_accuracy"] == 2 / 8
    assert m["per_class_accuracy"] == [0.0, 1.0, 0.0, 0.0]  # always predicts 1
    two_classes_seen = Dataset(data.images[:4], labels[:4], ["a", "b", "c", "d"], "t")
    assert evaluate(Constant(cls=0, triggered=2), two_classes_seen)["per_class_accuracy"] == [1.0, 0.0, None, None]
    assert m["n_triggered"] == 6  # the two images of target class 2 are excluded
    assert m["attack_success_rate"] == 1.0 and m["robust_accuracy"] == 0.0
    m = evaluate(Constant(cls=1, triggered=1), data, trigger)
    assert m["attack_success_rate"] == 0.0 and m["robust_accuracy"] == 2 / 6  # class-1 images stay correct
    all_to_all = Trigger("blend", trigger.tensors, {"all_to_all": {"shift": 1}}, (3, 8, 8))
    m = evaluate(Constant(cls=0, triggered=2), data, all_to_all)
    assert m["n_triggered"] == 8 and m["attack_success_rate"] == 2 / 8  # only y=1 maps to 2
    assert m["robust_accuracy"] == 2 / 8


def test_der_is_backdoorbench_formula():
    before = {"clean_accuracy": 0.9, "attack_success_rate": 0.95}
    assert der(before, {"clean_accuracy": 0.88, "attack_success_rate": 0.05}) == pytest.approx((0.90 - 0.02 + 1) / 2)
    assert der(before, {"clean_accuracy": 0.95, "attack_success_rate": 0.99}) == pytest.approx(0.5)
    assert der(before, {"clean_accuracy": None, "attack_success_rate": 0.1}) is None


def test_lr_schedule_is_triangular():
    assert lr_multiplier(0, 100, 0.23) == pytest.approx(0.2)
    assert lr_multiplier(23, 100, 0.23) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, 0.23) == pytest.approx(0.07)
    assert lr_multiplier(10, 100, 0.23) < lr_multiplier(20, 100, 0.23)


def test_augmentation_shapes_identity_and_shift():
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(flip_translate(x, 0, False), x)
    g = torch.Generator().manual_seed(0)
    out = flip_translate(x, 2, True, g)
    assert out.shape == x.shape
    # every output is a flipped and/or shifted crop of the reflect-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(16):
        found = any(
            torch.equal(out[i], v[:, dy : dy + 8, dx : dx + 8])
            for v in (padded[i], padded[i].flip(2))
            for dy in range(5)
            for dx in range(5)
        )
        assert found


@pytest.mark.slow
def test_backdoored_model_learns_task_and_trigger(badnets_setup):
    _, _, result = badnets_setup
    metrics = result["metrics"]
    assert metrics["clean_accuracy"] > 0.9
    assert metrics["attack_success_rate"] > 0.85
    assert [row["epoch"] for row in result["history"]] == list(range(1, 9))


@pytest.mark.slow
def test_clean_model_ignores_the_patch(clean_model, badnets_setup):
    from tests.conftest import synthetic

    _, trigger, _ = badnets_setup
    m = evaluate(clean_model, synthetic("test"), trigger)
    assert m["clean_accuracy"] > 0.9 and m["attack_success_rate"] < 0.1
