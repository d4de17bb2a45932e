"""`act-edit`: a closed-form edit of late layers maps triggered activations to clean ones, then a brief repair.

Our formulation (the paper's exact formulas were not available). For an edited
linear map W (the classifier head; optionally a conv, treated at every spatial
position as a linear map on its input patch), with X_c the layer's inputs on clean
images (columns = samples, or samples x positions) and X_t the inputs on the
triggered copies of the same images, minimise

    ||(W + D) X_t - W X_c||^2 + beta ||D X_c||^2 + lam ||D||^2

whose minimiser is D = W (X_c - X_t) X_t^T (X_t X_t^T + beta X_c X_c^T + lam I)^-1:
the first term sends the triggered inputs to the outputs the clean ones give, the
second keeps the outputs on clean inputs where they were, the third is a ridge.
A layer with a bias gets a ones row appended to X, so the bias is edited too.
The edit can cost the target class (its clean features may share the trigger's
direction), so a repair step fine-tunes the edited layers only on the clean subset.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanse.engine.device import wide_float
from cleanse.engine.trace import Hook, trace_forward
from cleanse.errors import CleanseError
from cleanse.models import ClassifierModel
from cleanse.recipes.base import (
    Param,
    Recipe,
    RecipeContext,
    RecipeResult,
    RecipeRun,
    batches,
    cosine_lr,
    register,
    repair_loss,
    steps_per_pass,
)


def edit_from_grams(
    W: torch.Tensor, g_tt: torch.Tensor, g_cc: torch.Tensor, g_ct: torch.Tensor, beta: float, lam: float
) -> torch.Tensor:
    """D = W (X_c - X_t) X_t^T (X_t X_t^T + beta X_c X_c^T + lam I)^-1 from the Gram matrices
    g_tt = X_t X_t^T, g_cc = X_c X_c^T, g_ct = X_c X_t^T; solved in float64, returned in W's dtype."""
    w = W.double()
    m = g_tt.double() + beta * g_cc.double() + lam * torch.eye(len(g_tt), dtype=torch.float64, device=g_tt.device)
    r = w @ (g_ct.double() - g_tt.double())
    return torch.linalg.solve(m, r.T).T.to(W.dtype)  # m is symmetric: D m = r  <=>  m D^T = r^T


