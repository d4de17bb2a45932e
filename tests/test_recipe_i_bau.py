"""`i-bau`: the implicit hypergradient against closed forms on a quadratic inner problem, the perturbation search's
step and bound, the outer loss's perturbed rows, and `cleanse unlearn --method i-bau` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import unlearn_removes_backdoor
from torch import nn
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.errors import CleanseError
from cleanse.recipes.i_bau import (
    IBau,
    hypergradient_surrogate,
    inner_loss,
    outer_step_surrogate,
    perturbed_rows,
    project_l2,
    search_step,
)

runner = CliRunner()

# The quadratic bilevel problem: inner L_in(d, t) = 1/2 d'Ad - d'Bt, minimised at d*(t) = A^-1 B t; outer
# L_out(d, t) = 1/2 ||d - c||^2 + 1/2 ||t||^2. Its total derivative at d*: t + B' A^-1 (d* - c).
A = torch.tensor(
    [[2.0, 0.5, 0.0, 0.0], [0.5, 1.5, 0.2, 0.0], [0.0, 0.2, 1.0, 0.1], [0.0, 0.0, 0.1, 3.0]], dtype=torch.float64
)
B = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.4], [0.2, 0.6, 0.9]], dtype=torch.float64)
C = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
THETA = torch.tensor([0.7, -0.2, 1.1], dtype=torch.float64)


def quadratic(theta: torch.Tensor):
    def inner(d: torch.Tensor) -> torch.Tensor:
        return 0.5 * d @ A @ d - d @ (B @ theta)

    def outer(d: torch.Tensor) -> torch.Tensor:
        return 0.5 * (d - C).pow(2).sum() + 0.5 * theta.pow(2).sum()

    return inner, outer


def hypergradient(delta: torch.Tensor, iterations: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    theta = THETA.clone().requires_grad_(True)
    inner, outer = quadratic(theta)
    surrogate, loss = hypergradient_surrogate(delta, outer, inner, iterations, alpha)
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad, loss


def test_the_hypergradient_converges_to_the_closed_form_total_derivative():
    star = torch.linalg.solve(A, B @ THETA)
    direct = THETA + B.T @ torch.linalg.solve(A, star - C)
    # the same by autograd through the closed-form inner solution
    theta = THETA.clone().requires_grad_(True)
    d = torch.linalg.solve(A, B @ theta)
    (through,) = torch.autograd.grad(0.5 * (d - C).pow(2).sum() + 0.5 * theta.pow(2).sum(), theta)
    assert torch.allclose(through, direct, atol=1e-12)
    # eigenvalues of A lie in about [0.9, 3.1]: alpha 0.3 contracts (|1 - 0.3 * lambda| <= 0.73)
    grad, loss = hypergradient(star, 200, 0.3)
    assert torch.allclose(grad, direct, atol=1e-10)
    assert float(loss) == pytest.approx(0.5 * float((star - C).pow(2).sum() + THETA.pow(2).sum()))


@pytest.mark.parametrize("iterations", [0, 1, 2, 5])
def test_k_fixed_point_iterations_give_the_truncated_neumann_series(iterations):
    # hypergrad.fixed_point with K iterations: v_K = sum_{j<K} (I - alpha A)^j g, g = d_delta L_out = delta - c;
    # d_theta Phi = alpha B (Phi = delta - alpha (A delta - B theta)), so the hypergradient is theta + alpha B' v_K.
    alpha, delta = 0.1, torch.tensor([0.3, -0.4, 1.0, 0.2], dtype=torch.float64)  # any delta, not only the solution
    g = delta - C
    v = torch.zeros(4, dtype=torch.float64)
    term = g.clone()
    for _ in range(iterations):
        v = v + term
        term = (torch.eye(4, dtype=torch.float64) - alpha * A) @ term
    grad, _ = hypergradient(delta, iterations, alpha)
    assert torch.allclose(grad, THETA + alpha * B.T @ v, atol=1e-12)
    if iterations == 0:
        assert torch.equal(grad, THETA)  # no implicit term: the outer loss's own gradient


class MeanPixel(nn.Module):
    """Two classes decided by the mean pixel m: logits (a * (m - 0.5), 0)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([self.a * (m - 0.5), torch.zeros_like(m)], 1)


def test_a_search_step_ascends_the_loss_of_the_models_own_predictions():
    # x has m = 0.6: class 0 with z = a (m - 0.5) = 0.4; CE(z, 0) = log(1 + e^-z), dCE/dm = -a sigmoid(-z), and each
    # of the N = 12 pixels of delta moves m by 1/N. So grad L_in = +a sigmoid(-z) / N + 2 reg delta per pixel, and the
    # step lowers every pixel (toward class 1, raising the loss) by lr times that.
    model = MeanPixel(4.0)
    x = torch.full((3, 3, 2, 2), 0.6)
    delta0 = torch.full((1, 3, 2, 2), 0.01)
    new = search_step(model, x, delta0, lr=10.0, reg=1e-3)
    z = 4.0 * (0.6 + 0.01 - 0.5)
    grad = 4.0 / (1 + math.exp(z)) / 12 + 2e-3 * 0.01
    assert new.shape == (1, 3, 2, 2) and not new.requires_grad
    assert torch.allclose(new, torch.full_like(new, 0.01 - 10.0 * grad), atol=1e-6)
    assert model.a.grad is None  # only delta got gradients
    with torch.no_grad():
        labels = model(x).argmax(1)
        assert float(inner_loss(model, x, labels, new, 1e-3)) < float(inner_loss(model, x, labels, delta0, 1e-3))


