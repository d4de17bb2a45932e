"""`clp`: the channel upper bound against a direct SVD, the outlier rule, which conv pairs with which BatchNorm,
the refusal of a model without conv -> BatchNorm, and `cleanse unlearn --method clp` without --data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_recipe_architectures import family_model, refused_before_work
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.models import load_model, new_model, save_model
from cleanse.recipes.clp import NO_CONV_BN, channel_bounds, conv_bn_pairs, outlying_channels

runner = CliRunner()


def test_channel_bound_of_a_1x1_conv_by_hand():
    conv, bn = nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=1.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -3.0]).view(2, 1, 1, 1))
        bn.weight.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([3.0, 0.0]))
    # |w| * |gamma| / sqrt(var + eps): 2 * 1 / 2 = 1 and 3 * 2 / 1 = 6
    assert channel_bounds(conv, bn).tolist() == pytest.approx([1.0, 6.0])


def test_channel_bound_is_the_largest_singular_value_of_each_filter_scaled_by_gamma_over_std():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0]))
    bounds = channel_bounds(conv, bn)
    for k in range(4):
        sigma = torch.linalg.svdvals(conv.weight[k].detach().reshape(3, 9))[0]
        expected = sigma * abs(float(bn.weight.detach()[k])) / math.sqrt(float(bn.running_var[k]) + bn.eps)
        assert float(bounds[k]) == pytest.approx(float(expected), rel=1e-5)


def test_outliers_are_above_mean_plus_u_times_the_unbiased_std():
    bounds = torch.tensor([1.0] * 9 + [10.0])
    # mean 1.9; unbiased std sqrt((9 * 0.81 + 8.1 ** 2) / 9) = sqrt(8.1) = 2.846: 1.9 + 3 * 2.846 = 10.44 > 10
    assert outlying_channels(bounds, 3.0).tolist() == []
    assert outlying_channels(bounds, 2.0).tolist() == [9]  # 1.9 + 2 * 2.846 = 7.59


def test_each_learned_conv_of_the_cnn_pairs_with_its_batchnorm_and_the_frozen_whitening_is_left_out():
    model = new_model("cnn", 10, None, (3, 32, 32), None, None, {"width": "32,64,64"}, seed=0)
    pairs, alone = conv_bn_pairs(model)
    assert pairs == {f"layer{i}.conv{j}": f"layer{i}.norm{j}" for i in (1, 2, 3) for j in (1, 2)}
    assert alone == []


def test_a_preact_conv_whose_output_goes_into_a_residual_sum_has_no_batchnorm_and_is_left_alone():
    model = new_model("preact-resnet18", 10, None, (3, 32, 32), None, None, {}, seed=0)
    pairs, alone = conv_bn_pairs(model)
    assert pairs["layer1.0.conv1"] == "layer1.0.bn2"
    assert "layer1.0.conv2" in alone and "layer1.0.conv2" not in pairs


def test_clp_refuses_a_vit_before_any_work():
    message = refused_before_work(family_model("vit"), "clp", {})
    assert (
        message
        == NO_CONV_BN
        == (
            "clp needs convolutions followed by a BatchNorm (it bounds each channel by the conv filter scaled by the "
            "BatchNorm's gamma/std) and this model has none; "
            "use --method tar-ewc with a trigger (cleanse scan reverses one) or fine-prune"
        )
    )


@pytest.fixture
def spiked(untrained_files, tmp_path):
    """The untrained cnn with filter 5 of layer2.conv1 scaled by 50: one channel far above its layer's bound."""
    model = load_model(untrained_files / "bd.safetensors")
    with torch.no_grad():
        model.net.layer2.conv1.weight[5] *= 50
    save_model(model, tmp_path / "spiked.safetensors")
    return tmp_path / "spiked.safetensors"


def test_unlearn_clp_runs_without_data_and_zeroes_the_outlying_channel(spiked, tmp_path):
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["unlearn", str(spiked), "--method", "clp", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["before"]["clean_accuracy"] is None and s["after"]["attack_success_rate"] is None and s["der"] is None
    assert s["extra"]["pruned"]["layer2.conv1"] == [5]
    assert s["kept"]["tag"] == "pruned" and s["kept"]["unchanged"] is False
    assert "no --data: no clean subset" in result.stderr
    weights = load_file(out)
    assert float(weights["layer2.norm1.weight"][5]) == 0 and float(weights["layer2.norm1.bias"][5]) == 0
    assert torch.equal(weights["layer2.conv1.weight"], load_file(spiked)["layer2.conv1.weight"])  # conv untouched
    assert json.loads((tmp_path / "c.safetensors.run.json").read_text())["clean_subset"]["train_index"] is None


def test_unlearn_clp_with_data_reports_held_back_figures(spiked, tmp_path):
    args = ["unlearn", str(spiked), "--method", "clp", "--data", "synthetic", "--clean-frac", "0.05"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "c.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["measured_on"] == "the held-back clean images" and s["before"]["clean_accuracy"] is not None
    assert s["kept"]["held_back"]["clean_accuracy"] is not None


def test_method_all_without_data_runs_only_the_data_free_recipes(untrained_files, tmp_path):
    out = tmp_path / "c.safetensors"
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "all", "-o", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert sorted(doc["recipes"]) == ["clp"] and "finetune" in doc["skipped"] and "nad" in doc["skipped"]
    assert "only the data-free recipes run (clp)" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["c.clp.safetensors"]


def test_a_recipe_that_needs_data_without_data_exits_2_naming_the_data_free_ones(untrained_files, tmp_path):
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "nad", "-o", str(tmp_path / "x")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--data is required for nad" in result.stderr and "(clp) run without it" in result.stderr
    assert not list(tmp_path.iterdir())
