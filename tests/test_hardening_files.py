"""Hardening, damaged and crafted files: model and trigger files through the real CLI, and property-based tests that the
safetensors, model-metadata and trigger-metadata parsers never raise anything but CleanseError.

The corpus cases (tests/hardening_corpus.py, FILE_CASES) repeat through the CLI cases covered at the Python level in
tests/test_files_and_models.py and tests/test_raw_models.py, because the CLI is where exit codes and leftovers are
decided.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hardening_corpus import CASES, FILE_CASES, Case, check_bad_input
from helpers import FAST, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from cleanse.attacks.trigger import Trigger, trigger_from_contents
from cleanse.errors import CleanseError
from cleanse.files import parse_safetensors, read_cleanse_metadata
from cleanse.models import parse_model_metadata


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_bad_input(case: Case, inp: dict[str, Path], tmp_path: Path) -> None:
    check_bad_input(case, inp, tmp_path)


def test_corpus_is_large_and_ids_are_unique() -> None:  # the whole corpus: files, data and CLI arguments
    assert len({c.id for c in CASES}) == len(CASES) >= 100


# --- property-based: parsers never raise anything but CleanseError --------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
GOOD_MODEL_DOC = tiny_model(3).spec.to_metadata()
MODEL_KEYS = sorted(GOOD_MODEL_DOC) + ["arch.name", "arch.args", "normalization.mean", "normalization.std"]


def mutate(doc: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    outer, _, inner = key.partition(".")
    if inner and isinstance(doc.get(outer), dict):
        doc[outer][inner] = value
    else:
        doc[outer] = value
    return doc


@FAST
@given(
    text=st.text(max_size=40) | json_values.map(json.dumps),
    other=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
)
def test_cleanse_metadata_parsing_only_raises_cleanse_error(text: str, other: dict[str, str]) -> None:
    try:
        doc = read_cleanse_metadata({**other, "cleanse": text}, "f.safetensors")
    except CleanseError as exc:
        assert "\n" not in exc.message
    else:
        assert isinstance(doc, dict)


@FAST
@given(
    key=st.sampled_from(MODEL_KEYS),
    value=json_values,
    whole=st.booleans(),
    doc=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)
def test_model_metadata_validation_only_raises_cleanse_error(
    key: str, value: Any, whole: bool, doc: dict[str, Any]
) -> None:
    from cleanse.models import check_arch_args

    candidate = doc if whole else mutate(GOOD_MODEL_DOC, key, value)
    try:
        spec = parse_model_metadata(candidate, "m.safetensors")
        check_arch_args(spec.arch, spec.arch_args)
    except CleanseError as exc:
        assert "\n" not in exc.message
    else:
        c, h, w = spec.input_size
        assert spec.num_classes == len(spec.classes) >= 1 and c == len(spec.mean) == len(spec.std) and h >= 1 and w >= 1
        assert all(math.isfinite(v) for v in spec.mean + spec.std) and min(spec.std) > 0


GOOD_TRIGGER = Trigger("blend", {"mask": torch.zeros(8, 8), "pattern": torch.ones(3, 8, 8)}, 1, (3, 8, 8), "badnets")
TRIGGER_KEYS = [
    "format",
    "format_version",
    "kind",
    "target",
    "input_size",
    "origin",
    "params",
    "attack",
    "align_corners",
]


@FAST
@given(key=st.sampled_from(TRIGGER_KEYS), value=json_values, drop=st.sampled_from([None, "mask", "pattern"]))
def test_trigger_metadata_validation_only_raises_cleanse_error(key: str, value: Any, drop: str | None) -> None:
    doc = {**GOOD_TRIGGER.metadata(), key: value}
    tensors = {k: v for k, v in GOOD_TRIGGER.tensors.items() if k != drop}
    try:
        trigger = trigger_from_contents(tensors, doc, "t.safetensors")
        trigger.check_classes(10)
    except CleanseError as exc:
        assert "\n" not in exc.message
    else:
        assert trigger.kind == "blend" and trigger.input_size == (3, 8, 8)


@FAST
@given(raw=st.binary(max_size=200))
def test_safetensors_parsing_of_arbitrary_bytes(raw: bytes) -> None:
    try:
        tensors, metadata = parse_safetensors(raw, "x.safetensors")
    except CleanseError as exc:
        assert "\n" not in exc.message
    else:
        assert isinstance(tensors, dict) and isinstance(metadata, dict)


header_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "U8", "I64", "BOOL", "F16", "Q1"]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 40), min_size=2, max_size=2) | json_values,
    },
)


@FAST
@given(
    entries=st.dictionaries(st.text(max_size=5), header_entries | json_values, max_size=3),
    body=st.binary(max_size=48),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
    metadata=st.none() | json_values,
)
def test_safetensors_parsing_of_crafted_headers(
    entries: dict[str, Any], body: bytes, length_delta: int, metadata: Any
) -> None:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", max(0, len(text) + length_delta)) + text + body
    try:
        tensors, meta = parse_safetensors(raw, "x.safetensors")
    except CleanseError as exc:
        assert "\n" not in exc.message
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and all(
            isinstance(v, str) for v in meta.values()
        )
