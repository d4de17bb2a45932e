"""Architectures (one registry) and checkpoint I/O."""
from cleanse.models import cnn, resnet, vgg  # noqa: F401  (registration)
from cleanse.models.checkpoint import (PRESETS, ClassifierModel, ModelOptions, ModelSpec, build_net, load_model,
                                       new_model, save_model)
from cleanse.models.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "PRESETS", "ClassifierModel", "ModelOptions", "ModelSpec", "build_net", "load_model",
           "new_model", "save_model"]
