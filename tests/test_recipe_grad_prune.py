"""`grad-prune`: filter ranking across layers, persistent masks, the BatchNorm that follows a conv, and the recipe end
to end."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import unlearn_removes_backdoor
from torch import nn

from cleanse.models import ARCHITECTURES
from cleanse.recipes.grad_prune import FilterMasks, following_batchnorm, prunable_convs, rank_filters


def two_convs() -> nn.Sequential:
    """a: 1 -> 2 channels, b: 2 -> 2 channels, both 1x1 without bias, weights chosen by hand."""
    net = nn.Sequential(OrderedDict(a=nn.Conv2d(1, 2, 1, bias=False), b=nn.Conv2d(2, 2, 1, bias=False)))
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        net.b.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, -2.0]]).view(2, 2, 1, 1))
    return net


def test_rank_filters_scores_mean_abs_gradient_and_ranks_across_layers():
    net = two_convs()
    out = net(torch.ones(1, 1, 1, 1))
    loss = out[0, 0].sum() + 3 * out[0, 1].sum()
    # a = (1, 2); L = b0 + 3 b1 with b0 = a0, b1 = 0.5 a0 - 2 a1.
    # dL/dW_b[j, k] = c_j a_k with c = (1, 3): rows (1, 2) and (3, 6) -> mean |.| 1.5 and 4.5.
    # dL/dW_a[k] = dL/da_k = (1 + 3 * 0.5, 3 * -2) = (2.5, -6) -> |.| 2.5 and 6.
    ranked = rank_filters(net, loss)
    assert [(n, c) for n, c, _ in ranked] == [("a", 1), ("b", 1), ("a", 0), ("b", 0)]
    assert [s for _, _, s in ranked] == pytest.approx([6.0, 4.5, 2.5, 1.5])
    out = net(torch.ones(1, 1, 1, 1))
    rest = rank_filters(net, out[0, 0].sum() + 3 * out[0, 1].sum(), exclude={("a", 1), ("b", 0)})
    assert [(n, c) for n, c, _ in rest] == [("b", 1), ("a", 0)]


def test_rank_filters_averages_over_each_filters_weights_and_skips_frozen_convs():
    net = nn.Sequential(OrderedDict(frozen=nn.Conv2d(1, 1, 1, bias=False), c=nn.Conv2d(1, 2, 3, padding=1, bias=False)))
    net.frozen.weight.requires_grad_(False)
    with torch.no_grad():
        net.frozen.weight.fill_(1.0)
        net.c.weight.zero_()
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 2.0  # a single lit pixel: at the centre output, only the centre tap of each filter sees it
    out = net(x)
    loss = out[0, 0, 1, 1] - 4 * out[0, 1, 1, 1]
    # dL/dW_c[0] is 2 at the centre tap, 0 at the other 8 -> mean 2/9; filter 1: |-4 * 2| / 9 = 8/9.
    ranked = rank_filters(net, loss)
    assert [(n, c) for n, c, _ in ranked] == [("c", 1), ("c", 0)]
    assert [s for _, _, s in ranked] == pytest.approx([8 / 9, 2 / 9])
    assert list(prunable_convs(net)) == ["c"]


def test_masks_stay_zero_through_optimiser_steps_and_silence_the_channel():
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            pool=nn.MaxPool2d(2),
            bn=nn.BatchNorm2d(4),
            act=nn.GELU(),
            gap=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 2),
        )
    )
    followers = following_batchnorm(net, torch.zeros(1, 3, 8, 8))
    assert followers == {"conv": "bn"}  # conv -> pool -> bn: pooling keeps the channels
    masks = FilterMasks(net, followers)
    masks.add([("conv", 1), ("conv", 3)])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))
    for _ in range(3):
        net.train()
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert net.bn.bias.grad[1] != 0  # GELU'(0) = 0.5: the gradient alone would revive the channel
        optimizer.step()
        masks.apply()
    for ch in (1, 3):
        assert net.conv.weight[ch].abs().sum() == 0 and net.conv.bias[ch] == 0
        assert net.bn.weight[ch] == 0 and net.bn.bias[ch] == 0
    assert net.conv.weight[0].abs().sum() > 0 and net.bn.weight[2] != 0
    net.eval()
    feats = net.act(net.bn(net.pool(net.conv(x))))
    assert feats[:, [1, 3]].abs().max() == 0 and feats[:, 0].abs().max() > 0


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("cnn", {"layer1.conv1": "layer1.norm1", "layer1.conv2": "layer1.norm2", "layer3.conv2": "layer3.norm2"}),
        ("vgg11-bn", {"features.0": "features.1", "features.4": "features.5"}),
        (
            "resnet18",
            {
                "conv1": "bn1",
                "layer1.0.conv1": "layer1.0.bn1",
                "layer2.0.conv2": "layer2.0.bn2",
                "layer2.0.shortcut.0": "layer2.0.shortcut.1",
            },
        ),
        # Pre-activation: conv1's BN is the next block's; conv2 feeds a residual sum, so no BN follows it.
        ("preact-resnet18", {"layer1.0.conv1": "layer1.0.bn2", "layer1.0.conv2": None, "layer2.0.shortcut": None}),
    ],
)
def test_following_batchnorm_on_the_registry_architectures(arch, expected):
    net = ARCHITECTURES.get(arch)(num_classes=10)
    found = following_batchnorm(net, torch.zeros(1, 3, 32, 32))
    for conv, bn in expected.items():
        assert found[conv] == bn
    assert set(prunable_convs(net)) <= set(found)


def test_a_conv_without_batchnorm_only_has_its_filter_zeroed():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 1), act=nn.ReLU(), conv2=nn.Conv2d(3, 2, 1)))
    followers = following_batchnorm(net, torch.zeros(1, 2, 4, 4))
    assert followers == {"conv": None, "conv2": None}
    FilterMasks(net, followers).add([("conv", 2)])
    assert net.conv.weight[2].abs().sum() == 0 and net.conv.bias[2] == 0 and net.conv.weight[1].abs().sum() > 0


@pytest.mark.slow
def test_grad_prune_removes_the_backdoor_end_to_end(badnets_files, tmp_path):
    out = tmp_path / "gp.safetensors"
    result, s, record = unlearn_removes_backdoor(
        badnets_files, "grad-prune", out, "--epochs", "3", "--param", "patience=3"
    )
    phases = [row["phase"] for row in record["history"]]
    assert phases[0] == "start" and "prune" in phases and "finetune" in phases
    prune_rows = [row for row in record["history"] if row["phase"] == "prune"]
    assert prune_rows[0]["detail"].startswith("pruned 1 (")
    extra = record["extra"]
    assert len(extra["rounds"]) == len(prune_rows) and extra["rounds"][0]["filters"]
    assert len(extra["pruned"]) == extra["kept_round"]  # one filter per round by default
    assert "kept pruning round" in result.stderr