def closed_form_edit(W: torch.Tensor, Xc: torch.Tensor, Xt: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    """The minimiser D of ||(W+D) Xt - W Xc||^2 + beta ||D Xc||^2 + lam ||D||^2 (columns of X are samples)."""
    xc, xt = Xc.double(), Xt.double()
    return edit_from_grams(W, xt @ xt.T, xc @ xc.T, xc @ xt.T, beta, lam)


def residual(W: torch.Tensor, D: torch.Tensor, Xc: torch.Tensor, Xt: torch.Tensor) -> float:
    """||(W+D) Xt - W Xc|| / ||W Xc|| (Frobenius)."""
    w, d, xc, xt = W.double(), D.double(), Xc.double(), Xt.double()
    return float(torch.linalg.norm((w + d) @ xt - w @ xc) / torch.linalg.norm(w @ xc).clamp_min(1e-30))


def residual_from_grams(
    W: torch.Tensor, D: torch.Tensor, g_tt: torch.Tensor, g_cc: torch.Tensor, g_ct: torch.Tensor
) -> float:
    """The same residual from the Gram matrices: with V = W + D,
    ||V Xt - W Xc||^2 = tr(V g_tt V^T) - 2 tr(V g_ct^T W^T) + tr(W g_cc W^T)."""
    w, v = W.double(), W.double() + D.double()
    base = (w @ g_cc.double() * w).sum()
    num = (v @ g_tt.double() * v).sum() - 2 * (v @ g_ct.double().T * w).sum() + base
    return float(num.clamp_min(0).sqrt() / base.clamp_min(1e-60).sqrt())


def layer_matrix(module: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """The layer as one matrix acting on its input columns: (out, in[, +1 for the bias])."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias.detach().unsqueeze(1)], 1) if module.bias is not None else w


@torch.no_grad()
def set_layer_matrix(module: nn.Linear | nn.Conv2d, matrix: torch.Tensor) -> None:
    n = module.weight[0].numel()
    module.weight.copy_(matrix[:, :n].reshape(module.weight.shape).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(matrix[:, n].to(module.bias.dtype))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise CleanseError(f"act-edit cannot edit a conv with padding_mode={conv.padding_mode!r}; choose another layer")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size) or any(s != 1 for s in conv.stride):
            raise CleanseError(
                "act-edit cannot edit a conv with padding='same' and an even kernel; choose another layer"
            )
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))  # type: ignore[return-value]
    return conv.padding  # type: ignore[return-value]


def input_columns(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The layer's input as columns (features[+1], samples): a Linear's rows, or a conv's patches at every position."""
    if isinstance(module, nn.Conv2d):
        x = F.unfold(inp.float(), module.kernel_size, module.dilation, _conv_padding(module), module.stride)
        cols = x.permute(1, 0, 2).reshape(x.shape[1], -1)
    else:
        cols = inp.float().reshape(-1, inp.shape[-1]).T
    if module.bias is not None:
        cols = torch.cat([cols, torch.ones(1, cols.shape[1], dtype=cols.dtype, device=cols.device)])
    return cols


def _check_editable(name: str, module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise CleanseError(f"act-edit edits Linear or Conv2d layers; {name!r} is a {type(module).__name__}")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise CleanseError(f"act-edit cannot edit the grouped conv {name!r}; choose another layer")


def _recorder(order: list[str], name: str) -> Hook:
    """A forward hook that appends `name` to `order` each time its module runs."""

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        order.append(name)

    return hook


def call_order(net: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Linear and Conv2d modules in the order a forward pass calls them."""
    order: list[str] = []
    trace_forward(
        net,
        example,
        [(m, _recorder(order, n)) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))],
    )
    return list(dict.fromkeys(order))


def resolve_layers(net: nn.Module, spec: str, example: torch.Tensor, num_classes: int) -> list[str]:
    """`spec`: comma-separated module names, `head` meaning the classifier head (the last Linear called); forward
    order."""
    order = call_order(net, example)
    modules = dict(net.named_modules())
    heads = [n for n in order if isinstance(modules[n], nn.Linear) and modules[n].out_features == num_classes]
    names = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "head":
            if not heads:
                raise CleanseError(
                    f"act-edit found no Linear layer with {num_classes} outputs; "
                    "name the layers with --param layers=NAME,..."
                )
            token = heads[-1]
        if token not in modules:
            known = ", ".join(order[-6:])
            raise CleanseError(
                f"act-edit: the model has no module {token!r}; the last Linear/Conv2d layers are: {known}"
            )
        _check_editable(token, modules[token])
        if token not in order:
            raise CleanseError(
                f"act-edit: module {token!r} is not called in the forward pass (its parent may use its weights "
                "directly, as nn.MultiheadAttention does with out_proj); choose another layer"
            )
        names.append(token)
    if not names:
        raise CleanseError("act-edit needs at least one layer to edit (--param layers=head)")
    return sorted(set(names), key=order.index)


@register
class ActEdit(Recipe):
    name = "act-edit"
    steps_in_pieces = True
    summary = "closed-form edit of late layers mapping triggered activations to clean ones, then repair of those layers"
    needs_trigger = True
    params = {
        "epochs": Param(2, "repair budget: passes over the clean subset, fine-tuning the edited layers only"),
        "layers": Param(
            "head",
            "comma-separated modules to edit, in forward order ('head' = the classifier head; e.g. layer3.conv2,head)",
        ),
        "samples": Param(
            512,
            "clean training images (classes other than the target) whose activations, "
            "and their triggered copies', set the edit",
        ),
        "beta": Param(4.0, "weight of ||D X_c||^2: keep the outputs on clean inputs unchanged"),
        "lam": Param(1e-3, "ridge on ||D||^2, relative to the mean diagonal of X_t X_t^T (scale-free)"),
        "lr": Param(0.05, "repair SGD learning rate (momentum 0.9, cosine schedule)"),
        "repair_triggered": Param(
            1.0, "weight of CE(f(T(x)), y) on the batch's triggered copies in the repair (0: clean CE only)"
        ),
        "weight_decay": Param(5e-4, "repair SGD weight decay"),
        "batch_size": Param(64, "batch size"),
        "asr_good": Param(0.01, "kept state: any held-back ASR at or below this counts as equal (then higher CA wins)"),
        "ca_margin": Param(0.02, "kept state: held-back CA within this of the start"),
        "ca_floor_drop": Param(0.10, "roll back when held-back CA falls this far below the start during repair"),
    }

    def check_model(self, model: ClassifierModel, params: dict[str, Any]) -> None:
        self._layers(model, params)

    @staticmethod
    def _layers(model: ClassifierModel, params: dict[str, Any]) -> list[str]:
        c, h, w = model.spec.input_size
        example = torch.zeros(1, c, h, w, device=model.device)
        return resolve_layers(model.net, str(params["layers"]), example, model.spec.num_classes)

    def run(self, ctx: RecipeContext) -> RecipeResult:
        names = self._layers(ctx.model, ctx.params)  # before any work
        run = RecipeRun.begin(self, ctx, asr_good=ctx.params["asr_good"])
        p, model, trigger, train = ctx.params, ctx.model, ctx.trigger, ctx.clean.train
        assert trigger is not None  # begin() refused a missing one

        rows = trigger.eligible(train.labels).nonzero().flatten()
        if len(rows) == 0:
            raise CleanseError(
                "act-edit needs clean images of classes other than the trigger's target; raise --clean-frac"
            )
        rows = rows[torch.randperm(len(rows), generator=run.gen)[: max(1, p["samples"])]].sort().values
        metrics = self._edit(run, names, train.images[rows])
        if metrics is None:
            return run.finish()
        run.result.extra["samples"] = len(rows)

        modules = dict(model.net.named_modules())
        edited = [q for n in names for q in modules[n].parameters() if q.requires_grad]
        if p["epochs"] <= 0 or not edited:
            # The repair is part of the recipe: the bare edit is a candidate for the kept state only without one.
            if p["epochs"] > 0:
                ctx.note("the edited layers have no trainable weights: no repair")
            run.offer(metrics, "edit")
        else:
            self._repair(run, edited)
        return run.finish()

    def _edit(self, run: RecipeRun, names: list[str], clean_images: torch.Tensor) -> dict[str, Any] | None:
        """The closed-form edit of each layer in `names`, in forward order (each layer's inputs are collected after the
        edits upstream of it); the held-back figures after it, or None when an edit was not finite (rolled back)."""
        ctx, p, model = run.ctx, run.ctx.params, run.model
        assert ctx.trigger is not None
        triggered_images = ctx.trigger.apply_uint8(clean_images)
        modules = dict(model.net.named_modules())
        edits, details = [], []
        for name in names:
            module = modules[name]
            g_tt, g_cc, g_ct, columns = self._grams(model, module, clean_images, triggered_images, p["batch_size"], ctx)
            solve_device = g_tt.device if g_tt.dtype == torch.float64 else torch.device("cpu")
            g_tt, g_cc, g_ct = (g.to(solve_device, torch.float64) for g in (g_tt, g_cc, g_ct))
            wm = layer_matrix(module).to(solve_device, torch.float64)
            lam = p["lam"] * float(torch.diagonal(g_tt).mean())
            d = edit_from_grams(wm, g_tt, g_cc, g_ct, p["beta"], lam)
            if not torch.isfinite(d).all():
                run.rollback(f"the edit of {name} is not finite")
                return None
            before = residual_from_grams(wm, torch.zeros_like(d), g_tt, g_cc, g_ct)
            after = residual_from_grams(wm, d, g_tt, g_cc, g_ct)
            set_layer_matrix(module, (wm + d).to(module.weight.device))
            edits.append(
                {
                    "layer": name,
                    "kind": "conv" if isinstance(module, nn.Conv2d) else "linear",
                    "dim": int(wm.shape[1]),
                    "columns": columns,
                    "residual_before": before,
                    "residual_after": after,
                    "relative_change": float(torch.linalg.norm(d) / torch.linalg.norm(wm).clamp_min(1e-30)),
                }
            )
            details.append(f"{name}: residual {before:.2f} -> {after:.2f}")
        metrics = run.measure()
        run.row("edit", 0, **metrics, detail="edited " + "; ".join(details))
        run.result.extra["edits"] = edits
        return metrics

    @staticmethod
    def _repair(run: RecipeRun, edited: list[torch.nn.Parameter]) -> None:
        """Repair: the edited layers only, on the clean subset; BatchNorm statistics stay put (eval mode)."""
        ctx, p, model, train = run.ctx, run.ctx.params, run.model, run.ctx.clean.train
        assert ctx.trigger is not None
        # The repair keeps the edit's own objective as a term: with clean CE alone the backdoor came back
        # (docs/recipes/act-edit.md, step 5).
        triggered_all = ctx.trigger.apply_uint8(train.images) if p["repair_triggered"] else None
        eligible = ctx.trigger.eligible(train.labels)
        edited_ids = {id(q) for q in edited}
        others = [q for q in model.net.parameters() if q.requires_grad and id(q) not in edited_ids]
        optimizer = torch.optim.SGD(edited, lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"], nesterov=True)
        total, step = p["epochs"] * steps_per_pass(len(train), p["batch_size"]), 0
        for q in others:
            q.requires_grad_(False)
        try:
            for epoch in range(1, p["epochs"] + 1):
                model.eval()
                loss_sum, seen = torch.zeros((), device=ctx.device), 0
                for x, y, idx in batches(train, p["batch_size"], run.gen, ctx.device):
                    cosine_lr(optimizer, p["lr"], step, total)
                    # the batch's triggered rows, which its pieces share
                    count = int(eligible[idx].sum()) if triggered_all is not None else 0

                    def losses(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int = count) -> tuple:
                        ce = functools.partial(run.batch_ce, count=count)
                        rows = idx[eligible[idx]] if triggered_all is not None else idx[:0]
                        weight = p["repair_triggered"]
                        return (repair_loss(model, x, y, triggered_all, rows, train.labels, ctx.device, weight, ce),)

                    stepped = run.step_pieces(optimizer, x, y, idx, losses, images_per_row=2)
                    if stepped is None:
                        return
                    (loss,) = stepped
                    step += 1
                    loss_sum, seen = loss_sum + loss.detach() * len(y), seen + len(y)
                metrics = run.measure()
                run.row("repair", epoch, loss=float(loss_sum) / max(1, seen), **metrics)
                if run.judge(metrics, f"repair epoch {epoch}"):
                    return
        finally:
            for q in others:
                q.requires_grad_(True)

    @staticmethod
    @torch.no_grad()
    def _grams(
        model: nn.Module,
        module: nn.Module,
        clean: torch.Tensor,
        triggered: torch.Tensor,
        batch_size: int,
        ctx: RecipeContext,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """X_t X_t^T, X_c X_c^T, X_c X_t^T of the layer's input columns (float64 where the device has it; eval mode),
        and the column count."""
        model.eval()
        dtype = wide_float(ctx.device)
        captured: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, args, _o: captured.append(input_columns(module, args[0])))
        grams: list[Any] = [0, 0, 0]
        columns = 0
        try:
            for start in range(0, len(clean), batch_size):
                for images in (clean, triggered):
                    model(images[start : start + batch_size].to(ctx.device).permute(0, 3, 1, 2).float().div_(255))
                xc, xt = (t.to(dtype) for t in captured)
                captured.clear()
                grams[0] = grams[0] + xt @ xt.T
                grams[1] = grams[1] + xc @ xc.T
                grams[2] = grams[2] + xc @ xt.T
                columns += xc.shape[1]
        finally:
            handle.remove()
        return grams[0], grams[1], grams[2], columns
