"""`act-edit`: the closed-form edit (normal equations, exact map, residual), layers as matrices, and the recipe end to
end."""

from __future__ import annotations

import pytest
import torch
from conftest import unlearn_removes_backdoor
from torch import nn

from cleanse.errors import CleanseError
from cleanse.models import ARCHITECTURES
from cleanse.recipes.act_edit import (
    closed_form_edit,
    input_columns,
    layer_matrix,
    residual,
    residual_from_grams,
    resolve_layers,
    set_layer_matrix,
)


def test_closed_form_edit_by_hand_in_one_dimension():
    w, xc, xt = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]])
    # D = W (xc - xt) xt / (xt^2 + beta xc^2 + lam) = 2 * (-1) * 2 / (4 + beta + lam)
    assert closed_form_edit(w, xc, xt, 0.0, 0.0).item() == pytest.approx(-1.0)
    assert closed_form_edit(w, xc, xt, 1.0, 1.0).item() == pytest.approx(-2 / 3)
    # residual |(W + D) xt - W xc| / |W xc|: before |4 - 2| / 2 = 1; after D = -2/3: |4/3 * 2 - 2| / 2 = 1/3
    assert residual(w, torch.zeros(1, 1), xc, xt) == pytest.approx(1.0)
    assert residual(w, torch.tensor([[-2 / 3]]), xc, xt) == pytest.approx(1 / 3)


def test_closed_form_edit_satisfies_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    xc = torch.randn(5, 40, generator=g, dtype=torch.float64)
    xt = (
        xc
        + 0.5 * torch.randn(5, 1, generator=g, dtype=torch.float64)
        + 0.1 * torch.randn(5, 40, generator=g, dtype=torch.float64)
    )
    beta, lam = 0.7, 0.3
    d = closed_form_edit(w, xc, xt, beta, lam)
    # Half the gradient of the objective at D: ((W+D) Xt - W Xc) Xt^T + beta D Xc Xc^T + lam D
    grad = ((w + d) @ xt - w @ xc) @ xt.T + beta * d @ xc @ xc.T + lam * d
    assert grad.abs().max() < 1e-9
    d_auto = d.clone().requires_grad_(True)
    objective = (
        ((w + d_auto) @ xt - w @ xc).pow(2).sum() + beta * (d_auto @ xc).pow(2).sum() + lam * d_auto.pow(2).sum()
    )
    objective.backward()
    assert d_auto.grad.abs().max() < 1e-9
    assert residual(w, d, xc, xt) < residual(w, torch.zeros_like(d), xc, xt)
    grams = (xt @ xt.T, xc @ xc.T, xc @ xt.T)
    for dd in (torch.zeros_like(d), d):
        assert residual_from_grams(w, dd, *grams) == pytest.approx(residual(w, dd, xc, xt), rel=1e-9)


def test_without_regularisation_and_an_invertible_xt_the_edit_is_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, generator=g, dtype=torch.float64)
    xc = torch.randn(4, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    d = closed_form_edit(w, xc, xt, 0.0, 0.0)
    assert torch.allclose(d, w @ (xc - xt) @ torch.linalg.inv(xt), atol=1e-10)
    assert torch.allclose((w + d) @ xt, w @ xc, atol=1e-10)
    assert residual(w, d, xc, xt) < 1e-10
    assert residual(w, torch.zeros_like(d), xc, xt) > 0.1


def test_float32_inputs_are_solved_in_float64_and_returned_in_float32():
    w, xc, xt = torch.randn(2, 3), torch.randn(3, 10), torch.randn(3, 10)
    d = closed_form_edit(w, xc, xt, 1.0, 0.1)
    assert d.dtype == torch.float32
    assert torch.allclose(d.double(), closed_form_edit(w.double(), xc, xt, 1.0, 0.1), atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(5, 3),
        nn.Linear(5, 3, bias=False),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.Conv2d(4, 3, 3, stride=2, padding="valid", bias=False),
        nn.Conv2d(4, 3, 3, padding="same"),
    ],
)
def test_layers_are_linear_maps_on_their_input_columns_with_a_ones_row_for_the_bias(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 5) if isinstance(layer, nn.Linear) else torch.randn(2, 4, 6, 6)
    cols, mat = input_columns(layer, x), layer_matrix(layer)
    assert cols.shape[0] == mat.shape[1]
    if layer.bias is not None:
        assert torch.equal(cols[-1], torch.ones(cols.shape[1]))
    out = layer(x)
    expected = out if out.dim() == 2 else out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    assert torch.allclose((mat @ cols).T, expected, atol=1e-5)
    new = mat + 0.1
    set_layer_matrix(layer, new)
    assert torch.allclose(layer_matrix(layer), new)


@pytest.mark.parametrize("arch, head", [("cnn", "head"), ("vgg11-bn", "classifier"), ("resnet18", "linear")])
def test_head_is_the_last_linear_layer_called(arch, head):
    net = ARCHITECTURES.get(arch)(num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    assert resolve_layers(net, "head", x, 10) == [head]
    late_conv = "layer4.1.conv2" if arch == "resnet18" else ("layer3.conv2" if arch == "cnn" else "features.25")
    assert resolve_layers(net, f"head, {late_conv}", x, 10) == [late_conv, head]  # forward order
    with pytest.raises(CleanseError, match="has no module 'nope'"):
        resolve_layers(net, "nope", x, 10)


def test_a_conv_edit_written_back_maps_triggered_inputs_towards_the_clean_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    xc = torch.rand(8, 3, 5, 5)
    xt = xc.clone()
    xt[:, :, 3:, 3:] = 1.0  # a corner patch
    with torch.no_grad():
        clean_out = conv(xc)
    cols_c, cols_t, w = input_columns(conv, xc).double(), input_columns(conv, xt).double(), layer_matrix(conv).double()
    d = closed_form_edit(w, cols_c, cols_t, 1.0, 1e-3)
    after = residual(w, d, cols_c, cols_t)
    assert after < residual(w, torch.zeros_like(d), cols_c, cols_t)
    set_layer_matrix(conv, (w + d).float())
    with torch.no_grad():
        measured = torch.linalg.norm(conv(xt) - clean_out) / torch.linalg.norm(clean_out)
    assert measured.item() == pytest.approx(after, rel=1e-4)


@pytest.mark.slow
def test_act_edit_removes_the_backdoor_end_to_end(badnets_files, tmp_path):
    out = tmp_path / "ae.safetensors"
    result, s, record = unlearn_removes_backdoor(badnets_files, "act-edit", out)
    edit = record["extra"]["edits"][0]
    print(f"act-edit residual {edit['residual_before']:.2f} -> {edit['residual_after']:.2f}")
    assert edit["layer"] == "head" and edit["residual_after"] < edit["residual_before"]
    phases = [row["phase"] for row in record["history"]]
    assert phases == ["edit", "repair", "repair"]
    assert record["history"][0]["detail"].startswith("edited head: residual ")
