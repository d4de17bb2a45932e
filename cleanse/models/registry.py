"""The architecture registry: name -> factory(num_classes, **args) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cleanse.registry import Registry

ArchFactory = Callable[..., nn.Module]
ARCHITECTURES: Registry[ArchFactory] = Registry("architecture")
