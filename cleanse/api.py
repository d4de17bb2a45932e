"""A few engine functions at the top level for Python users; whole jobs (what each command does) are in cleanse.jobs."""

from __future__ import annotations

from typing import Any

from cleanse.attacks.poison import poison_dataset as poison
from cleanse.engine.evaluate import evaluate
from cleanse.engine.train import TrainConfig, train_model


def train(model: Any, data: Any, config: TrainConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train a ClassifierModel in place; see cleanse.engine.train.train_model."""
    return train_model(model, data, config or TrainConfig(), **kwargs)


__all__ = ["evaluate", "poison", "train"]
