"""Finding parts of a network that several recipes and detectors need."""

from __future__ import annotations

from torch import nn

from cleanse.errors import CleanseError


def class_head(net: nn.Module, num_classes: int, purpose: str = "this step") -> nn.Linear:
    """The last nn.Linear (in module order) whose outputs are the classes."""
    found = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise CleanseError(
            f"{purpose} needs the classifier head, a linear layer with {num_classes} outputs, and this model has none"
        )
    return found[-1]
