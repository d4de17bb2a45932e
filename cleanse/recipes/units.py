"""Prunable units, found by tracing one forward pass: what `grad-prune` may zero.

A unit is one output channel of a Conv2d or one output feature (row) of a Linear whose zeroing silences one
feature without mixing into the others. Following a layer's output through the forward pass, the unit is
silenced when the output reaches

- a BatchNorm (per-channel: zeroing its gamma and beta as well makes the channel exactly 0), or
- a pointwise activation whose value at 0 is 0 (ReLU, GELU, SiLU, ...; checked by evaluating it at 0): with the
  filter or row and its bias zeroed, the unit outputs act(0) = 0 and the next layer sees nothing of it,

passing only through channel-wise modules (pooling, dropout, identity, activations) and residual sums. It mixes
when the output reaches a LayerNorm, GroupNorm or RMSNorm: these normalise across channels, so a zeroed channel
shifts every other channel's statistics. A layer is prunable when its units are silenced somewhere and mix
nowhere, and its weights are learned (a frozen layer, like `cnn`'s whitening, is preprocessing, not a feature).

What this gives, without any list of module names:
- CNNs: every learned conv whose output reaches a BatchNorm or an activation (`cnn`, `resnet18`, `vgg11-bn`: every
  learned conv; `preact-resnet18`: every conv, `conv2` and the shortcut convs through their residual sums);
- ViT, Swin, ConvNeXt: the MLP hidden units (the first Linear of each MLP, which feeds a GELU). Patch embeddings
  are out (reshaped into tokens, or normalised by a LayerNorm), as are depthwise convs followed by a LayerNorm,
  the MLPs' second Linear and attention projections (they write into the residual stream, which a LayerNorm
  reads) and the classifier head (its output reaches nothing).

The BatchNorm a unit layer's channels reach directly (through channel-wise modules only, not a residual sum: zeroing
a BatchNorm after `conv + shortcut` would cut the shortcut's channel too) is its *follower*, zeroed with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cleanse.engine.trace import trace_forward

# Modules that act on each channel separately: a unit's zero passes through them as a zero of the same channel.
CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
# Pointwise activations; the ones whose value at 0 is 0 silence a zeroed unit (the others pass it on).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Sigmoid,
    nn.Tanh,
)
# Normalisations across channels: a zeroed channel changes the others' statistics.
MIXING_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
)
# The same ops called as functions (by torch function name), outside a module.
_FUNCTIONAL_ACTIVATIONS = frozenset(
    {"relu", "relu_", "gelu", "silu", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "hardswish", "hardtanh"}
)
_FUNCTIONAL_MIXING = frozenset({"layer_norm", "group_norm", "rms_norm"})
_SUMS = frozenset({"add", "add_", "sub", "sub_", "__add__", "__iadd__", "__radd__", "__sub__", "__isub__"})

UnitLayer = nn.Conv2d | nn.Linear


@dataclass
class UnitTrace:
    """What one traced forward pass says about every Conv2d and Linear the network calls as a module."""

    layers: dict[str, UnitLayer] = field(default_factory=dict)  # in module order
    follower: dict[str, str | None] = field(default_factory=dict)  # the BatchNorm its channels reach directly
    silenced: set[str] = field(default_factory=set)  # reaches a BatchNorm or an activation with act(0) = 0
    mixed: set[str] = field(default_factory=set)  # reaches a LayerNorm/GroupNorm/RMSNorm

    def prunable(self) -> dict[str, UnitLayer]:
        """The layers whose units grad-prune may zero, in module order."""
        return {
            n: m
            for n, m in self.layers.items()
            if n in self.silenced and n not in self.mixed and m.weight.requires_grad
        }


def _zero_preserving(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    with torch.no_grad():
        return bool(fn(torch.zeros(1)).eq(0).all())


class _Flow(TorchFunctionMode):
    """Which unit layers' channels each tensor of the traced pass carries.

    Module hooks (`hook`) start a flow at each Conv2d/Linear output and carry it through channel-wise modules; this
    mode carries it through residual sums and functional activations, and sees functional LayerNorms.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.modules = modules
        self.names = {id(m): n for n, m in modules.items()}
        self.result = UnitTrace()
        # id(tensor) -> (the unit layers whose channels it carries, whether a residual sum came between)
        self.carries: dict[int, tuple[frozenset[str], bool]] = {}
        self.alive: list[Any] = []  # tensors that carry a flow stay referenced, so their ids are not reused
        self._zero_ok: dict[int, bool] = {}  # per activation module

    def _reach(self, tensor: Any) -> tuple[frozenset[str], bool] | None:
        return self.carries.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def _pass(self, out: Any, flow: tuple[frozenset[str], bool]) -> None:
        if isinstance(out, torch.Tensor):
            self.alive.append(out)
            self.carries[id(out)] = flow

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _SUMS and isinstance(out, torch.Tensor):
            flows = [f for a in args if (f := self._reach(a)) is not None and a.shape == out.shape]
            if flows:
                self._pass(out, (frozenset().union(*(f[0] for f in flows)), True))
        elif args and (flow := self._reach(args[0])) is not None:
            if name in _FUNCTIONAL_ACTIVATIONS:
                if _zero_preserving(lambda z: func(z, *args[1:], **kwargs)):
                    self.result.silenced.update(flow[0])
                self._pass(out, flow)
            elif name in _FUNCTIONAL_MIXING:
                self.result.mixed.update(flow[0])
        return out

    def hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        name = self.names[id(module)]
        flow = self._reach(args[0])
        r = self.result
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            r.layers.setdefault(name, module)
            r.follower.setdefault(name, None)
            self._pass(out, (frozenset({name}), False))
        elif flow is None:
            return
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            r.silenced.update(flow[0])
            sources, summed = flow
            source = next(iter(sources)) if len(sources) == 1 and not summed else None
            if (
                source is not None
                and r.follower.get(source) is None
                and self._channels_on_axis_1(source, out)
                and module.num_features == out.shape[1]
                and module.affine
            ):
                r.follower[source] = name
        elif isinstance(module, MIXING_NORMS):
            r.mixed.update(flow[0])
        elif isinstance(module, ACTIVATIONS):
            if id(module) not in self._zero_ok:
                self._zero_ok[id(module)] = _zero_preserving(module.forward)
            if self._zero_ok[id(module)]:
                r.silenced.update(flow[0])
            self._pass(out, flow)
        elif isinstance(module, CHANNELWISE):
            self._pass(out, flow)

    def _channels_on_axis_1(self, source: str, out: torch.Tensor) -> bool:
        """A BatchNorm normalises axis 1: a conv's channels are there; a Linear's features only for (B, C) outputs."""
        return isinstance(self.result.layers[source], nn.Conv2d) or out.dim() == 2


def trace_units(net: nn.Module, example: torch.Tensor) -> UnitTrace:
    """Trace one forward pass of `net` on `example` (eval mode, no gradients; the model is left unchanged)."""
    modules = dict(net.named_modules())
    flow = _Flow(modules)
    leaves = [(m, flow.hook) for m in modules.values() if not list(m.children())]
    with flow:
        trace_forward(net, example, leaves)
    order = list(modules)
    flow.result.layers = dict(sorted(flow.result.layers.items(), key=lambda item: order.index(item[0])))
    return flow.result


def prunable_units(net: nn.Module, example: torch.Tensor) -> dict[str, UnitLayer]:
    """The Conv2d and Linear layers whose output channels/features grad-prune may zero, in module order."""
    return trace_units(net, example).prunable()
