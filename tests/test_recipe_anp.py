"""`anp`: the mask update against a hand computation, the neuron perturbation's size, pruning by threshold, the
hooks leaving the model as it was, the refusal of a model without BatchNorm, and `cleanse unlearn --method anp`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_recipe_architectures import family_model, refused_before_work
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.recipes.anp import NO_BATCHNORM, NeuronPerturbation, batchnorms, below_threshold, mask_step, sweep

runner = CliRunner()
X = torch.tensor([[1.0, 0.0], [2.0, 4.0], [0.0, 1.0], [3.0, -1.0]])
Y = torch.tensor([1, 0, 1, 0])


def bn_logits() -> nn.Sequential:
    """The logits are a BatchNorm1d's output: gamma (2, -1), beta (0.5, 0)."""
    net = nn.Sequential(nn.BatchNorm1d(2, eps=1e-5))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([2.0, -1.0]))
        net[0].bias.copy_(torch.tensor([0.5, 0.0]))
    return net.eval()


def test_mask_step_without_perturbation_is_one_sgd_step_on_the_hand_computed_gradient_then_clipped():
    net = bn_logits()
    neurons = NeuronPerturbation(batchnorms(net), torch.device("cpu"))
    optimizer = torch.optim.SGD(neurons.masks(), lr=0.2, momentum=0.9)
    loss = mask_step(net, neurons, optimizer, X, Y, eps=0.0, steps=1, alpha=1.0, gen=torch.Generator())
    # by hand: batch statistics (biased variance), logits = gamma * m * xhat + beta with m = 1
    xhat = (X - X.mean(0)) / (X.var(0, unbiased=False) + 1e-5).sqrt()
    gamma, beta = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    logits = gamma * xhat + beta
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, Y)), rel=1e-5)
    # dCE/dm_c = mean_i (softmax_ic - onehot_ic) * gamma_c * xhat_ic
    grad = ((logits.softmax(1) - F.one_hot(Y, 2)) * gamma * xhat).mean(0)
    expected = (1 - 0.2 * grad).clamp(0, 1)
    assert neurons.mask["0"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    neurons.close()


def test_the_perturbation_starts_within_eps_and_moves_eps_over_steps_per_step():
    net = bn_logits()
    neurons = NeuronPerturbation(batchnorms(net), torch.device("cpu"))
    neurons.reset_noise(0.4, torch.Generator().manual_seed(0))
    start = [t.detach().clone() for t in neurons.noises()]
    assert all(t.abs().max() <= 0.4 for t in start)
    optimizer = torch.optim.SGD(neurons.masks(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    mask_step(net, neurons, optimizer, X, Y, eps=0.4, steps=2, alpha=0.2, gen=gen)
    moved = [t.detach() for t in neurons.noises()]
    again = torch.Generator().manual_seed(0)
    first = [(torch.rand(t.shape, generator=again) * 2 - 1) * 0.4 for t in start]
    for t, s in zip(moved, first, strict=True):
        # two signed steps of 0.2 each: every coordinate moved by 0, 0.4 (two agreeing signs) or back
        assert ((t - s).abs() <= 0.4 + 1e-6).all()
        assert t.abs().max() <= 0.8 + 1e-6
    neurons.close()


def test_the_hooks_leave_the_model_unchanged_once_closed_and_do_not_touch_running_statistics():
    net = bn_logits()
    before = net(X).detach()
    stats = net[0].running_mean.clone()
    neurons = NeuronPerturbation(batchnorms(net), torch.device("cpu"))
    with torch.no_grad():
        neurons.mask["0"].fill_(0.0)
    assert torch.allclose(net(X), torch.tensor([0.5, 0.0]).expand(4, 2))  # mask 0: only the shift is left
    neurons.close()
    assert torch.equal(net(X), before) and torch.equal(net[0].running_mean, stats)


def test_pruning_by_threshold_takes_masks_at_or_below_it():
    masks = {"a": torch.tensor([0.1, 0.2, 0.5]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([0.9])}
    assert below_threshold(masks, 0.2) == {"a": [0, 1], "b": [0], "c": []}


def test_the_threshold_sweep():
    assert sweep(0.2, 0.9, 0.05) == [round(0.2 + 0.05 * i, 6) for i in range(15)]
    assert sweep(0.2, 0.9, 0.05)[-1] == 0.9 and len(sweep(0.05, 0.9, 0.05)) == 18  # BackdoorBench's sweep
    assert sweep(0.2, 0.2, 0.05) == [0.2]  # pruning_max = threshold: the official single pruning
    assert sweep(0.2, 0.3, 0.04) == [0.2, 0.24, 0.28]


def test_anp_refuses_a_model_without_batchnorm():
    message = refused_before_work(family_model("convnext"), "anp", {})
    assert (
        message
        == NO_BATCHNORM
        == (
            "anp masks and perturbs BatchNorm neurons and this model has no affine BatchNorm "
            "(ViT, Swin and ConvNeXt use LayerNorm); "
            "use --method tar-ewc with a trigger (cleanse scan reverses one) or fine-prune"
        )
    )


def test_unlearn_anp_end_to_end_sweeps_thresholds_and_zeroes_the_gamma_of_each_kept_pruned_neuron(
    untrained_files, tmp_path
):
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "anp", "--data", "synthetic"]
    args += ["--clean-frac", "0.05", "--param", "iterations=4", "--param", "report_every=2", "--param", "lr=5"]
    # 4 iterations move the masks of this untrained net only to 0.8-1: a sweep 0.90, 0.93, 0.96 prunes some
    args += ["--param", "threshold=0.9", "--param", "pruning_step=0.03", "--param", "ca_floor_drop=1"]
    args += ["--param", "pruning_max=0.96"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "c.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    history = json.loads((tmp_path / "c.safetensors.run.json").read_text())["history"]
    assert [(r["phase"], r["epoch"]) for r in history] == [("mask", 2), ("mask", 4)] + [("prune", 4)] * 3
    details = [r["detail"] for r in history if r["phase"] == "prune"]
    assert [d.split(":")[0] for d in details] == ["threshold 0.90", "threshold 0.93", "threshold 0.96"]
    masks = {k: torch.tensor(v) for k, v in s["extra"]["masks"].items()}
    assert set(masks) == {f"layer{i}.norm{j}" for i in (1, 2, 3) for j in (1, 2)}
    assert all(0.0 <= float(m.min()) and float(m.max()) <= 1.0 for m in masks.values())
    # the kept state is one threshold's pruning: exactly the channels whose mask is at or below it have gamma 0
    tag = s["kept"]["tag"]
    assert tag.startswith("threshold ")
    expected = {k: v for k, v in below_threshold(masks, float(tag.split()[1])).items() if v}
    assert s["extra"]["pruned"] == expected and expected, "some masks end below 0.9"
    weights = load_file(tmp_path / "c.safetensors")
    for layer in masks:
        zero = (weights[f"{layer}.weight"] == 0).nonzero().flatten().tolist()
        assert zero == expected.get(layer, [])
    bad = runner.invoke(app, [*args[:-2], "--param", "pruning_max=0.8", "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "anp: need threshold <= pruning_max <= 1 and pruning_step > 0" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()
