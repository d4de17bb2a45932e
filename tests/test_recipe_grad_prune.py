"""`grad-prune`: the unit rule (which conv channels and Linear features are prunable), ranking across layers,
persistent masks, the BatchNorm that follows a conv, the refusal of a model without units, and the recipe end to
end."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import unlearn_removes_backdoor
from torch import nn

from cleanse.models import ARCHITECTURES
from cleanse.recipes.grad_prune import UnitMasks, following_batchnorm, rank_units
from cleanse.recipes.units import trace_units


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
    layers = {"a": net.a, "b": net.b}
    ranked = rank_units(layers, loss)
    assert [(n, c) for n, c, _ in ranked] == [("a", 1), ("b", 1), ("a", 0), ("b", 0)]
    assert [s for _, _, s in ranked] == pytest.approx([6.0, 4.5, 2.5, 1.5])
    out = net(torch.ones(1, 1, 1, 1))
    rest = rank_units(layers, out[0, 0].sum() + 3 * out[0, 1].sum(), exclude={("a", 1), ("b", 0)})
    assert [(n, c) for n, c, _ in rest] == [("b", 1), ("a", 0)]


def test_rank_units_averages_over_each_filters_weights():
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
    ranked = rank_units({"c": net.c}, loss)
    assert [(n, c) for n, c, _ in ranked] == [("c", 1), ("c", 0)]
    assert [s for _, _, s in ranked] == pytest.approx([8 / 9, 2 / 9])


def test_rank_units_scores_a_linear_row_by_the_mean_over_its_inputs():
    fc = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        fc.weight.zero_()
    x = torch.tensor([[1.0, -2.0, 4.0]])
    loss = (fc(x) * torch.tensor([[1.0, -3.0]])).sum()
    # dL/dW[j, k] = c_j x_k: row 0 |1, -2, 4| -> 7/3; row 1 |-3, 6, -12| -> 7
    ranked = rank_units({"fc": fc}, loss)
    assert [(n, c) for n, c, _ in ranked] == [("fc", 1), ("fc", 0)]
    assert [s for _, _, s in ranked] == pytest.approx([7.0, 7 / 3])


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
    masks = UnitMasks(net, followers)
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


def test_a_conv_without_batchnorm_only_has_its_filter_zeroed():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 1), act=nn.ReLU(), conv2=nn.Conv2d(3, 2, 1)))
    followers = following_batchnorm(net, torch.zeros(1, 2, 4, 4))
    assert followers == {"conv": None, "conv2": None}
    UnitMasks(net, followers).add([("conv", 2)])
    assert net.conv.weight[2].abs().sum() == 0 and net.conv.bias[2] == 0 and net.conv.weight[1].abs().sum() > 0


# --- the unit rule (cleanse/recipes/units.py) ---


class Tokens(nn.Module):
    """A pre-norm transformer-style block on a 2x2 patch embedding: embed -> tokens -> t + fc2(gelu(fc1(ln(t))))."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 2, stride=2)
        self.ln = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(self.act(self.fc1(self.ln(t))))
        return self.head(t.mean(1))


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.conv(x))


