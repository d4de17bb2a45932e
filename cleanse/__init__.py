"""cleanse: audit image classifiers for backdoors and remove them."""

from __future__ import annotations

from cleanse.api import evaluate, poison, train
from cleanse.version import __version__

__all__ = ["__version__", "evaluate", "poison", "train"]
