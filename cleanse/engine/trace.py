"""One traced forward pass: what the architecture-discovery helpers (Grad-CAM layers, act-edit's call order,
grad-prune's conv -> BatchNorm pairs) all need."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, Any], None]


def trace_forward(net: nn.Module, example: torch.Tensor, hooks: Iterable[tuple[nn.Module, Hook]]) -> None:
    """Run `net` once on `example` in eval mode without gradients, with each forward hook attached.

    The hooks are removed and the training mode restored whatever happens, so tracing never changes the
    model (eval mode also keeps BatchNorm statistics untouched).
    """
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
