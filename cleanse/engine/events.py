"""Progress events: the engine never prints, it calls a callback that the CLI renders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    kind: str  # "start" | "row" | "note" | "end"
    data: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[Event], None]


def silent(_: Event) -> None:
    """The default callback: report nothing."""
