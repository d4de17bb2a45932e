"""`nad`: the attention map and loss on hand-made feature maps, the layer rule on each family, the refusal of a
model without feature maps, and `cleanse unlearn --method nad` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_recipe_architectures import refused_before_work
from tiny_archs import VIT_ARGS, arch
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.engine.layers import probe_layers
from cleanse.models import ClassifierModel, new_model
from cleanse.models.spec import ModelSpec
from cleanse.recipes.nad import NO_MAPS, attention_loss, attention_map, layer_weights, pick_layers

runner = CliRunner()


def test_attention_map_and_loss_by_hand():
    student = torch.tensor([[1.0, 2.0], [2.0, 0.0]]).view(1, 2, 1, 2)  # channels (1, 2) and (2, 0)
    teacher = torch.tensor([[3.0, 0.0], [0.0, -4.0]]).view(1, 2, 1, 2)
    # sum_c a^2: student (5, 4), L2 norm sqrt(41); teacher (9, 16), L2 norm sqrt(337)
    s = [5 / math.sqrt(41), 4 / math.sqrt(41)]
    t = [9 / math.sqrt(337), 16 / math.sqrt(337)]
    assert attention_map(student).flatten().tolist() == pytest.approx(s, rel=1e-5)
    assert attention_map(teacher).flatten().tolist() == pytest.approx(t, rel=1e-5)
    expected = ((s[0] - t[0]) ** 2 + (s[1] - t[1]) ** 2) / 2
    assert float(attention_loss(student, teacher)) == pytest.approx(expected, rel=1e-4)
    assert float(attention_loss(teacher, teacher)) == 0.0
    # p = 1: sum_c |a| -> student (3, 2) / sqrt(13)
    assert attention_map(student, p=1).flatten().tolist() == pytest.approx([3 / 13**0.5, 2 / 13**0.5], rel=1e-5)


def test_layer_weights_scale_each_beta_by_its_grid_over_the_official_wrn_grid():
    # the cnn's 15x15, 7x7, 3x3 maps against the official 32x32, 16x16, 8x8
    weights = layer_weights([500.0, 1000.0, 1000.0], [(15, 15), (7, 7), (3, 3)], True)
    assert weights == pytest.approx([500 * 225 / 1024, 1000 * 49 / 256, 1000 * 9 / 64])
    # one layer (a ViT's 8x8 token grid) takes the deepest beta and the deepest official grid: unchanged
    assert layer_weights([500.0, 1000.0, 1000.0], [(8, 8)], True) == [1000.0]
    # two layers: the deepest two betas against 16x16 and 8x8
    assert layer_weights([500.0, 700.0, 1000.0], [(32, 32), (4, 4)], True) == pytest.approx([2800.0, 250.0])
    assert layer_weights([500.0, 1000.0, 1000.0], [(15, 15), (7, 7), (3, 3)], False) == [500.0, 1000.0, 1000.0]
    # the scaled loss is the official loss of the same maps on the official grid: squared distance / official cells
    s, t = torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3)
    distance = float(((attention_map(s) - attention_map(t)) ** 2).sum())
    assert 1000.0 * 9 / 64 * float(attention_loss(s, t)) == pytest.approx(1000.0 * distance / 64, rel=1e-5)


def test_the_teacher_gets_no_gradient_from_the_attention_loss():
    student = torch.rand(2, 3, 4, 4, requires_grad=True)
    teacher = torch.rand(2, 3, 4, 4, requires_grad=True)
    attention_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("cnn", {"width": "32,64,64"}, ["layer1", "layer2", "layer3"]),
        ("resnet18", {}, ["layer2", "layer3", "layer4"]),
        ("vit", VIT_ARGS, ["encoder.layers.encoder_layer_0"]),  # one token grid: one layer
        (arch("tiny_swin"), {}, ["features.1.0", "permute"]),
    ],
)
def test_layers_are_the_deepest_block_output_of_each_grid_size(name, args, expected):
    model = new_model(name, 10, None, (3, 32, 32), None, None, args, seed=0)
    assert [i.name for i in pick_layers(probe_layers(model, (3, 32, 32)), 3)] == expected


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_nad_refuses_a_model_without_feature_maps():
    model = ClassifierModel(Flat(), ModelSpec("flat", 10, list("abcdefghij"), (3, 32, 32), [0.5] * 3, [0.25] * 3))
    message = refused_before_work(model, "nad", {})
    assert (
        message
        == NO_MAPS
        == (
            "nad distils attention maps of feature maps, and this model has no block output on a grid over the image; "
            "use --method finetune or fine-prune"
        )
    )


def test_unlearn_nad_end_to_end(untrained_files, tmp_path):
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "nad", "--data", "synthetic"]
    args += ["--clean-frac", "0.05", "--param", "epochs=1", "--param", "teacher_epochs=1"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "c.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["extra"]["layers"] == {
        "layer1": {"beta": 500.0, "grid": [15, 15], "weight": 109.8633},
        "layer2": {"beta": 1000.0, "grid": [7, 7], "weight": 191.4062},
        "layer3": {"beta": 1000.0, "grid": [3, 3], "weight": 140.625},
    }
    history = json.loads((tmp_path / "c.safetensors.run.json").read_text())["history"]
    assert [r["phase"] for r in history] == ["teacher", "distil"]
    assert history[1]["loss"] > history[1]["clean_ce"]  # the attention term is in the loss
