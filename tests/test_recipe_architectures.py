"""Recipes on transformer-family networks (issue 28): the tiny ViT of the registry, torchvision's Swin and ConvNeXt
(tests/tiny_archs.py). Which units grad-prune takes and which layers act-edit and ulrl use, the refusals before any
work, tar-ewc's Fisher through attention, and every recipe run at recipe level on each family.

The models are untrained (the ViT's zero-initialised head gets seeded random weights, so gradients reach the blocks):
these tests check code paths and choices, not cleaning.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_archs import VIT_ARGS, arch
from torch import nn

from cleanse.attacks import poison_dataset
from cleanse.attacks.trigger import Trigger
from cleanse.data import make_synthetic
from cleanse.data.subset import CleanSplit, clean_subset
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel, new_model
from cleanse.models.spec import ModelSpec
from cleanse.recipes import RECIPES, RecipeContext
from cleanse.recipes.act_edit import resolve_layers
from cleanse.recipes.grad_prune import NO_UNITS
from cleanse.recipes.tar_ewc import empirical_fisher
from cleanse.recipes.ulrl import last_linear
from cleanse.recipes.units import trace_units

VIT_FC1 = ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"]
FAMILIES = {
    "vit": ("vit", VIT_ARGS),
    "swin": (arch("tiny_swin"), {}),
    "convnext": (arch("tiny_convnext"), {}),
}
# (MLP hidden units grad-prune takes, act-edit's `head`, ulrl's head)
EXPECTED = {
    "vit": (VIT_FC1, "heads.head"),
    "swin": (["features.1.0.mlp.0", "features.3.0.mlp.0"], "head"),
    "convnext": (["features.1.0.block.3", "features.3.0.block.3"], "classifier.2"),
}


def family_model(family: str) -> ClassifierModel:
    name, args = FAMILIES[family]
    model = new_model(name, 10, None, (3, 32, 32), None, None, args, seed=0)
    if family == "vit":  # torchvision zero-initialises the ViT head
        with torch.no_grad():
            model.net.heads.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


@functools.cache
def split_and_trigger() -> tuple[CleanSplit, Trigger]:
    data = make_synthetic("train", n=200)
    return clean_subset(data, n=60, seed=0), poison_dataset(data, "badnets", 0, 0.1, seed=0)[1]


def context(model: ClassifierModel, name: str, params: dict[str, Any], events: list | None = None) -> RecipeContext:
    split, trigger = split_and_trigger()
    recipe = RECIPES.get(name)
    return RecipeContext(
        model,
        split,
        trigger if recipe.needs_trigger else None,
        recipe.resolve_params(params),
        callback=(events.append if events is not None else lambda e: None),
    )


# --- what each recipe takes on each family ---


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grad_prune_units_are_the_mlp_hidden_units_act_edit_and_ulrl_use_the_class_head(family):
    model = family_model(family)
    units, head = EXPECTED[family]
    trace = trace_units(model.net, torch.zeros(1, 3, 32, 32))
    assert list(trace.prunable()) == units
    assert all(trace.follower[n] is None for n in units)
    assert resolve_layers(model.net, "head", torch.zeros(1, 3, 32, 32), 10) == [head]
    assert last_linear(model.net, 10) is dict(model.net.named_modules())[head]


def test_vit_patch_embedding_block_outputs_and_head_are_not_units():
    trace = trace_units(family_model("vit").net, torch.zeros(1, 3, 32, 32))
    assert "conv_proj" in trace.layers and "conv_proj" not in trace.silenced  # reshaped into tokens
    fc2 = [n.replace("mlp.0", "mlp.3") for n in VIT_FC1]
    assert set(fc2) <= trace.mixed  # they write into the residual stream, which the next LayerNorm reads
    assert "heads.head" not in trace.silenced


# --- refusals, in one line, before any work ---


class NoUnits(nn.Module):
    """A patch embedding, a LayerNorm and a head: no conv channel or Linear feature can be zeroed on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def refused_before_work(model: ClassifierModel, name: str, params: dict[str, Any]) -> str:
    """The recipe's message; the context has no data or trigger, so any work before the refusal would crash."""
    recipe = RECIPES.get(name)
    params = recipe.resolve_params(params)
    events: list = []
    ctx = RecipeContext(model, None, None, params, callback=events.append)  # type: ignore[arg-type]
    with pytest.raises(CleanseError) as info:
        recipe.run(ctx)
    assert events == []
    with pytest.raises(CleanseError) as checked:
        recipe.check_model(model, params)
    assert checked.value.message == info.value.message
    return info.value.message


