"""`clp`: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free.

For a conv whose output channels a BatchNorm normalises, channel k computes (up to its shift)

    y_k = gamma_k / sqrt(var_k + eps) * (W_k * x)

so its Lipschitz constant is at most the upper bound (UCLC)

    UCLC_k = |gamma_k| / sqrt(var_k + eps) * sigma_max(W_k)

with W_k the k-th filter reshaped to (in_channels, kh * kw) and sigma_max its largest singular value. Within each
layer, the channels with UCLC_k > mean + u * std (std with Bessel's correction, as torch's default) are pruned: the
BatchNorm's gamma_k and beta_k are zeroed, so the channel outputs 0. No data is read; with --data the held-back
images only report the figures and guard the state kept.

Which BatchNorm follows which conv comes from tracing one forward pass (cleanse/recipes/units.py): the conv's
output must reach the BatchNorm directly or through channel-wise modules (pooling, activations), not through a
residual sum. Convs without one are left alone; a model with none (ViT, Swin, ConvNeXt) is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.base import Param, Recipe, RecipeContext, RecipeResult, RecipeRun, register
from cleanse.recipes.units import trace_units

NO_CONV_BN = (
    "clp needs convolutions followed by a BatchNorm (it bounds each channel by the conv filter scaled by the "
    "BatchNorm's gamma/std) and this model has none; "
    "use --method tar-ewc with a trigger (cleanse scan reverses one) or fine-prune"
)


def channel_bounds(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """UCLC of each output channel: sigma_max(W_k) * |gamma_k| / sqrt(var_k + eps), float32 on the CPU."""
    weight = conv.weight.detach().float().cpu()
    spectral = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1), ord=2)
    assert bn.running_var is not None and bn.weight is not None  # follower BatchNorms are affine with statistics
    scale = bn.weight.detach().float().cpu().abs() / (bn.running_var.detach().float().cpu() + bn.eps).sqrt()
    return spectral * scale


def outlying_channels(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of the channels whose bound exceeds mean + u * std within the layer."""
    return (bounds > bounds.mean() + u * bounds.std()).nonzero().flatten()


def conv_bn_pairs(model: ClassifierModel) -> tuple[dict[str, str], list[str]]:
    """({learned conv: the BatchNorm that follows it}, [learned convs without one]), in module order."""
    c, h, w = model.spec.input_size
    trace = trace_units(model.net, torch.zeros(1, c, h, w, device=model.device))
    convs = [n for n, m in trace.layers.items() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    pairs = {n: f for n in convs if (f := trace.follower[n]) is not None}
    return pairs, [n for n in convs if n not in pairs]


@register
class Clp(Recipe):
    name = "clp"
    summary = "data-free: prune the conv channels whose Lipschitz upper bound is an outlier in their layer"
    needs_data = False
    params = {
        "u": Param(3.0, "prune channels whose bound exceeds the layer's mean + u * std"),
        "ca_margin": Param(0.02, "with --data: kept state's held-back CA within this of the best (as every recipe)"),
        "ca_floor_drop": Param(
            0.10, "with --data: keep the model unchanged when pruning costs more held-back CA than this"
        ),
    }

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        if not conv_bn_pairs(model)[0]:
            raise CleanseError(NO_CONV_BN)

    def run(self, ctx: RecipeContext) -> RecipeResult:
        pairs, alone = conv_bn_pairs(ctx.model)
        if not pairs:
            raise CleanseError(NO_CONV_BN)
        run = RecipeRun.begin(self, ctx)
        modules = dict(ctx.model.net.named_modules())
        pruned: dict[str, list[int]] = {}
        bounds: dict[str, dict[str, float]] = {}
        for conv_name, bn_name in pairs.items():
            conv, bn = modules[conv_name], modules[bn_name]
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            uclc = channel_bounds(conv, bn)
            idx = outlying_channels(uclc, ctx.params["u"])
            bounds[conv_name] = {"mean": float(uclc.mean()), "std": float(uclc.std()), "max": float(uclc.max())}
            if len(idx):
                pruned[conv_name] = idx.tolist()
                with torch.no_grad():
                    assert bn.weight is not None and bn.bias is not None
                    bn.weight.index_fill_(0, idx.to(bn.weight.device), 0.0)
                    bn.bias.index_fill_(0, idx.to(bn.bias.device), 0.0)
        total = sum(len(v) for v in pruned.values())
        if alone:
            ctx.note(f"clp left {len(alone)} conv(s) without a following BatchNorm alone: {', '.join(alone)}")
        metrics = run.measure()
        run.row("prune", 1, **metrics, detail=f"pruned {total} channels in {len(pruned)} of {len(pairs)} layers")
        if not run.judge(metrics, "pruned"):
            ctx.note(f"clp pruned {total} channels (u = {ctx.params['u']:g})")
        result = run.finish()
        result.extra.update(
            {
                "pruned": {n: pruned.get(n, []) for n in pairs},
                "batchnorm_after": pairs,
                "without_batchnorm": alone,
                "bounds": bounds,
            }
        )
        return result
