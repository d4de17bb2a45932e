"""cleanse: audit image classifiers for backdoors and remove them."""
from __future__ import annotations

__version__ = "0.1.0"

from cleanse.api import evaluate, poison, train  # noqa: E402

__all__ = ["__version__", "evaluate", "poison", "train"]