def test_grad_prune_refuses_a_model_without_prunable_units():
    model = ClassifierModel(
        NoUnits(), ModelSpec("no-units", 10, list("abcdefghij"), (3, 32, 32), [0.5] * 3, [0.25] * 3)
    )
    message = refused_before_work(model, "grad-prune", {})
    assert message == NO_UNITS
    assert message == (
        "grad-prune found no prunable units (conv channels followed by BatchNorm/activation, or MLP hidden units) "
        "in this model; use --method tar-ewc or ulrl"
    )


def test_ulrl_refuses_a_model_without_a_class_head():
    model = ClassifierModel(NoUnits(), ModelSpec("no-head", 7, list("abcdefg"), (3, 32, 32), [0.5] * 3, [0.25] * 3))
    message = refused_before_work(model, "ulrl", {})
    assert message == "ulrl needs the classifier head, a linear layer with 7 outputs, and this model has none"


def test_act_edit_refuses_a_linear_its_parent_uses_directly():
    layer = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    message = refused_before_work(family_model("vit"), "act-edit", {"layers": layer})
    assert message == (
        f"act-edit: module '{layer}' is not called in the forward pass (its parent may use its weights directly, "
        "as nn.MultiheadAttention does with out_proj); choose another layer"
    )


# --- tar-ewc's Fisher through attention ---


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_empirical_fisher_matches_a_per_sample_autograd_loop(family, recwarn):
    model = family_model(family)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 3, 7, 9])
    fisher = empirical_fisher(model, x, y, chunk=2)
    assert not [w for w in recwarn if "performance drop" in str(w.message)]
    # by hand: mean over samples of (d log p(y|x) / d theta)^2, divided by its mean over every entry
    model.eval()
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    squares = {n: torch.zeros_like(q) for n, q in params.items()}
    for i in range(len(x)):
        log_p = F.log_softmax(model(x[i : i + 1]), 1)[0, y[i]]
        for n, g in zip(params, torch.autograd.grad(log_p, list(params.values()), allow_unused=True), strict=True):
            if g is not None:
                squares[n] += g.pow(2) / len(x)
    mean = sum(s.sum() for s in squares.values()) / sum(s.numel() for s in squares.values())
    assert list(fisher) == list(params)
    for n in params:
        assert torch.allclose(fisher[n], squares[n] / mean, rtol=1e-4, atol=1e-6), n


# --- recipe-level runs on the tiny ViT (seconds each) ---


def test_grad_prune_on_a_vit_prunes_mlp_hidden_units():
    model = family_model("vit")
    notes: list[str] = []
    ctx = context(
        model,
        "grad-prune",
        {"epochs": 1, "max_rounds": 2, "patience": 2, "ca_drop": 1.0, "grad_samples": 16, "batch_size": 32},
    )
    ctx.callback = lambda e: notes.append(e.data["message"]) if e.kind == "note" else None
    result = RECIPES.get("grad-prune").run(ctx)
    picked = [unit for r in result.extra["rounds"] for unit in r["filters"]]
    assert len(picked) == 2 and {u.rsplit(":", 1)[0] for u in picked} <= set(VIT_FC1)
    assert result.extra["batchnorm_after"] == {n: None for n in VIT_FC1}
    modules = dict(model.net.named_modules())
    for unit in result.extra["pruned_in_kept_state"]:  # kept at zero through fine-tuning
        name, index = unit.rsplit(":", 1)
        assert modules[name].weight[int(index)].abs().sum() == 0 and modules[name].bias[int(index)] == 0
    assert any(n.startswith("kept pruning round ") for n in notes)


