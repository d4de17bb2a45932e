"""Shared fixtures: the synthetic data and small models trained once per test session."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from cleanse.attacks import poison_dataset
from cleanse.data import make_synthetic
from cleanse.engine.train import TrainConfig, train_model
from cleanse.models import new_model
from cleanse.training_defaults import data_normalization

SMALL_WIDTH = "32,64,64"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLEANSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@functools.lru_cache(maxsize=None)
def synthetic(split: str = "train"):
    return make_synthetic(split)


def train_small(data, test=None, trigger=None, epochs: int = 8, seed: int = 0):
    mean, std = data_normalization(data)
    model = new_model("cnn", data.num_classes, data.classes, (3, 32, 32), mean, std, {"width": SMALL_WIDTH}, seed=seed)
    result = train_model(model, data, TrainConfig(epochs=epochs, seed=seed, precision="auto"), test=test, trigger=trigger)
    return model, result


@pytest.fixture(scope="session")
def badnets_setup():
    """A small cnn trained on synthetic data with 10% BadNets poisoning (target 0), plus its trigger."""
    poisoned, trigger = poison_dataset(synthetic("train"), "badnets", 0, 0.1, seed=0)
    model, result = train_small(poisoned, synthetic("test"), trigger)
    return model, trigger, result


@pytest.fixture(scope="session")
def clean_model():
    model, _ = train_small(synthetic("train"))
    return model


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