class Residual(nn.Module):
    """stem -> (conv_a -> bn_a -> relu -> conv_b) + stem -> bn -> relu: conv_b reaches a BatchNorm through a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.conv_a, self.bn_a, self.act = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU()
        self.conv_b, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.act(self.bn(self.conv_b(self.act(self.bn_a(self.conv_a(s)))) + s))


class ChannelsLastNorm(nn.Module):
    """A depthwise conv, then a LayerNorm over the channels (ConvNeXt's block start), then an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.ln = nn.LayerNorm(2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.ln(self.dw(x).permute(0, 2, 3, 1)))


class ReluAndGroupNorm(nn.Module):
    """One conv read by an activation and by a GroupNorm: the GroupNorm mixes its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.gn = nn.Conv2d(1, 4, 1), nn.ReLU(), nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.act(y) + self.gn(y)


def seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def frozen_conv_relu() -> nn.Sequential:
    net = seq(conv=nn.Conv2d(1, 2, 1), act=nn.ReLU())
    net.conv.weight.requires_grad_(False)
    return net


@pytest.mark.parametrize(
    "make, shape, prunable, followers",
    [
        # a conv whose channels reach a BatchNorm (directly or through pooling) or an activation with act(0) = 0
        (
            lambda: seq(conv=nn.Conv2d(1, 2, 1), bn=nn.BatchNorm2d(2), act=nn.ReLU()),
            (1, 4, 4),
            ["conv"],
            {"conv": "bn"},
        ),
        (
            lambda: seq(conv=nn.Conv2d(1, 2, 1), pool=nn.MaxPool2d(2), act=nn.GELU()),
            (1, 4, 4),
            ["conv"],
            {"conv": None},
        ),
        (FunctionalRelu, (1, 4, 4), ["conv"], {"conv": None}),
        # sigmoid(0) = 0.5: a zeroed channel would still send a constant on
        (lambda: seq(conv=nn.Conv2d(1, 2, 1), act=nn.Sigmoid()), (1, 4, 4), [], {"conv": None}),
        # normalisations across channels mix a zeroed channel into the others
        (lambda: seq(conv=nn.Conv2d(1, 4, 1), gn=nn.GroupNorm(2, 4), act=nn.ReLU()), (1, 4, 4), [], {"conv": None}),
        (ReluAndGroupNorm, (1, 4, 4), [], {"conv": None}),
        (ChannelsLastNorm, (2, 4, 4), [], {"dw": None}),
        # through a residual sum: still prunable, but the BatchNorm after the sum is not zeroed with it
        (
            Residual,
            (1, 4, 4),
            ["stem", "conv_a", "conv_b"],
            {"stem": None, "conv_a": "bn_a", "conv_b": None},
        ),
        # frozen weights are preprocessing, not features
        (frozen_conv_relu, (1, 4, 4), [], {"conv": None}),
        # a Linear's features: a BatchNorm1d on (B, C) normalises them one by one
        (lambda: seq(fc=nn.Linear(3, 2), bn=nn.BatchNorm1d(2), act=nn.ReLU()), (3,), ["fc"], {"fc": "bn"}),
        # MLP hidden units only: not the patch embedding, the residual writer fc2 or the head
        (Tokens, (1, 4, 4), ["fc1"], {"embed": None, "fc1": None, "fc2": None, "head": None}),
    ],
)
def test_which_units_are_prunable(make, shape, prunable, followers):
    net = make()
    trace = trace_units(net, torch.zeros(2, *shape))
    assert list(trace.prunable()) == prunable
    assert trace.follower == followers


def test_zeroing_a_linear_hidden_unit_silences_it_and_leaves_the_others_unchanged():
    torch.manual_seed(0)
    net = seq(fc1=nn.Linear(4, 5), act=nn.GELU(), fc2=nn.Linear(5, 3))
    assert list(trace_units(net, torch.zeros(1, 7, 4)).prunable()) == ["fc1"]
    x = torch.randn(2, 7, 4)  # tokens: (B, N, C)
    with torch.no_grad():
        hidden, out = net.act(net.fc1(x)), net(x)
        UnitMasks(net, {"fc1": None}).add([("fc1", 2)])
        hidden_after, out_after = net.act(net.fc1(x)), net(x)
    assert torch.equal(hidden_after[..., 2], torch.zeros(2, 7))
    others = [0, 1, 3, 4]
    assert torch.equal(hidden_after[..., others], hidden[..., others])
    # by hand: the output loses exactly unit 2's contribution, fc2's column 2 times the unit's activation
    expected = out - hidden[..., 2:3] * net.fc2.weight[:, 2]
    assert torch.allclose(out_after, expected, atol=1e-6)


def _rule_before_issue_28(net: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, str | None]]:
    """grad-prune's units and BatchNorm followers as they were before the unit rule: every learned Conv2d, and the
    BatchNorm reached from each through channel-wise modules (kept here to show the CNNs' units did not change)."""
    channelwise = (
        *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        *(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Tanh),
        *(nn.Identity, nn.Dropout, nn.Dropout2d),
    )
    produced: dict[int, str] = {}
    found: dict[str, str | None] = {}
    alive: list[torch.Tensor] = []

    def hook(name: str, module: nn.Module):
        def fn(_m, args, out):
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return
            source = produced.get(id(args[0]))
            alive.extend([args[0], out])
            if isinstance(module, nn.Conv2d):
                found.setdefault(name, None)
                produced[id(out)] = name
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if (
                    source is not None
                    and found.get(source) is None
                    and module.num_features == out.shape[1]
                    and module.affine
                ):
                    found[source] = name
            elif isinstance(module, channelwise) and source is not None:
                produced[id(out)] = source

        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in net.named_modules() if not list(m.children())]
    net.eval()
    with torch.no_grad():
        net(example)
    for h in handles:
        h.remove()
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad], found


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "preact-resnet18", "vgg11-bn"])
def test_on_the_registry_cnns_units_followers_and_picks_are_those_of_the_rule_before(arch):
    torch.manual_seed(0)
    net = ARCHITECTURES.get(arch)(num_classes=10)
    example = torch.zeros(1, 3, 32, 32)
    units_before, followers_before = _rule_before_issue_28(net, example)
    trace = trace_units(net, example)
    layers = trace.prunable()
    assert list(layers) == units_before  # the same layers in the same order (ties in the ranking go by this order)
    assert {n: trace.follower[n] for n in layers} == {n: followers_before[n] for n in layers}
    assert following_batchnorm(net, example) == followers_before
    # so the same units are picked: the first 20 of one unlearning-style loss's ranking under either rule
    net.eval()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    modules = dict(net.named_modules())
    before = rank_units({n: modules[n] for n in units_before}, nn.functional.cross_entropy(net(x), y))
    after = rank_units(layers, nn.functional.cross_entropy(net(x), y))
    assert after[:20] == before[:20]


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
