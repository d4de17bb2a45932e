"""The hardening corpus: every bad input file, written once per module by `write_inputs`, and the command lines that
feed them to the real CLI, split by kind. tests/test_hardening_files.py, tests/test_hardening_data.py and
tests/test_hardening_cli_args.py each run their kind through `check_bad_input`.

Every case runs one command line and expects its documented exit code (2 unless stated), exactly one `error: ...` line
naming the problem and the fix, no traceback, and no file left behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import Evil, bomb_png, error_line, listing, png, st_bytes, tiny_model, write_npz
from safetensors.torch import save_file
from typer.testing import CliRunner

from cleanse.attacks.trigger import Trigger
from cleanse.cli import app
from cleanse.models import save_model

runner = CliRunner()


# --- inputs shared by the corpus ------------------------------------------------------------------------------------


def write_inputs(root: Path) -> dict[str, Path]:
    """Every input file of the corpus, written into `root` (the `inp` fixture in tests/conftest.py, once per module)."""
    p: dict[str, Path] = {"root": root, "marker": root / "pwned"}
    for k in (10, 3, 2):
        save_model(tiny_model(k), root / f"m{k}.safetensors")
        p[f"m{k}"] = root / f"m{k}.safetensors"
    model = tiny_model(10)
    state = model.net.state_dict()
    good = model.spec.to_metadata()
    raw = p["m10"].read_bytes()

    def put(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)
        p[name] = root / name

    # damaged and crafted safetensors
    put("trunc_half.safetensors", raw[: len(raw) // 2])
    put("trunc_tiny.safetensors", raw[:5])
    put("empty.safetensors", b"")
    put("header_past.safetensors", struct.pack("<Q", len(raw)) + raw[8:])
    put("absurd.safetensors", struct.pack("<Q", 10**15) + raw[8:])
    put("offsets_past.safetensors", st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8))
    put("not_json.safetensors", st_bytes(b"\xff\xfe{not json"))
    put("array.safetensors", st_bytes([1, 2, 3]))
    put(
        "inf_shape.safetensors",
        st_bytes('{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}', b"\0" * 4),
    )
    put(
        "nan_offset.safetensors", st_bytes('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [NaN, 4]}}', b"\0" * 4)
    )
    put(
        "huge_int.safetensors",
        st_bytes('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', b"\0" * 4),
    )
    put("deep.safetensors", st_bytes("[" * 100000 + "]" * 100000))
    put("bad_dtype.safetensors", st_bytes({"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    put(
        "overlap.safetensors",
        st_bytes(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
    )
    put("meta_not_strings.safetensors", st_bytes({"__metadata__": {"cleanse": 5}}))
    put("pickle.safetensors", pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}))

    def with_meta(name: str, doc: Any, tensors: dict[str, torch.Tensor] | None = None) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        save_file(tensors if tensors is not None else state, root / name, metadata={"cleanse": text})
        p[name] = root / name

    # cleanse metadata: invalid, missing, wrong types
    with_meta("meta_not_json.safetensors", "{oops")
    with_meta("meta_array.safetensors", [1, 2])
    save_file(state, root / "raw.safetensors")
    p["raw.safetensors"] = root / "raw.safetensors"
    norm = good["normalization"]
    variants = {
        "num_classes_str": {"num_classes": "ten"},
        "num_classes_bool": {"num_classes": True},
        "num_classes_zero": {"num_classes": 0},
        "size_short": {"input_size": [3, 32]},
        "size_negative": {"input_size": [3, -32, 32]},
        "size_huge": {"input_size": [3, 100000, 100000]},
        "size_float": {"input_size": [3, 32.5, 32]},
        "arch_str": {"arch": "cnn"},
        "arch_args_list": {"arch": {"name": "cnn", "args": [1]}},
        "arch_arg_nested": {"arch": {"name": "cnn", "args": {"width": [8, 16, 16]}}},
        "arch_unknown": {"arch": {"name": "evil", "args": {}}},
        "arch_weights": {"arch": {"name": "torchvision:resnet18", "args": {"weights": "DEFAULT"}}},
        "arch_huge_width": {"arch": {"name": "cnn", "args": {"width": "100000,100000,100000"}}},
        "arch_wrong_width": {"arch": {"name": "cnn", "args": {"width": "8,16,32"}}},
        "norm_missing": {"normalization": None},
        "norm_short": {"normalization": {"mean": [0.5], "std": norm["std"]}},
        "mean_nan": {"normalization": {"mean": [float("nan")] * 3, "std": norm["std"]}},
        "std_inf": {"normalization": {"mean": norm["mean"], "std": [float("inf")] * 3}},
        "std_zero": {"normalization": {"mean": norm["mean"], "std": [0, 1, 1]}},
        "classes_count": {"classes": ["a", "b"]},
        "classes_types": {"classes": list(range(10))},
        "format_dataset": {"format": "cleanse.dataset"},
        "format_version": {"format_version": 2},
        "format_version_str": {"format_version": "1"},
    }
    for name, change in variants.items():
        doc = {**good, **change}
        if change.get("normalization", 0) is None:
            del doc["normalization"]
        with_meta(f"meta_{name}.safetensors", doc)
    arch_file = root / "evil_arch.py"
    arch_file.write_text(f"open({str(p['marker'])!r}, 'w')\ndef build(num_classes):\n    raise SystemExit\n")
    with_meta("meta_arch_file.safetensors", {**good, "arch": {"name": f"{arch_file}:build", "args": {}}})

    # tensors that do not hold usable weights
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = {k: v.clone() for k, v in state.items()}
        bad["head.weight"][0, 0] = value
        with_meta(f"{name}_weights.safetensors", good, bad)
    with_meta("missing_key.safetensors", good, {k: v for k, v in state.items() if k != "head.weight"})
    torch.save({"state_dict": Evil(p["marker"])}, root / "evil.pth")
    p["evil.pth"] = root / "evil.pth"
    torch.save(Evil(p["marker"]), root / "evil_renamed.safetensors")  # a torch zip-pickle renamed
    p["evil_renamed.safetensors"] = root / "evil_renamed.safetensors"

    # data
    p["d10"] = write_npz(root / "d10.npz", 10, 10)
    p["d3"] = write_npz(root / "d3.npz", 3, 10)
    p["d10_16"] = write_npz(root / "d10_16.npz", 10, 4, size=16)
    np.savez(root / "obj.npz", x=np.array([Evil(p["marker"])], dtype=object), y=np.array([0]))
    p["obj.npz"] = root / "obj.npz"
    np.savez(root / "huge_label.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 10**12]))
    p["huge_label.npz"] = root / "huge_label.npz"
    np.savez(root / "zero_size.npz", x=np.zeros((4, 0, 0, 3), np.uint8), y=np.array([0, 1, 0, 1]))
    p["zero_size.npz"] = root / "zero_size.npz"
    save_file(
        {"images": torch.zeros(4, 32, 32, 1, dtype=torch.uint8), "labels": torch.tensor([0, 1, 0, 1])},
        root / "gray.safetensors",
        metadata={"cleanse": json.dumps({"format": "cleanse.dataset", "format_version": 1, "classes": ["a", "b"]})},
    )
    p["gray.safetensors"] = root / "gray.safetensors"

    def folder(name: str, layout: dict[str, list[tuple[str, Callable[[Path], Any]]]]) -> None:
        base = root / name
        base.mkdir()
        for cls, files in layout.items():
            (base / cls).mkdir()
            for fname, make in files:
                make(base / cls / fname)
        p[name] = base

    good_png = lambda path: png(path, colour=(40, 80, 120))  # noqa: E731
    zero = lambda path: path.write_bytes(b"")  # noqa: E731
    corrupt = lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # noqa: E731
    text = lambda path: path.write_text("not an image")  # noqa: E731
    truncated = lambda path: path.write_bytes(png(path, (64, 64)).read_bytes()[:60])  # noqa: E731
    bomb = lambda path: bomb_png(path, 100_000, 100_000)  # noqa: E731  (over Pillow's own limit: an error)
    bomb_ours = lambda path: bomb_png(path, 8000, 8000)  # noqa: E731  (under Pillow's limit, over cleanse's)
    folder(
        "f_unreadable",
        {
            "a": [("zero.png", zero), ("corrupt.png", corrupt), ("note.txt", text)],
            "b": [("trunc.png", truncated), ("bomb.png", bomb), ("bomb2.png", bomb_ours)],
        },
    )
    folder(
        "f_mixed",
        {
            "a": [(f"{i}.png", good_png) for i in range(4)] + [("zero.png", zero), ("bomb.png", bomb)],
            "b": [(f"{i}.png", good_png) for i in range(4)]
            + [("corrupt.jpg", corrupt), ("x.txt", text), ("trunc.png", truncated), ("bomb2.png", bomb_ours)],
        },
    )
    folder(
        "f_empty_class",
        {
            "a": [(f"{i}.png", good_png) for i in range(4)],
            "b": [(f"{i}.png", good_png) for i in range(4)],
            "c": [("zero.png", zero)],
        },
    )
    folder("f_single", {"only": [(f"{i}.png", good_png) for i in range(6)]})
    (root / "f_flat").mkdir()
    png(root / "f_flat" / "x.png")
    p["f_flat"] = root / "f_flat"
    p["zero.png"] = root / "zero.png"
    p["zero.png"].write_bytes(b"")
    p["bomb.png"] = bomb_png(root / "bomb.png", 100_000, 100_000)

    cifar = root / "cifar_evil"
    cifar.mkdir()
    (cifar / "test_batch").write_bytes(pickle.dumps({b"data": Evil(p["marker"]), b"labels": []}))
    p["cifar_evil"] = cifar

    # triggers
    def trigger(name: str, size: int, target: Any = 0, **overrides: Any) -> None:
        mask = torch.zeros(size, size)
        mask[-4:-1, -4:-1] = 1
        t = Trigger("blend", {"mask": mask, "pattern": torch.ones(3, size, size)}, 0, (3, size, size), "badnets")
        doc = {**t.metadata(), "target": target, **overrides}
        save_file({k: v.float() for k, v in t.tensors.items()}, root / name, metadata={"cleanse": json.dumps(doc)})
        p[name] = root / name

    trigger("t32.safetensors", 32)
    trigger("t16.safetensors", 16)
    trigger("t_target99.safetensors", 32, 99)
    trigger("t_target_inf.safetensors", 32, float("inf"))
    trigger("t_target_shift_inf.safetensors", 32, {"all_to_all": {"shift": float("inf")}})
    trigger("t_kind_list.safetensors", 32, kind=["blend"])
    trigger("t_size_bool.safetensors", 32, input_size=[True, 32, 32])
    mask = torch.full((32, 32), 2.0)
    save_file(
        {"mask": mask, "pattern": torch.ones(3, 32, 32)},
        root / "t_mask_range.safetensors",
        metadata={
            "cleanse": json.dumps(
                {
                    "format": "cleanse.trigger",
                    "format_version": 1,
                    "kind": "blend",
                    "target": 0,
                    "input_size": [3, 32, 32],
                }
            )
        },
    )
    p["t_mask_range.safetensors"] = root / "t_mask_range.safetensors"
    return p


# --- the corpus -----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: str  # {name} -> an input path; {out} -> the case's own empty output folder
    message: str  # exact substring of the one error line
    code: int = 2
    prepare: Callable[[dict[str, Path], Path], None] | None = None  # extra set-up in the output folder

    def args(self, inp: dict[str, Path], out: Path) -> list[str]:
        names = {k.replace(".", "_"): str(v) for k, v in inp.items()}
        return [part.format(out=out, **names) for part in self.argv.split()]


EXPLAIN = "explain {{{m}}} --data {{d10}} --n 2 -o {{out}}/maps"
UNLEARN = "unlearn {m10} --method finetune --epochs 1 --data {d10} -o {out}/c.safetensors"


def explain(model: str) -> str:
    return EXPLAIN.format(m=model)


def blocker(_: dict[str, Path], out: Path) -> None:
    (out / "blocker").write_text("a regular file where a folder is expected")


def copied_folder(inp: dict[str, Path], out: Path) -> None:
    """A private ImageFolder with a model inside it: a case that replaced it would delete the data."""
    shutil.copytree(inp["f_mixed"], out / "data")
    png(out / "data" / "a" / "extra.png", colour=(1, 2, 3))
    save_model(tiny_model(2), out / "data" / "model.safetensors")


def data_folder_for_scan(inp: dict[str, Path], out: Path) -> None:
    """A private 3-class ImageFolder (scan needs 3 classes) and a 3-class model beside it."""
    for name in "abc":
        (out / "data" / name).mkdir(parents=True)
        for i in range(4):
            png(out / "data" / name / f"{i}.png", colour=(40 * i, 80, 120))


# damaged or crafted model and trigger files: the safetensors container, the `cleanse` metadata, the tensors
FILE_CASES = [
    # damaged or crafted safetensors files, fed to every command that reads a model
    Case("truncated-half", explain("trunc_half_safetensors"), "points past the end of the file"),
    Case(
        "truncated-5-bytes",
        UNLEARN.replace("{m10}", "{trunc_tiny_safetensors}"),
        "file is truncated or not a safetensors file (5 bytes)",
    ),
    Case(
        "empty-file",
        "scan {empty_safetensors} --data {d10} --budget fast --steps 10 -o {out}/scan",
        "(0 bytes); re-export it",
    ),
    Case(
        "header-length-past-file",
        "scan {header_past_safetensors} --data {d10} --budget fast --steps 10 -o {out}/scan",
        "file is truncated (header says",
    ),
    Case(
        "offsets-past-file",
        explain("offsets_past_safetensors"),
        "tensor 'w' points past the end of the file (offsets 0..16, data 8 bytes)",
    ),
    Case("absurd-header-size", "train {d10} --init {absurd_safetensors} -o {out}/m.safetensors", "bytes is absurd"),
    Case("header-not-json", explain("not_json_safetensors"), "not a safetensors file (header is not JSON)"),
    Case("header-not-object", explain("array_safetensors"), "header is not a JSON object"),
    Case("header-infinite-shape", explain("inf_shape_safetensors"), "tensor 'w' has a malformed header entry"),
    Case("header-nan-offset", explain("nan_offset_safetensors"), "tensor 'w' has a malformed header entry"),
    Case("header-5000-digit-int", explain("huge_int_safetensors"), "not a safetensors file (header is not JSON)"),
    Case("header-deeply-nested", explain("deep_safetensors"), "not a safetensors file (header is not JSON)"),
    Case("header-unknown-dtype", explain("bad_dtype_safetensors"), "tensor 'w' has a malformed header entry"),
    Case("header-overlapping-tensors", explain("overlap_safetensors"), "cannot read tensors"),
    Case(
        "header-metadata-not-strings",
        explain("meta_not_strings_safetensors"),
        "safetensors metadata must map strings to strings",
    ),
    Case("pickle-renamed-safetensors", explain("pickle_safetensors"), "not a safetensors file"),
    Case("torch-zip-renamed-safetensors", explain("evil_renamed_safetensors"), "not a safetensors file"),
    Case(
        "pth-that-would-run-code",
        explain("evil_pth") + " --arch cnn --num-classes 10",
        "refused to load: not a plain state dict of tensors (it pickles",
    ),
    Case(
        "pth-that-would-run-code-unlearn",
        UNLEARN.replace("{m10}", "{evil_pth}") + " --arch cnn --num-classes 10",
        "which is never run",
    ),
    Case(
        "model-file-missing", "explain {root}/nope.safetensors --data {d10} --n 2 -o {out}/maps", "no such model file"
    ),
    Case("dataset-file-as-model", explain("gray_safetensors"), "is a cleanse.dataset file, not a model checkpoint"),
    # the `cleanse` metadata: invalid, missing, wrong types
    Case("metadata-not-json", explain("meta_not_json_safetensors"), "the 'cleanse' metadata is not valid JSON"),
    Case("metadata-not-object", explain("meta_array_safetensors"), "the 'cleanse' metadata must be a JSON object"),
    Case(
        "metadata-missing",
        explain("raw_safetensors"),
        "raw state dict without cleanse metadata; add --arch and --num-classes",
    ),
    Case(
        "metadata-num-classes-string",
        explain("meta_num_classes_str_safetensors"),
        "'num_classes' must be a positive integer",
    ),
    Case(
        "metadata-num-classes-bool",
        explain("meta_num_classes_bool_safetensors"),
        "'num_classes' must be a positive integer",
    ),
    Case(
        "metadata-num-classes-zero",
        explain("meta_num_classes_zero_safetensors"),
        "'num_classes' must be a positive integer",
    ),
    Case("metadata-input-size-short", explain("meta_size_short_safetensors"), "metadata 'input_size' is malformed"),
    Case(
        "metadata-input-size-negative", explain("meta_size_negative_safetensors"), "metadata 'input_size' is malformed"
    ),
    Case("metadata-input-size-huge", explain("meta_size_huge_safetensors"), "metadata 'input_size' is malformed"),
    Case("metadata-input-size-float", explain("meta_size_float_safetensors"), "metadata 'input_size' is malformed"),
    Case("metadata-arch-string", explain("meta_arch_str_safetensors"), "metadata 'arch' must be"),
    Case("metadata-arch-args-list", explain("meta_arch_args_list_safetensors"), "metadata 'arch' must be"),
    Case(
        "metadata-arch-arg-list-value", explain("meta_arch_arg_nested_safetensors"), "must be a name with a plain value"
    ),
    Case("metadata-arch-unknown", explain("meta_arch_unknown_safetensors"), "unknown architecture 'evil'"),
    Case(
        "metadata-arch-asks-for-weights", explain("meta_arch_weights_safetensors"), "--arch-arg weights=... is refused"
    ),
    Case("metadata-arch-huge-width", explain("meta_arch_huge_width_safetensors"), "weights do not fit cnn"),
    Case(
        "metadata-arch-file-not-run",
        explain("meta_arch_file_safetensors"),
        "evil_arch.py:build to allow running that file",
    ),
    Case(
        "metadata-normalization-missing",
        explain("meta_norm_missing_safetensors"),
        "metadata 'normalization' is missing",
    ),
    Case(
        "metadata-normalization-short",
        explain("meta_norm_short_safetensors"),
        "metadata 'normalization.mean' is malformed",
    ),
    Case("metadata-mean-nan", explain("meta_mean_nan_safetensors"), "metadata 'normalization.mean' is malformed"),
    Case("metadata-std-inf", explain("meta_std_inf_safetensors"), "metadata 'normalization.std' is malformed"),
    Case("metadata-std-zero", explain("meta_std_zero_safetensors"), "normalization std must be positive"),
    Case("metadata-classes-count", explain("meta_classes_count_safetensors"), "metadata 'classes' is malformed"),
    Case("metadata-classes-not-strings", explain("meta_classes_types_safetensors"), "metadata 'classes' is malformed"),
    Case(
        "metadata-format-dataset",
        explain("meta_format_dataset_safetensors"),
        "this is a cleanse.dataset file, not a model checkpoint",
    ),
    Case(
        "metadata-format-version",
        explain("meta_format_version_safetensors"),
        "checkpoint format version 2 is not supported",
    ),
    Case(
        "metadata-format-version-string",
        explain("meta_format_version_str_safetensors"),
        "checkpoint format version '1' is not supported",
    ),
    # tensors
    Case("nan-weights", explain("nan_weights_safetensors"), "tensor 'head.weight' holds NaN or Inf"),
    Case("inf-weights", UNLEARN.replace("{m10}", "{inf_weights_safetensors}"), "tensor 'head.weight' holds NaN or Inf"),
    Case(
        "shapes-do-not-fit-arch-args",
        explain("meta_arch_wrong_width_safetensors"),
        "likely cause: wrong architecture arguments",
    ),
    Case("missing-weight", explain("missing_key_safetensors"), "missing keys head.weight"),
    Case(
        "raw-weights-wrong-arch",
        explain("raw_safetensors") + " --arch resnet18 --num-classes 10",
        "likely cause: wrong architecture (--arch resnet18)",
    ),
    Case(
        "raw-weights-wrong-class-count",
        explain("raw_safetensors") + " --arch cnn --num-classes 5 --arch-arg width=8,16,16",
        "the weights have 10 classes: pass --num-classes 10",
    ),
    # triggers
    Case(
        "trigger-other-size-unlearn",
        UNLEARN + " --clean-frac 1 --trigger {t16_safetensors}",
        "trigger was made for 3x16x16 images but the model's inputs are 3x32x32",
    ),
    Case(
        "trigger-other-size-explain",
        explain("m10") + " --trigger {t16_safetensors}",
        "use a trigger for this image size",
    ),
    Case(
        "trigger-other-size-train",
        "train {d10} --test {d10} --trigger {t16_safetensors} -o {out}/m.safetensors",
        "trigger was made for 3x16x16 images",
    ),
    Case(
        "trigger-target-out-of-range",
        UNLEARN + " --clean-frac 1 --trigger {t_target99_safetensors}",
        "the trigger targets class 99",
    ),
    Case(
        "trigger-target-infinite",
        explain("m10") + " --trigger {t_target_inf_safetensors}",
        "target inf is not a class index",
    ),
    Case(
        "trigger-shift-infinite",
        explain("m10") + " --trigger {t_target_shift_inf_safetensors}",
        "is malformed; expected an int",
    ),
    Case(
        "trigger-kind-list",
        explain("m10") + " --trigger {t_kind_list_safetensors}",
        "trigger kind ['blend'] is unknown",
    ),
    Case(
        "trigger-size-bool",
        explain("m10") + " --trigger {t_size_bool_safetensors}",
        "trigger metadata 'input_size' must be [C, H, W]",
    ),
    Case(
        "trigger-mask-out-of-range",
        explain("m10") + " --trigger {t_mask_range_safetensors}",
        "tensor 'mask' must lie in [0, 1]",
    ),
    Case("trigger-is-a-model", explain("m10") + " --trigger {m10}", "not a trigger file (a cleanse.model file)"),
]

# data sets and images, and data that does not fit the model
DATA_CASES = [
    # data
    Case(
        "imagefolder-only-unreadable-files",
        "train {f_unreadable} -o {out}/m.safetensors",
        "no readable images in the ImageFolder",
    ),
    Case(
        "imagefolder-no-class-folders",
        "poison {f_flat} -o {out}/p.safetensors",
        "not an ImageFolder (no class sub-folders)",
    ),
    Case(
        "imagefolder-bad-files-are-skipped",
        "poison {f_mixed} --rate 0.5 --target 0 -o {out}/p.safetensors",
        "skipped 1 non-image and 5 unreadable/corrupt/oversized files",
        code=0,
    ),
    Case(
        "imagefolder-empty-class-train", "train {f_empty_class} -o {out}/m.safetensors", "has no images of class 2 (c)"
    ),
    Case(
        "imagefolder-empty-class-unlearn",
        "unlearn {m3} --method finetune --data {f_empty_class} --clean-frac 1 -o {out}/c.safetensors",
        "leaves 0 image(s) of class 2 (c)",
    ),
    Case("imagefolder-single-class-train", "train {f_single} -o {out}/m.safetensors", "has only one class (only)"),
    Case("imagefolder-single-class-poison", "poison {f_single} -o {out}/p.safetensors", "has only one class (only)"),
    Case(
        "cifar-batch-that-would-run-code",
        "poison {cifar_evil} --split test -o {out}/p.safetensors",
        "refusing to unpickle",
    ),
    Case(
        "npz-with-pickled-objects",
        "poison {obj_npz} -o {out}/p.safetensors",
        "pickled objects, which cleanse never loads",
    ),
    Case("npz-huge-label", "poison {huge_label_npz} -o {out}/p.safetensors", "label 1000000000000"),
    Case("npz-zero-size-images", "train {zero_size_npz} -o {out}/m.safetensors", "images must be at least 1x1"),
    Case(
        "dataset-one-channel",
        "train {gray_safetensors} --epochs 1 -o {out}/m.safetensors",
        "images must have 3 channels",
    ),
    Case("data-missing", "train {root}/nope -o {out}/m.safetensors", "no such file or folder"),
    Case("explain-zero-byte-image", "explain {m10} {zero_png} -o {out}/maps", "cannot decode this image"),
    Case("explain-decompression-bomb-image", "explain {m10} {bomb_png} -o {out}/maps", "cannot decode this image"),
    # model and data disagree
    Case(
        "class-count-unlearn",
        "unlearn {m10} --method finetune --data {d3} --clean-frac 1 -o {out}/c.safetensors",
        "has 3 classes but the model has 10",
    ),
    Case(
        "class-count-scan",
        "scan {m10} --data {d3} --budget fast --steps 10 -o {out}/scan",
        "has 3 classes but the model has 10",
    ),
    Case("class-count-explain", "explain {m3} --data {d10} --n 2 -o {out}/maps", "has 10 classes but the model has 3"),
    Case(
        "class-count-train-init", "train {d3} --init {m10} -o {out}/m.safetensors", "has 3 classes but the model has 10"
    ),
    Case(
        "class-count-scan-too-few",
        "scan {m2} --data {d10} --budget fast --steps 10 -o {out}/scan",
        "the anomaly test needs at least 3",
    ),
    Case(
        "trigger-other-size-poisoned-data",
        "train {d10_16} --init {m10} -o {out}/m.safetensors",
        "has 16x16 images but the model takes 32x32",
    ),
]

# command-line arguments: the clean subset, output paths, options
ARGUMENT_CASES = [
    # --clean-frac / --clean-n
    Case("clean-frac-zero", UNLEARN + " --clean-frac 0", "--clean-frac 0.0 must lie in (0, 1]"),
    Case("clean-frac-negative", UNLEARN + " --clean-frac -0.5", "--clean-frac -0.5 must lie in (0, 1]"),
    Case("clean-frac-above-one", UNLEARN + " --clean-frac 1.5", "--clean-frac 1.5 must lie in (0, 1]"),
    Case("clean-frac-nan", UNLEARN + " --clean-frac nan", "--clean-frac nan must lie in (0, 1]"),
    Case("clean-frac-too-small", UNLEARN + " --clean-frac 0.05", "leaves 0 image(s) of class 0"),
    Case(
        "clean-frac-one-per-class",
        UNLEARN + " --clean-frac 0.1",
        "leaves 1 image(s) of class 0 (0); at least 2 per class are needed",
    ),
    Case("clean-n-zero", UNLEARN + " --clean-n 0", "--clean-n 0 must be a positive number"),
    Case(
        "clean-frac-and-n", UNLEARN + " --clean-n 50 --clean-frac 0.5", "give exactly one of --clean-frac and --clean-n"
    ),
    # outputs
    Case("output-is-input-train", "train {d10} -o {d10} --force", "output is the same file as an input"),
    Case(
        "output-is-input-unlearn",
        "unlearn {m10} --method finetune --data {d10} --clean-frac 1 -o {m10} --force",
        "output is the same file as an input",
    ),
    Case(
        "output-is-input-poison",
        "poison {gray_safetensors} -o {gray_safetensors} --force",
        "output is the same file as an input",
    ),
    Case(
        "trigger-out-is-input-poison",
        "poison {d10} -o {out}/p.safetensors --trigger-out {d10} --force",
        "output is the same file as an input",
    ),
    Case(
        "output-folder-is-data-explain",
        "explain {out}/data/model.safetensors --data {out}/data --n 2 -o {out}/data --force",
        "is an input",
        prepare=copied_folder,
    ),
    Case(
        "output-folder-holds-model-explain",
        "explain {out}/data/model.safetensors {out}/data/a/0.png -o {out} --force",
        "is an input",
        prepare=copied_folder,
    ),
    Case(
        "output-folder-is-data-scan",
        "scan {m3} --data {out}/data --n-clean 12 --budget fast --steps 5 -o {out}/data --force",
        "is an input",
        prepare=data_folder_for_scan,
    ),
    Case(
        "output-parent-is-a-file-train",
        "train {d10} -o {out}/blocker/m.safetensors",
        "is not a folder",
        prepare=blocker,
    ),
    Case(
        "output-parent-is-a-file-explain",
        explain("m10").replace("{out}/maps", "{out}/blocker/maps"),
        "is not a folder",
        prepare=blocker,
    ),
    # scan checks its folder output before any work; small settings all the same
    Case(
        "output-parent-is-a-file-scan",
        "scan {m3} --data {d3} --n-clean 12 --budget fast --steps 5 -o {out}/blocker/scan",
        "is not a folder",
        prepare=blocker,
    ),
    Case("output-is-a-folder-train", "train {d10} -o {out} --force", "is a folder; pass a file path"),
    Case(
        "output-is-a-file-explain",
        explain("m10").replace("{out}/maps", "{out}/blocker") + " --force",
        "exists and is not a folder",
        prepare=blocker,
    ),
    Case(
        "output-name-too-long", "poison {d10} -o {out}/" + "x" * 300 + ".safetensors", "file name longer than 255 bytes"
    ),
    Case("output-folder-read-only", "poison {d10} -o /proc/p.safetensors", "output folder is not writable"),
    Case(
        "output-folder-read-only-explain",
        explain("m10").replace("{out}/maps", "/proc/maps"),
        "output folder's parent is not writable",
    ),
    Case("output-folder-missing", "poison {d10} -o {out}/missing/p.safetensors", "output folder does not exist"),
    # options
    Case("seed-overflow", "train {d10} --seed 99999999999999999999999 -o {out}/m.safetensors", "--seed"),
    Case("lr-nan", "train {d10} --lr nan -o {out}/m.safetensors", "--lr nan must be a positive number"),
    Case("lr-negative", "train {d10} --lr -1 -o {out}/m.safetensors", "--lr -1.0 must be a positive number"),
    Case(
        "epochs-zero", "train {d10} --epochs 0 -o {out}/m.safetensors", "--epochs and --batch-size must be at least 1"
    ),
    Case(
        "mean-nan",
        "train {d10} --mean nan,0.5,0.5 --std 0.2,0.2,0.2 -o {out}/m.safetensors",
        "--mean 'nan,0.5,0.5' must be",
    ),
    Case(
        "std-inf",
        explain("raw_safetensors")
        + " --arch cnn --num-classes 10 --arch-arg width=8,16,16 --mean 0.5,0.5,0.5 --std inf,1,1",
        "--std 'inf,1,1' must be finite numbers",
    ),
    Case("poison-rate-zero", "poison {d10} --rate 0 -o {out}/p.safetensors", "--rate 0.0 must lie in (0, 1]"),
    Case("poison-rate-above-one", "poison {d10} --rate 1.5 -o {out}/p.safetensors", "--rate 1.5 must lie in (0, 1]"),
    Case("poison-target-out-of-range", "poison {d10} --target 10 -o {out}/p.safetensors", "target 10 is out of range"),
    Case("poison-unknown-attack", "poison {d10} --attack nope -o {out}/p.safetensors", "unknown attack 'nope'"),
    Case("scan-steps-zero", "scan {m10} --data {d10} --budget fast --steps 0 -o {out}/scan", "is too few"),
    Case("scan-budget-unknown", "scan {m10} --data {d10} --budget huge -o {out}/scan", "--budget 'huge' is unknown"),
    Case("explain-n-zero", explain("m10").replace("--n 2", "--n 0"), "--n must be at least 1"),
    Case("explain-n-too-large", explain("m10").replace("--n 2", "--n 1000"), "--n 1000 is larger than"),
    Case("explain-target-out-of-range", explain("m10") + " --target 99", "--target 99 is out of range"),
    Case(
        "unlearn-param-not-a-number",
        UNLEARN + " --clean-frac 1 --param lr=abc",
        "parameter lr='abc' is not a valid float",
    ),
    Case("unlearn-unknown-method", UNLEARN.replace("finetune", "nope") + " --clean-frac 1", "nope"),
    Case("unlearn-without-data", "unlearn {m10} --method finetune -o {out}/c.safetensors", "--data is required"),
]

CASES = FILE_CASES + DATA_CASES + ARGUMENT_CASES


def check_bad_input(case: Case, inp: dict[str, Path], tmp_path: Path) -> None:
    """Run one corpus case in its own empty output folder and check the exit code, the error line and the leftovers."""
    out = tmp_path / "out"
    out.mkdir()
    if case.prepare:
        case.prepare(inp, out)
    before = listing(out, inp["root"])
    result = runner.invoke(app, case.args(inp, out))
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == case.code, result.output
    if case.code == 2:
        assert case.message in error_line(result)
        assert listing(out, inp["root"]) == before, "files were left behind"
    else:
        assert case.message in result.stderr
    assert not inp["marker"].exists(), "code from an input file ran"
