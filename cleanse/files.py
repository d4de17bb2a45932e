"""Safe, atomic file I/O shared by every command.

Safetensors headers are checked by hand before any tensor is read, so a
truncated, crafted or renamed file fails with one clear line instead of a
traceback; outputs are written to a temporary file beside the target and
renamed, so nothing half-written is ever left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cleanse.errors import CleanseError

MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "cleanse"
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _default_mode(directory: bool = False) -> int:
    """The mode a plain open() would give under the current umask (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_header(raw: bytes, path: Path) -> dict[str, Any]:
    size = len(raw)
    if size < 8:
        raise CleanseError(f"{path}: file is truncated or not a safetensors file ({size} bytes); re-export it with safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise CleanseError(f"{path}: not a safetensors file (header length {n} bytes is absurd); pass a safetensors file, e.g. one written by cleanse")
    if 8 + n > size:
        raise CleanseError(f"{path}: file is truncated (header says {n} bytes, file has {size - 8}); re-download or re-export it")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CleanseError(f"{path}: not a safetensors file (header is not JSON); pass a safetensors file") from None
    if not isinstance(header, dict):
        raise CleanseError(f"{path}: not a safetensors file (header is not a JSON object)")
    body = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CleanseError(f"{path}: safetensors metadata must map strings to strings")
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CleanseError(f"{path}: tensor {name!r} has a malformed header entry; the file is damaged") from None
        if not 0 <= begin <= end <= body or end - begin != expected:
            raise CleanseError(f"{path}: tensor {name!r} points past the end of the file (offsets {begin}..{end}, data {body} bytes); the file is truncated or damaged")
    return header


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a safetensors file, validating it first."""
    path = Path(path)
    if not path.is_file():
        raise CleanseError(f"{path}: no such file; check the path")
    raw = path.read_bytes()
    header = _check_header(raw, path)
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise CleanseError(f"{path}: cannot read tensors ({exc}); the file is damaged") from None
    return tensors, dict(header.get("__metadata__") or {})


def read_cleanse_metadata(metadata: dict[str, str], path: Path | str) -> dict[str, Any] | None:
    """The JSON document under the `cleanse` key, or None when the file has none."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise CleanseError(f"{path}: the 'cleanse' metadata is not valid JSON; re-create the file with cleanse") from None
    if not isinstance(doc, dict):
        raise CleanseError(f"{path}: the 'cleanse' metadata must be a JSON object; re-create the file with cleanse")
    return doc


def check_output(path: str | os.PathLike, *, force: bool, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Refuse an output that exists (without --force), equals an input, or cannot be written."""
    path = Path(path)
    for item in inputs:
        if item is not None and Path(item).exists() and path.exists() and path.resolve() == Path(item).resolve():
            raise CleanseError(f"{path}: output is the same file as an input; choose another output path with -o")
    if path.exists() and not force:
        raise CleanseError(f"{path}: output exists; pass --force to overwrite it or choose another path with -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise CleanseError(f"{parent}: output folder does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise CleanseError(f"{parent}: output folder is not writable; choose another path with -o")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _default_mode())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    write_bytes_atomic(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors with one JSON document under the `cleanse` metadata key, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    write_bytes_atomic(path, data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Build a directory output in a temporary folder beside the target, then rename it into place."""
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CleanseError(f"{path}: output exists and is not a folder; choose another path with -o")
    if path.exists() and any(path.iterdir()) and not force:
        raise CleanseError(f"{path}: output folder is not empty; pass --force to replace it or choose another -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists() or not os.access(parent, os.W_OK):
        raise CleanseError(f"{parent}: output folder's parent is missing or not writable; choose another -o")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OutputSet:
    """All-or-nothing outputs: each file is written to a reserved temporary path, renamed on commit."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def reserve(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent if str(final.parent) else ".")
        os.close(fd)
        os.chmod(tmp, _default_mode())
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def rollback(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending.clear()


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    outputs = OutputSet()
    try:
        yield outputs
        outputs.commit()
    except BaseException:
        outputs.rollback()
        raise
