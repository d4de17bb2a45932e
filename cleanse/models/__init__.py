"""Architectures (one registry), building them, and model checkpoint I/O.

    spec.py        ModelSpec (the checkpoint metadata), ModelOptions, presets, limits, metadata validation
    wrapper.py     ClassifierModel: the bare network + its spec, fed [0, 1] images
    build.py       registry / torchvision:NAME / file.py:factory building, argument checks, new_model
    state_dict.py  raw state dicts: .pt/.pth reading (weights_only), key prefixes
    diagnose.py    describe_mismatch: why weights do not fit a network
    load.py        load_model / save_model, command-line options reconciled with metadata

Import rule: this package reaches only `cleanse.errors`, `cleanse.files`, `cleanse.formats`, `cleanse.registry`
and `cleanse.version` outside itself; never the package face (`cleanse`) or anything above (engine, recipes,
scan, cli, api).
"""

from cleanse.models import cnn, resnet, vgg, vit  # noqa: F401  (registration)
from cleanse.models.build import build_net, check_arch_args, new_model
from cleanse.models.diagnose import describe_mismatch
from cleanse.models.load import load_model, save_model
from cleanse.models.registry import ARCHITECTURES
from cleanse.models.spec import MAX_CHANNELS, MAX_INPUT_PIXELS, PRESETS, ModelOptions, ModelSpec, parse_model_metadata
from cleanse.models.wrapper import ClassifierModel

__all__ = [
    "ARCHITECTURES",
    "MAX_CHANNELS",
    "MAX_INPUT_PIXELS",
    "PRESETS",
    "ClassifierModel",
    "ModelOptions",
    "ModelSpec",
    "build_net",
    "check_arch_args",
    "describe_mismatch",
    "load_model",
    "new_model",
    "parse_model_metadata",
    "save_model",
]
