"""Each attack's output checked pixel-exactly on hand-made inputs, plus the poisoning rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cleanse.attacks import ATTACKS, Trigger, load_trigger, poison_dataset
from cleanse.attacks.wanet import identity_grid
from cleanse.data import Dataset
from cleanse.data.synthetic import make_synthetic
from cleanse.errors import CleanseError


def tiny_dataset(n_per_class: int = 10, classes: int = 4, size: int = 32, value: int = 0) -> Dataset:
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.full((len(labels), size, size, 3), value, dtype=torch.uint8)
    return Dataset(images, labels, [f"c{i}" for i in range(classes)], "tiny")


def make(attack: str, hw: int = 32, **params: str) -> Trigger:
    spec = ATTACKS.get(attack)
    return spec.make_trigger(spec.parse_params(params), 3, hw, hw, torch.Generator().manual_seed(0))


def test_badnets_default_patch_is_3x3_white_at_rows_and_cols_28_to_30():
    out = make("badnets").apply_uint8(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))[0]
    expected = torch.zeros(32, 32, 3, dtype=torch.uint8)
    expected[28:31, 28:31] = 255
    assert torch.equal(out, expected)


def test_badnets_scales_with_image_size_and_takes_colour_and_position():
    out = make("badnets", hw=64).apply_uint8(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))[0]
    expected = torch.zeros(64, 64, 3, dtype=torch.uint8)
    expected[56:62, 56:62] = 255  # 6x6 patch, 2-pixel margin
    assert torch.equal(out, expected)
    out = make("badnets", color="10,20,30", position="top-left", size="2").apply_uint8(
        torch.full((1, 32, 32, 3), 7, dtype=torch.uint8)
    )[0]
    assert out[1, 1].tolist() == [10, 20, 30] and out[2, 2].tolist() == [10, 20, 30]
    assert out[0, 0].tolist() == [7, 7, 7] and out[3, 3].tolist() == [7, 7, 7]
    assert int((out != 7).any(-1).sum()) == 4


def test_badnets_rejects_a_patch_that_does_not_fit():
    with pytest.raises(CleanseError, match="does not fit"):
        make("badnets", position="30,30", size="4")
    with pytest.raises(CleanseError, match="has no parameter 'colour'"):
        make("badnets", colour="1")


def test_blend_rounds_half_to_even():
    trig = Trigger("blend", {"mask": torch.full((2, 2), 0.5), "pattern": torch.ones(3, 2, 2)}, 0, (3, 2, 2))
    x = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).view(1, 2, 2, 1).expand(1, 2, 2, 3).contiguous()
    # 0.5*x + 127.5: 127.5 -> 128, 128.0 -> 128, 128.5 -> 128, 129.0 -> 129
    assert trig.apply_uint8(x)[0, ..., 0].flatten().tolist() == [128, 128, 128, 129]


def test_blended_alpha_blend_matches_hand_computation():
    trig = make("blended", alpha="0.2")
    pattern = trig.tensors["pattern"]
    x = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = np.clip(
        np.round(0.8 * x.numpy().astype(np.float64) + 0.2 * 255 * pattern.permute(1, 2, 0).numpy()), 0, 255
    )
    diff = np.abs(trig.apply_uint8(x).numpy().astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float32 vs float64 only at exact .5 ties
    assert torch.equal(trig.tensors["mask"], torch.full((32, 32), 0.2))
    assert trig.region_mask() is not None and not trig.region_mask().any()  # full-image trigger: no TAR region


def test_sig_adds_the_sinusoid_and_clips():
    trig = make("sig")
    x = torch.full((1, 32, 32, 3), 100, dtype=torch.uint8)
    out = trig.apply_uint8(x)[0, 5, :, 0].numpy().astype(int)
    cols = np.arange(32)
    expected = np.clip(np.round(100 + 40 * np.sin(2 * math.pi * cols * 6 / 32)), 0, 255).astype(int)
    assert np.array_equal(out, expected)
    assert out[0] == 100 and out[16] == 100  # sin(0) = sin(6*pi) = 0
    assert trig.apply_uint8(torch.full((1, 32, 32, 3), 250, dtype=torch.uint8)).max() == 255


def test_warp_identity_grid_is_exact_and_a_one_pixel_shift_moves_pixels():
    x = torch.randint(0, 256, (1, 8, 8, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    same = Trigger("warp", {"grid": identity_grid(8, 8)}, 0, (3, 8, 8))
    assert torch.equal(same.apply_uint8(x), x)
    shifted = identity_grid(8, 8).clone()
    shifted[..., 0] += 2 / 7  # one pixel to the right with align_corners=True
    out = Trigger("warp", {"grid": shifted}, 0, (3, 8, 8)).apply_uint8(x)
    assert torch.equal(out[:, :, :7], x[:, :, 1:])
    assert torch.equal(out[:, :, 7], x[:, :, 7])  # border padding


def test_wanet_grid_is_a_small_smooth_warp():
    trig = make("wanet")
    offset = (trig.tensors["grid"] - identity_grid(32, 32)).abs()
    assert trig.kind == "warp" and 0 < offset.max() < 0.1


def test_poison_replaces_rows_in_place_from_non_target_classes():
    data = tiny_dataset()
    poisoned, trig = poison_dataset(data, "badnets", 1, 0.25, seed=3)
    assert len(poisoned) == len(data) == 40
    idx = poisoned.poisoned.nonzero().flatten()
    assert len(idx) == 10
    assert (poisoned.original_labels[idx] != 1).all() and (poisoned.labels[idx] == 1).all()
    assert torch.equal(poisoned.original_labels, data.labels)
    assert (poisoned.images[idx][:, 28:31, 28:31] == 255).all()
    untouched = (~poisoned.poisoned).nonzero().flatten()
    assert torch.equal(poisoned.images[untouched], data.images[untouched])


def test_poison_all_to_all_shifts_labels():
    poisoned, trig = poison_dataset(tiny_dataset(), "badnets", "all", 0.5, seed=0)
    idx = poisoned.poisoned.nonzero().flatten()
    assert torch.equal(poisoned.labels[idx], (poisoned.original_labels[idx] + 1) % 4)
    assert trig.target == {"all_to_all": {"shift": 1}}


def test_sig_is_clean_label_and_bounded_by_the_target_class_share():
    data = tiny_dataset()
    poisoned, _ = poison_dataset(data, "sig", 2, 0.25, seed=0)
    idx = poisoned.poisoned.nonzero().flatten()
    assert len(idx) == 10 and (data.labels[idx] == 2).all() and torch.equal(poisoned.labels, data.labels)
    with pytest.raises(CleanseError, match=r"lower --rate to at most 0.2500"):
        poison_dataset(data, "sig", 2, 0.3, seed=0)
    with pytest.raises(CleanseError, match="clean-label"):
        poison_dataset(data, "sig", "all", 0.1, seed=0)


def test_wanet_marks_noise_rows_separately():
    data = tiny_dataset(value=128)
    data.images = torch.randint(
        0, 256, data.images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    poisoned, _ = poison_dataset(data, "wanet", 0, 0.1, seed=0)
    assert int(poisoned.poisoned.sum()) == 4 and int(poisoned.noise.sum()) == 8
    assert not (poisoned.poisoned & poisoned.noise).any()
    noise = poisoned.noise.nonzero().flatten()
    assert torch.equal(poisoned.labels[noise], data.labels[noise])


def test_same_seed_same_tensors_other_seed_differs():
    a, _ = poison_dataset(tiny_dataset(), "blended", 0, 0.2, seed=5)
    b, _ = poison_dataset(tiny_dataset(), "blended", 0, 0.2, seed=5)
    c, _ = poison_dataset(tiny_dataset(), "blended", 0, 0.2, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.poisoned, b.poisoned)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_bad_rates_are_refused(rate):
    with pytest.raises(CleanseError, match="--rate"):
        poison_dataset(tiny_dataset(), "badnets", 0, rate)


def test_bad_targets_are_refused():
    with pytest.raises(CleanseError, match="out of range"):
        poison_dataset(tiny_dataset(), "badnets", 9, 0.1)
    with pytest.raises(CleanseError, match="not a class index"):
        poison_dataset(tiny_dataset(), "badnets", "cat", 0.1)
    with pytest.raises(CleanseError, match="unknown attack 'nope'; choose one of: badnets, blended, sig, wanet"):
        poison_dataset(tiny_dataset(), "nope", 0, 0.1)


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet"])
def test_trigger_file_round_trip(tmp_path, attack):
    _, trig = poison_dataset(tiny_dataset(), attack, 0 if attack != "sig" else 1, 0.1, seed=0)
    trig.save(tmp_path / "t.safetensors")
    back = load_trigger(tmp_path / "t.safetensors")
    assert back.kind == trig.kind and back.target == trig.target and back.attack == attack and back.origin == "poison"
    for key, value in trig.tensors.items():
        assert torch.equal(back.tensors[key], value.float())
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(back.apply_uint8(x), trig.apply_uint8(x))


def test_trigger_for_another_image_size_is_refused():
    trig = make("badnets")
    with pytest.raises(CleanseError, match="trigger was made for 3x32x32 images but the images are 3x64x64"):
        trig.apply_uint8(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


def test_badnets_and_blended_take_a_user_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (5, 5), (10, 200, 30)).save(tmp_path / "p.png")
    patch = make("badnets", image=str(tmp_path / "p.png")).apply_uint8(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))[0]
    assert patch[28, 28].tolist() == [10, 200, 30] and patch[27, 27].tolist() == [0, 0, 0]
    blend = make("blended", image=str(tmp_path / "p.png"), alpha="1.0").apply_uint8(
        torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    )[0]
    assert blend[0, 0].tolist() == [10, 200, 30] and blend[31, 31].tolist() == [10, 200, 30]
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(CleanseError, match="cannot read the patch image"):
        make("badnets", image=str(tmp_path / "bad.png"))


def test_rows_triggered_at_once_are_bounded_by_their_float32_size():
    from cleanse.attacks.trigger import rows_at_once

    assert rows_at_once((32, 32, 3), 1024) == 1024  # 12 KiB per row: the cap
    assert rows_at_once((224, 224, 3), 1024) == 111  # 588 KiB per row: 64 MiB // 602,112 bytes
    assert rows_at_once((224, 224, 3), 50) == 50
    assert rows_at_once((8192, 8192, 3), 1024) == 1


@pytest.mark.parametrize("attack", ["badnets", "wanet", "sig"])
def test_apply_uint8_triggers_large_sets_in_bounded_chunks_with_the_same_bytes(attack, monkeypatch):
    import cleanse.attacks.trigger as trigger_module

    data = make_synthetic("train", n=40)
    _, trigger = poison_dataset(data, attack, 0, 0.1, seed=0)
    whole = trigger.apply_uint8(data.images)  # 40 rows of 12 KiB: one chunk
    seen: list[int] = []
    apply = Trigger.apply

    def counted(self, x, scale=1.0):
        seen.append(len(x))
        return apply(self, x, scale=scale)

    monkeypatch.setattr(trigger_module, "TRIGGER_CHUNK_BYTES", 7 * 4 * 32 * 32 * 3)  # 7 rows of float32
    monkeypatch.setattr(Trigger, "apply", counted)
    assert torch.equal(trigger.apply_uint8(data.images), whole)
    assert seen == [7] * 5 + [5]


@pytest.mark.parametrize("attack", ["badnets", "wanet", "sig"])
def test_streamed_poisoning_writes_the_bytes_poisoning_in_memory_does(attack, tmp_path, monkeypatch):
    import cleanse.attacks.poison as poison
    from cleanse.data import load_data, save_dataset

    data = make_synthetic("train", n=300)
    source = tmp_path / "clean.safetensors"
    save_dataset(data, source)
    mapped = load_data(str(source))
    in_memory, _ = poison_dataset(mapped, attack, 0, 0.1, seed=4)
    save_dataset(in_memory, tmp_path / "a.safetensors")
    plan = poison.plan_poison(mapped, attack, 0, 0.1, seed=4)

    def no_copy(images):
        raise AssertionError("streamed poisoning must not copy the whole image tensor")

    monkeypatch.setattr(poison, "private_copy", no_copy)
    poison.save_poisoned(plan, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    if attack == "wanet":
        assert in_memory.noise is not None and int(in_memory.noise.sum()) == 60  # noise rows are drawn too


def test_poison_plan_rows_in_uneven_blocks_equal_the_poisoned_images():
    from cleanse.attacks.poison import plan_poison

    data = make_synthetic("train", n=200)
    plan = plan_poison(data, "wanet", 0, 0.1, seed=1)
    whole = plan.dataset().images
    bounds = [0, 7, 8, 90, 150, 200]  # the noise draws run on across block boundaries
    blocks = torch.cat([plan.rows(a, b) for a, b in zip(bounds, bounds[1:], strict=False)])
    assert torch.equal(blocks, whole)
    assert torch.equal(torch.cat([plan.rows(0, 120), plan.rows(120, 200)]), whole)  # row 0 starts the draws again
    assert not torch.equal(whole[plan.picked], data.images[plan.picked])  # the noise rows did change
    assert torch.equal(data.images, make_synthetic("train", n=200).images)  # the source is untouched
