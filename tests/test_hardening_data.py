"""Hardening, data: data sets and image files through the real CLI (unreadable images, decompression bombs, pickles,
class counts and image sizes that do not fit the model), and property-based tests of triggers stamped on uint8 images.

The corpus cases (tests/hardening_corpus.py, DATA_CASES) repeat through the CLI cases covered at the Python level in
tests/test_data.py, because the CLI is where exit codes and leftovers are decided.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hardening_corpus import DATA_CASES, Case, check_bad_input
from helpers import FAST
from hypothesis import given
from hypothesis import strategies as st

from cleanse.attacks.trigger import Trigger
from cleanse.errors import CleanseError


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_input(case: Case, inp: dict[str, Path], tmp_path: Path) -> None:
    check_bad_input(case, inp, tmp_path)


# --- property-based: triggers on uint8 images ------------------------------------------------------------------------

images_strategy = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))


def random_images(shape: tuple[int, int, int, int]) -> torch.Tensor:
    n, h, w, seed = shape
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@FAST
@given(shape=images_strategy, alpha=st.floats(0, 1), pattern_seed=st.integers(0, 1000))
def test_blend_trigger_on_uint8_images(shape: tuple[int, int, int, int], alpha: float, pattern_seed: int) -> None:
    images = random_images(shape)
    h, w = images.shape[1:3]
    pattern = torch.rand(3, h, w, generator=torch.Generator().manual_seed(pattern_seed))

    def apply(mask: torch.Tensor) -> torch.Tensor:
        return Trigger("blend", {"mask": mask, "pattern": pattern}, 0, (3, h, w)).apply_uint8(images)

    out = apply(torch.full((h, w), alpha))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(apply(torch.zeros(h, w)), images)  # mask 0: identity
    stamped = torch.round(pattern * 255).to(torch.uint8).permute(1, 2, 0).expand_as(images)
    assert torch.equal(apply(torch.ones(h, w)), stamped)  # mask 1: the pattern, rounded half to even


@FAST
@given(shape=images_strategy, scale=st.floats(-3, 3), delta_seed=st.integers(0, 1000))
def test_additive_trigger_stays_in_range(shape: tuple[int, int, int, int], scale: float, delta_seed: int) -> None:
    images = random_images(shape)
    h, w = images.shape[1:3]
    delta = (torch.rand(3, h, w, generator=torch.Generator().manual_seed(delta_seed)) - 0.5) * scale
    out = Trigger("additive", {"delta": delta}, 0, (3, h, w)).apply_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    expected = (images.float() + delta.permute(1, 2, 0) * 255).round().clamp(0, 255)
    assert torch.equal(out.float(), expected)


@FAST
@given(shape=images_strategy, size=st.integers(1, 7))
def test_trigger_for_another_size_is_refused(shape: tuple[int, int, int, int], size: int) -> None:
    images = random_images(shape)
    h, w = images.shape[1:3]
    trigger = Trigger(
        "blend", {"mask": torch.zeros(size, size), "pattern": torch.zeros(3, size, size)}, 0, (3, size, size)
    )
    if (h, w) == (size, size):
        assert torch.equal(trigger.apply_uint8(images), images)
    else:
        with pytest.raises(CleanseError, match="use a trigger for this image size"):
            trigger.apply_uint8(images)