def test_act_edit_on_a_vit_edits_the_head_or_named_token_layers_with_tokens_as_samples():
    model = family_model("vit")
    start = copy.deepcopy(model.net.state_dict())
    result = RECIPES.get("act-edit").run(context(model, "act-edit", {"epochs": 1, "samples": 16, "batch_size": 32}))
    (edit,) = result.extra["edits"]
    assert edit["layer"] == "heads.head" and edit["columns"] == 16  # the class token: one column per image
    assert [row["phase"] for row in result.history] == ["edit", "repair"]

    model.net.load_state_dict(start)
    layer = "encoder.layers.encoder_layer_1.mlp.3"
    ctx = context(model, "act-edit", {"epochs": 0, "samples": 16, "layers": f"head,{layer}"})
    mlp, head = RECIPES.get("act-edit").run(ctx).extra["edits"]
    # (32 / 4)^2 = 64 patch tokens + the class token, each a sample of the Linear's input
    assert (mlp["layer"], mlp["columns"], mlp["dim"]) == (layer, 16 * 65, 64 + 1)
    assert mlp["residual_after"] < mlp["residual_before"]
    assert (head["layer"], head["columns"]) == ("heads.head", 16)


def test_ulrl_on_a_vit_scores_the_class_head_rows():
    model = family_model("vit")
    ctx = context(model, "ulrl", {"unlearn_epochs": 1, "epochs": 1, "batch_size": 32})
    result = RECIPES.get("ulrl").run(ctx)
    assert len(result.extra["scores"]) == 10 and result.extra["ascent_epochs"] == 1
    assert [row["phase"] for row in result.history] == ["unlearn", "flag", "relearn"]


# --- every recipe on every family ---

CHEAP: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 1, "batch_size": 32},
    "ulrl": {"unlearn_epochs": 1, "epochs": 1, "batch_size": 32},
    "sau": {"epochs": 1, "min_steps": 0, "pgd_steps": 1, "batch_size": 32},
    "tar-ewc": {"epochs": 1, "recovery_epochs": 1, "fisher_samples": 16, "batch_size": 32},
    "grad-prune": {"epochs": 1, "max_rounds": 2, "grad_samples": 16, "batch_size": 32},
    "act-edit": {"epochs": 1, "samples": 16, "batch_size": 32},
    "clp": {},
    "fine-prune": {"epochs": 1, "batch_size": 32},
    "nad": {"epochs": 1, "teacher_epochs": 1, "batch_size": 32},
    "anp": {"iterations": 2, "batch_size": 32},
    "i-bau": {"epochs": 1, "K": 2, "batch_size": 32},
}
# BatchNorm-based recipes refuse the transformer families (LayerNorm only), each in one line before any work.
NEEDS_BATCHNORM = {"clp", "anp"}


def test_every_recipe_has_a_cheap_budget_here():
    assert sorted(CHEAP) == sorted(RECIPES.names())


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(CHEAP))
def test_every_recipe_runs_on_every_transformer_family(family, name):
    model = family_model(family)
    if name in NEEDS_BATCHNORM:
        refused_before_work(model, name, CHEAP[name])
        return
    result = RECIPES.get(name).run(context(model, name, CHEAP[name]))
    assert result.kept["tag"] and result.history
    assert all(torch.isfinite(q).all() for q in model.net.parameters())
    if name == "grad-prune":
        picked = {u.rsplit(":", 1)[0] for r in result.extra["rounds"] for u in r["filters"]}
        assert picked <= set(EXPECTED[family][0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tar_ewc_takes_its_transformer_default_tau_unless_given(family):
    recipe = RECIPES.get("tar-ewc")
    params = recipe.resolve_params({})
    assert params["tau"] == 3.0
    assert recipe.for_model(family_model(family), params, set())["tau"] == 1.0
    given = recipe.resolve_params({"tau": "2.5"})
    assert recipe.for_model(family_model(family), given, {"tau"})["tau"] == 2.5
    cnn = new_model("cnn", 10, None, (3, 32, 32), None, None, {}, seed=0)
    assert recipe.for_model(cnn, params, set()) == params  # BatchNorm: not transformer-style, defaults unchanged
