"""`sau`: the shared PGD (bounds, direction), the frozen BatchNorm of the update, and the recipe end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import unlearn_removes_backdoor
from torch import nn

from cleanse.recipes.sau import Sau, js_divergence, planned_passes, sau_step, shared_pgd


class MeanPixel(nn.Module):
    """Two classes decided by the mean pixel m: logits (a * (m - c), 0) + a learnable bias (zero at the start)."""

    def __init__(self, a: float, c: float = 0.5) -> None:
        super().__init__()
        self.a, self.c = a, c
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([self.a * (m - self.c), torch.zeros_like(m)], 1) + self.bias


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_js_divergence_matches_the_hand_computed_value():
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): JS = 1/2 ln(4/3) + 1/2 (1/2 ln(2/3) + 1/2 ln 2)
    p, q = torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(4 / 3) + 0.25 * (math.log(2 / 3) + math.log(2))
    assert float(js_divergence(p, q)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(js_divergence(q, p)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(js_divergence(p, p)[0]) == pytest.approx(0.0, abs=1e-6)


def test_shared_pgd_stays_in_the_eps_ball_and_in_pixel_range():
    net = small_bn_net()
    frozen = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():
        net[5].weight.add_(0.3 * torch.randn_like(net[5].weight))  # the two models differ
    x = torch.rand(16, 3, 8, 8)
    x[:4] = 0.95  # near the top of the range: +eps must be clipped
    x[4:8] = 0.05
    y = torch.randint(0, 3, (16,))
    x_adv, shared = shared_pgd(net, frozen, x, y, eps=0.2, step=0.2, steps=5)
    assert x_adv.shape == x.shape and shared.shape == (16,) and shared.dtype == torch.bool
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert all(p.grad is None for p in net.parameters())  # only delta got gradients


def test_shared_pgd_starts_at_plus_eps_and_moves_toward_a_shared_error():
    # Both models identical: m = 0.6 is class 0 (y = 0). The start +eps (m = 0.8) is still class 0; the
    # ascent on CE then lowers m by 0.2 per step: m = 0.6, then 0.4, where both models say class 1 (a
    # shared error) and the search stops early.
    model, frozen = MeanPixel(10.0), MeanPixel(10.0)
    x, y = torch.full((2, 1, 2, 2), 0.6), torch.zeros(2, dtype=torch.long)
    x_adv, shared = shared_pgd(model, frozen, x, y, eps=0.2, step=0.2, steps=5)
    assert shared.all()
    assert torch.allclose(x_adv, x - 0.2, atol=1e-6)
    x_one, shared_one = shared_pgd(model, frozen, x, y, eps=0.2, step=0.2, steps=1)
    assert torch.allclose(x_one, x, atol=1e-6) and not shared_one.any()  # one step: from +eps back to m = 0.6
    x_none, _ = shared_pgd(model, frozen, x, y, eps=0.2, step=0.2, steps=0)
    assert torch.allclose(x_none, x + 0.2, atol=1e-6)


def test_shared_pgd_js_term_pulls_the_two_models_together():
    # Different slopes: the two models agree exactly at m = 0.5 and drift apart with |m - 0.5|. With the
    # adversarial term off, one sign step of 0.2 must take m from the start 0.7 (+eps) back to 0.5, where JS is 0.
    model, frozen = MeanPixel(4.0), MeanPixel(12.0)
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, dtype=torch.long)
    x_adv, _ = shared_pgd(model, frozen, x, y, eps=0.2, step=0.2, steps=1, beta=0.0)
    assert torch.allclose(x_adv, x, atol=1e-6)
    with torch.no_grad():
        start = float(js_divergence(model(x + 0.2), frozen(x + 0.2))[0])
        assert start > 0 and float(js_divergence(model(x_adv), frozen(x_adv))[0]) < start


def test_sau_step_keeps_batchnorm_statistics_and_the_frozen_model_unchanged():
    net = small_bn_net()
    frozen = copy.deepcopy(net).requires_grad_(False)
    frozen_state = copy.deepcopy(frozen.state_dict())
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    params = {n: q.detach().clone() for n, q in net.named_parameters()}
    net.train()  # sau_step must freeze BatchNorm itself
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    p = Sau().resolve_params({})
    figures = sau_step(net, frozen, optimizer, x, y, p)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert any(not torch.equal(q, params[n]) for n, q in net.named_parameters())
    for n, t in frozen.state_dict().items():
        assert torch.equal(t, frozen_state[n]), n
    assert set(figures) == {"loss", "clean_ce", "sar", "shared", "fooled"}
    assert 0.0 <= float(figures["shared"]) <= 1.0 and float(figures["sar"]) >= 0.0


def test_sau_step_unlearning_term_is_zero_when_the_frozen_model_is_not_fooled():
    # m = 0.1 is class 1 for both; +eps gives m = 0.3, still class 1: nothing flips, nothing is fooled.
    model, frozen = MeanPixel(10.0), MeanPixel(10.0).requires_grad_(False)
    x, y = torch.full((3, 1, 2, 2), 0.1), torch.ones(3, dtype=torch.long)
    figures = sau_step(model, frozen, torch.optim.SGD(model.parameters(), lr=0.1), x, y, Sau().resolve_params({}))
    assert float(figures["sar"]) == 0.0 and float(figures["fooled"]) == 0.0
    assert float(figures["loss"]) == pytest.approx(float(figures["clean_ce"]))


@pytest.mark.parametrize(
    "n_train, batch, epochs, min_steps, passes",
    [
        (2250, 64, 5, 180, 5),  # the 5% CIFAR-10 subset: 36 steps a pass, 5 passes already make 180
        (230, 64, 5, 180, 45),  # the synthetic subset: 4 steps a pass, 45 passes for 180
        (1800, 64, 5, 180, 7),  # 29 steps a pass: 6 passes make 174, so 7
        (230, 64, 5, 0, 5),  # min_steps 0: exactly epochs
        (2500, 256, 100, 180, 100),  # the published budget: 10 steps a pass, 1,000 steps
        (10, 64, 1, 3, 3),  # fewer images than a batch: one step a pass
    ],
)
def test_planned_passes_meet_min_steps(n_train, batch, epochs, min_steps, passes):
    assert planned_passes(n_train, batch, epochs, min_steps) == passes


@pytest.mark.slow
def test_sau_removes_the_backdoor_and_keeps_accuracy(badnets_files, tmp_path):
    out = tmp_path / "clean.safetensors"
    # The published lr with min_steps raising the passes: 230 training images make 4 Adam steps a pass, so 5 passes
    # are 20 steps (test ASR 0.26 here). Measured along the default min_steps=180 (45 passes): test ASR 0.11 after
    # 40 steps, 0.057 after 60, then 0.04-0.057 up to 180; 60 keeps this test at a third of the default's time.
    result, s, record = unlearn_removes_backdoor(badnets_files, "sau", out, "--param", "min_steps=60")
    rows = [row for row in record["history"] if row["phase"] == "unlearn"]
    assert rows and all(0.0 <= row["shared"] <= 1.0 and row["detail"].startswith("shared ") for row in rows)
    assert record["extra"]["passes"] == len(rows) == 15
    assert (
        "sau: 230 images make 4 steps a pass, so it makes 15 passes instead of 5 to reach min_steps=60" in result.stderr
    )


@pytest.mark.parametrize("value, expected", [(None, False), ("true", True)])
@pytest.mark.slow
def test_sau_augment_switch_reaches_the_batches(badnets_files, tmp_path, monkeypatch, value, expected):
    from typer.testing import CliRunner

    import cleanse.recipes.sau as sau_module
    from cleanse.cli import app

    seen: list[bool] = []
    real = sau_module.batches

    def spy(*args, augment: bool = True, **kwargs):
        seen.append(augment)
        return real(*args, augment=augment, **kwargs)

    monkeypatch.setattr(sau_module, "batches", spy)
    extra = ["--param", f"augment={value}"] if value else []
    result = CliRunner().invoke(
        app,
        [
            "unlearn",
            str(badnets_files / "bd.safetensors"),
            "--method",
            "sau",
            "--data",
            "synthetic",
            "--clean-n",
            "60",
            "--epochs",
            "1",
            "--param",
            "min_steps=0",
            "--trigger",
            str(badnets_files / "bd.trigger.safetensors"),
            "-o",
            str(tmp_path / "out.safetensors"),
            "--json",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen == [expected]  # one epoch: one pass of batches, augmented only when asked
