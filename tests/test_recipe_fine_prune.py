"""`fine-prune`: the mean activation of the head's input features, their pruning order and steps, the persistent
column mask, the refusals, and `cleanse unlearn --method fine-prune` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from test_recipe_architectures import refused_before_work
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.data import Dataset
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.models.spec import ModelSpec
from cleanse.recipes import RECIPES
from cleanse.recipes.fine_prune import NOT_FLAT, ColumnMask, mean_head_input, prune_counts, pruning_order

runner = CliRunner()


def wrap(net: nn.Module, classes: int, size: tuple[int, int, int]) -> ClassifierModel:
    """`net` behind the model wrapper, with mean 0 and std 1 so the net sees the [0, 1] pixels."""
    return ClassifierModel(
        net, ModelSpec("hand", classes, [str(i) for i in range(classes)], size, [0.0] * 3, [1.0] * 3)
    )


def test_mean_head_input_and_the_pruning_order_by_hand():
    model = wrap(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), 2, (3, 1, 1))
    images = torch.tensor([[255, 0, 51], [0, 0, 153]], dtype=torch.uint8).view(2, 1, 1, 3)
    data = Dataset(images, torch.tensor([0, 1]), ["0", "1"], "hand")
    # features are the pixels / 255: (1, 0, 0.2) and (0, 0, 0.6) -> means (0.5, 0, 0.4)
    activation = mean_head_input(model, model.net[1], data, batch_size=1)
    assert activation.tolist() == pytest.approx([0.5, 0.0, 0.4])
    assert pruning_order(activation).tolist() == [1, 2, 0]
    assert pruning_order(torch.tensor([0.3, 0.1, 0.3, 0.1])).tolist() == [1, 3, 0, 2]  # ties by index


def test_prune_counts_step_by_the_ceiling_of_step_ratio_times_the_features():
    assert prune_counts(64, 0.01) == list(range(64))  # ceil(0.64) = 1 per step
    assert prune_counts(512, 0.01) == list(range(0, 512, 6))  # ceil(5.12) = 6, as BackdoorBench on ResNet-18
    assert prune_counts(10, 0.25) == [0, 3, 6, 9]


def test_column_mask_zeroes_the_pruned_inputs_and_keeps_them_zero():
    head = nn.Linear(4, 2, bias=False)
    original = head.weight.detach().clone()
    mask = ColumnMask(head)
    mask.set(torch.tensor([1, 3]), original)
    assert torch.equal(head.weight[:, [1, 3]], torch.zeros(2, 2)) and torch.equal(head.weight[:, 0], original[:, 0])
    with torch.no_grad():
        head.weight.add_(1.0)  # an optimiser step
    mask.apply()
    assert torch.equal(head.weight[:, [1, 3]], torch.zeros(2, 2))
    mask.set(torch.tensor([0]), original)  # a new count starts again from the original weights
    assert torch.equal(head.weight[:, 1:], original[:, 1:]) and not head.weight[:, 0].any()


class TokenHead(nn.Module):
    """A head applied to every token: its input is (batch, tokens, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


def test_fine_prune_refuses_a_head_that_does_not_read_batch_by_features():
    message = refused_before_work(wrap(TokenHead(), 10, (3, 32, 32)), "fine-prune", {})
    assert (
        message
        == NOT_FLAT.format(dim=3)
        == (
            "fine-prune prunes the features the classifier head reads, and this model's head reads a 3-D input, not "
            "(batch, features); use --method finetune or nad"
        )
    )


def test_fine_prune_refuses_shares_out_of_range():
    recipe = RECIPES.get("fine-prune")
    with pytest.raises(CleanseError) as info:
        recipe.check(recipe.resolve_params({"prune_ratio": "1"}), None)
    assert info.value.message == (
        "fine-prune: prune_ratio must be below 1, acc_ratio and step_ratio at most 1 (they are shares)"
    )


def test_unlearn_fine_prune_end_to_end(untrained_files, tmp_path):
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "fine-prune", "--data", "synthetic"]
    args += ["--clean-frac", "0.05", "--param", "epochs=1", "-o", str(tmp_path / "c.safetensors"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    extra = s["extra"]
    assert extra["features"] == 64 and 0 <= extra["pruned"] < 64 and len(extra["pruned_features"]) == extra["pruned"]
    assert extra["pruned_features"] == sorted(range(64), key=lambda i: extra["mean_activation"][i])[: extra["pruned"]]
    record = json.loads((tmp_path / "c.safetensors.run.json").read_text())
    assert [r["phase"] for r in record["history"]][-1] == "finetune"
    if s["kept"]["tag"] != "start":  # a kept fine-tuning state carries the pruned columns at zero
        from safetensors.torch import load_file

        head = load_file(tmp_path / "c.safetensors")["head.weight"]
        assert not head[:, extra["pruned_features"]].any()