def test_the_search_labels_are_the_models_predictions_not_the_true_labels():
    # m = 0.3 is class 1 for the model: the step raises m toward class 0 whatever label the data carries.
    model = MeanPixel(4.0)
    x = torch.full((2, 3, 2, 2), 0.3)
    assert float(search_step(model, x, torch.zeros(1, 3, 2, 2), lr=1.0, reg=0.0).mean()) > 0


def test_project_l2_bounds_the_norm_and_keeps_the_direction():
    delta = torch.tensor([[3.0, 4.0]])  # norm 5
    assert torch.allclose(project_l2(delta, 2.0), delta * 0.4)
    assert torch.equal(project_l2(delta, 10.0), delta)  # inside the ball: unchanged
    assert torch.equal(project_l2(delta, 0.0), delta)  # 0: no bound (the official default)
    assert float(project_l2(torch.zeros(1, 2), 1.0).abs().sum()) == 0.0


@pytest.mark.parametrize("batch, portion, count", [(256, 0.01, 2), (100, 0.01, 1), (64, 0.01, 1), (10, 1.0, 10)])
def test_the_outer_loss_perturbs_a_portion_of_the_rows_at_least_one(batch, portion, count):
    rows = perturbed_rows(batch, portion, torch.Generator().manual_seed(0))
    assert rows.shape == (batch,) and int(rows.sum()) == count and set(rows.unique().tolist()) <= {0.0, 1.0}


def test_the_outer_surrogate_adds_delta_to_the_chosen_rows_only_and_without_k_is_their_ce_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    delta = 0.5 * torch.randn(1, 3, 2, 2)
    rows = torch.tensor([0.0, 1.0, 0.0, 0.0])
    p = IBau().resolve_params({"K": "0"})
    surrogate, loss = outer_step_surrogate(net, x, y, rows, x[:2], y[:2], delta, p)
    expected = F.cross_entropy(net(torch.cat([x[:1], x[1:2] + delta, x[2:]])), y)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-6)
    grads = torch.autograd.grad(surrogate, list(net.parameters()))
    direct = torch.autograd.grad(expected, list(net.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, direct, strict=True))
    # with K the implicit term enters: the gradient changes, the loss does not
    p = IBau().resolve_params({"K": "5"})
    surrogate, loss_k = outer_step_surrogate(net, x, y, rows, x[:2], y[:2], delta, p)
    assert float(loss_k) == pytest.approx(float(loss))
    implicit = torch.autograd.grad(surrogate, list(net.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(implicit, direct, strict=True))


@pytest.mark.parametrize("param, message", [({"inner_batch": "last"}, "inner_batch"), ({"portion": 2.0}, "portion")])
def test_check_refuses_bad_parameters(param, message):
    recipe = IBau()
    with pytest.raises(CleanseError, match=message):
        recipe.check(recipe.resolve_params(param), None)


def test_unlearn_i_bau_end_to_end_runs_rounds_and_records_the_perturbation(untrained_files, tmp_path):
    args = ["unlearn", str(untrained_files / "bd.safetensors"), "--method", "i-bau", "--data", "synthetic"]
    args += ["--clean-frac", "0.05", "--epochs", "2", "--param", "K=2", "--param", "batch_size=64"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "c.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    history = json.loads((tmp_path / "c.safetensors.run.json").read_text())["history"]
    assert [(r["phase"], r["epoch"]) for r in history] == [("unlearn", 1), ("unlearn", 2)]
    for row in history:
        assert math.isfinite(row["loss"]) and row["delta_norm"] > 0 and 0.0 <= row["fooled"] <= 1.0
        assert row["detail"].startswith("||delta|| ")
    assert s["kept"]["tag"] in ("start", "round 1", "round 2")
    bad = runner.invoke(app, [*args, "--param", "inner_batch=last", "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "inner_batch='last' must be one of: first, current" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_i_bau_removes_the_backdoor_and_keeps_accuracy(badnets_files, tmp_path):
    # The defaults (5 rounds, batch 100, Adam 3e-4): measured ASR 0.947 -> 0.152, CA 0.988 -> 0.970 (round 5).
    _, s, record = unlearn_removes_backdoor(badnets_files, "i-bau", tmp_path / "clean.safetensors")
    assert [r["epoch"] for r in record["history"] if r["phase"] == "unlearn"] == [1, 2, 3, 4, 5]
