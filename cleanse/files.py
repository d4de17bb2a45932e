"""Safe, atomic file I/O shared by every command.

Safetensors headers are checked by hand before any tensor is read, so a
truncated, crafted or renamed file fails with one clear line instead of a
traceback; outputs are written to a temporary file beside the target and
renamed, so nothing half-written is ever left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cleanse.errors import CleanseError

MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "cleanse"
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


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


def _check_header(raw: bytes, path: Path, size: int | None = None) -> dict[str, Any]:
    """The header of a safetensors file whose first bytes are `raw` (at least its header) and whose length is `size`
    (default: all of it is in `raw`), checked so that every tensor lies inside the file."""
    size = len(raw) if size is None else size
    if size < 8:
        raise CleanseError(
            f"{path}: file is truncated or not a safetensors file ({size} bytes); re-export it with safetensors"
        )
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise CleanseError(
            f"{path}: not a safetensors file (header length {n} bytes is absurd); "
            "pass a safetensors file, e.g. one written by cleanse"
        )
    if 8 + n > size:
        raise CleanseError(
            f"{path}: file is truncated (header says {n} bytes, file has {size - 8}); re-download or re-export it"
        )
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5000-digit number, or nested beyond Python's stack
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
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CleanseError(f"{path}: tensor {name!r} has a malformed header entry; the file is damaged") from None
        if not 0 <= begin <= end <= body or end - begin != expected:
            raise CleanseError(
                f"{path}: tensor {name!r} points past the end of the file (offsets {begin}..{end}, "
                f"data {body} bytes); the file is truncated or damaged"
            )
    return header


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a safetensors file, validating it first."""
    path = Path(path)
    if not path.is_file():
        raise CleanseError(f"{path}: no such file; check the path")
    return parse_safetensors(path.read_bytes(), path)


def parse_safetensors(
    raw: bytes, path: str | os.PathLike = "<bytes>"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata from the bytes of a safetensors file; anything malformed is a CleanseError."""
    header = _check_header(raw, Path(path))
    try:
        tensors = st_load(raw)
    except BaseException as exc:
        raise _cannot_read(Path(path), exc) from None
    return tensors, dict(header.get("__metadata__") or {})


# 1-byte dtypes a mapped tensor may have: any offset is aligned for them
_MAPPABLE = {"U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}
# data_ptr of a mapped tensor -> (file, offset, file identity): `private_copy` maps the same bytes again
_MAPPED: dict[int, tuple[Path, int, tuple[int, int, int]]] = {}


def _cannot_read(path: Path, exc: BaseException) -> CleanseError:
    # safetensors raises its own error type for damaged files, and a Rust panic surfaces as a BaseException
    if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
        raise exc
    reason = " ".join(str(exc).split())[:200]
    return CleanseError(f"{path}: cannot read tensors ({reason}); the file is damaged")


def read_safetensors_mapped(
    path: str | os.PathLike, mapped: tuple[str, ...] = ("images",)
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Like `read_safetensors`, but the tensors named in `mapped` (1-byte dtypes) are zero-copy views of a private
    memory map of the file: indexing reads only the rows used, and nothing but the header is read up front.

    The map is copy-on-write (an in-place edit changes this process's pages, never the file); other tensors are
    copied into memory. The file must not be truncated while a mapped tensor lives (the OS would fault on access):
    cleanse only ever replaces files by renaming a new one over them.
    """
    path = Path(path)
    if not path.is_file():
        raise CleanseError(f"{path}: no such file; check the path")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) == 8:
            raw += fh.read(min(struct.unpack("<Q", raw)[0], MAX_HEADER_BYTES + 1, size - 8))
        header = _check_header(raw, path, size)
        start = len(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        try:  # the library checks what the hand check leaves (overlapping or missing bytes) without reading data
            with safe_open(path, framework="pt") as lazy:
                # get_tensor views the library's own shared map: copy, so the tensors never change under us
                tensors = {k: lazy.get_tensor(k).clone() for k in entries if not _mappable(k, entries[k], mapped)}
        except BaseException as exc:
            raise _cannot_read(path, exc) from None
        names = [k for k in entries if _mappable(k, entries[k], mapped)]
        if names:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            identity = _identity(fh)
            for name in names:
                offset = start + int(entries[name]["data_offsets"][0])
                shape = [int(d) for d in entries[name]["shape"]]
                tensors[name] = _view(buffer, _MAPPABLE[entries[name]["dtype"]], shape, offset)
                if tensors[name].numel():
                    _remember(tensors[name], (path, offset, identity))
    return tensors, dict(header.get("__metadata__") or {})


def _mappable(name: str, info: dict[str, Any], mapped: tuple[str, ...]) -> bool:
    return name in mapped and info["dtype"] in _MAPPABLE


def _identity(fh: Any) -> tuple[int, int, int]:
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino, st.st_size


def _view(buffer: mmap.mmap, dtype: torch.dtype, shape: list[int], offset: int) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


def _remember(tensor: torch.Tensor, origin: tuple[Path, int, tuple[int, int, int]]) -> None:
    key = tensor.data_ptr()
    _MAPPED[key] = origin
    weakref.finalize(tensor, _MAPPED.pop, key, None)


def private_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` that may be edited in place: for an unedited tensor from `read_safetensors_mapped`, a fresh
    copy-on-write map of the same file bytes (only the pages edited then take memory); else a clone."""
    origin = _MAPPED.get(tensor.data_ptr())
    # _version counts in-place edits (of the tensor or any view of it): an edited tensor differs from its file
    if origin is None or tensor._version != 0 or not tensor.is_contiguous():
        return tensor.clone()
    path, offset, identity = origin
    try:
        with open(path, "rb") as fh:
            if _identity(fh) != identity:
                return tensor.clone()  # the file was replaced since
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError:
        return tensor.clone()
    copy = _view(buffer, tensor.dtype, list(tensor.shape), offset)
    _remember(copy, (path, offset, identity))
    return copy


def read_cleanse_metadata(metadata: dict[str, str], path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON document under the `cleanse` key, or None when the file has none."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise CleanseError(
            f"{path}: the 'cleanse' metadata is not valid JSON; re-create the file with cleanse"
        ) from None
    if not isinstance(doc, dict):
        raise CleanseError(f"{path}: the 'cleanse' metadata must be a JSON object; re-create the file with cleanse")
    return doc


NAME_MAX = 255  # bytes in one path component on every common file system
# errno values that mean "this output cannot be written here", not a bug: they exit 2 with one line
_WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.EEXIST,
    errno.ELOOP,
    errno.EFBIG,
}


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _temp_prefix(path: Path) -> str:
    """`.NAME.` for temporary files beside `path`, shortened so the random suffix still fits NAME_MAX."""
    return f".{path.name[:120]}."


def is_write_error(exc: BaseException) -> TypeGuard[OSError]:
    """An OSError that means the file system refused (no space, read-only, name too long ...), not a bug."""
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


def write_error(path: str | os.PathLike, exc: OSError) -> CleanseError:
    """The one-line error for an output that the operating system refused to write."""
    reason = exc.strerror or type(exc).__name__
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some space or choose another path with -o" if full else "choose another path with -o"
    return CleanseError(f"{path}: cannot write the output ({reason}); {fix}")


@contextlib.contextmanager
def _undo_on_error(undo: Callable[[], None], path: str | os.PathLike | None) -> Iterator[None]:
    """Run the block; if anything escapes it, `undo` the partial output first.

    An OSError meaning the file system refused the output becomes the one-line `write_error` for `path` (None: the
    file the error names, else "output"); anything else propagates unchanged.
    """
    try:
        yield
    except BaseException as exc:
        undo()
        if is_write_error(exc):
            raise write_error(path if path is not None else exc.filename or "output", exc) from None
        raise


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _check_parent(path: Path, what: str = "output folder") -> Path:
    parent = _parent(path)
    if not parent.exists():
        raise CleanseError(f"{parent}: {what} does not exist; create it first")
    if not parent.is_dir():
        raise CleanseError(
            f"{parent}: is not a folder, so {path.name} cannot be written inside it; choose another path with -o"
        )
    if not os.access(parent, os.W_OK):
        raise CleanseError(f"{parent}: {what} is not writable; choose another path with -o")
    # os.access says yes to root everywhere, even on a read-only file system: try it before any work is done
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".cleanse-probe.", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise CleanseError(f"{parent}: {what} is not writable ({exc.strerror}); choose another path with -o") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return parent


def folder_writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing), tried for real: os.access says yes to root even on
    a read-only file system."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cleanse-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def _check_name(path: Path) -> None:
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise CleanseError(
            f"{path.name[:40]}...: cannot write the output (file name longer than {NAME_MAX} bytes); "
            "choose a shorter -o"
        )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, force: bool, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Refuse an output that exists (without --force), equals an input, is a folder, or cannot be written."""
    path = Path(path)
    _check_name(path)
    for item in inputs:
        if item is not None and _same_path(path, Path(item)):
            raise CleanseError(f"{path}: output is the same file as an input; choose another output path with -o")
    if path.is_dir():
        raise CleanseError(f"{path}: output is a folder; pass a file path with -o")
    if path.exists() and not force:
        raise CleanseError(f"{path}: output exists; pass --force to overwrite it or choose another path with -o")
    _check_parent(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=_parent(path))
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _default_mode())
    with _undo_on_error(lambda: _unlink_quietly(tmp_path), path):
        yield tmp_path
        os.replace(tmp_path, path)


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


_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
STREAM_CHUNK_BYTES = 64 << 20


def safetensors_header(
    entries: list[tuple[str, torch.dtype, list[int]]], metadata: dict[str, str], length: int | None = None
) -> bytes:
    """The bytes before the data of a safetensors file whose tensors (name, dtype, shape) follow in this order.

    The JSON is padded with spaces (the format allows it) to a multiple of 8 bytes, or to `length` bytes in all so
    that a header written last fits the room left for it.
    """
    doc: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        count = 1
        for dim in shape:
            count *= dim
        end = offset + count * torch.empty(0, dtype=dtype).element_size()
        doc[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(doc, separators=(",", ":")).encode()
    room = -(-(len(text) + 8) // 8) * 8 - 8 if length is None else length - 8
    if room < len(text):
        raise ValueError(f"a safetensors header of {len(text)} bytes does not fit {room}")
    return struct.pack("<Q", room) + text + b" " * (room - len(text))


class RowSource(Protocol):
    """A tensor computed a block of rows at a time (never whole in memory), for the streamed writer; `rows` is called
    once per block, in ascending order."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


def write_tensor_bytes(fh: Any, tensor: torch.Tensor | RowSource, chunk_bytes: int = STREAM_CHUNK_BYTES) -> None:
    """Write a CPU tensor's (or a row source's) bytes (little-endian, row-major) to `fh` a chunk of rows at a time."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().reshape(1, -1) if tensor.dim() < 2 else tensor.detach()
        shape, rows = tuple(tensor.shape), lambda a, b: tensor[a:b]
    else:
        shape, rows = tuple(tensor.shape), tensor.rows
    row_bytes = max(1, math.prod(shape[1:]) * torch.empty(0, dtype=tensor.dtype).element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], step):
        block = rows(start, min(start + step, shape[0])).to("cpu").contiguous()
        fh.write(block.reshape(-1).view(torch.uint8).numpy())


def write_safetensors_streamed(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor | RowSource], metadata: dict[str, Any]
) -> None:
    """Like `write_safetensors`, but the tensors go to disk a chunk at a time: the file is never built in memory."""
    entries = [(name, t.dtype, list(t.shape)) for name, t in tensors.items()]
    head = safetensors_header(entries, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        for tensor in tensors.values():
            write_tensor_bytes(fh, tensor)


RUN_RECORD = "run.json"


def _inside(inner: Path, outer: Path) -> bool:
    try:
        inner, outer = inner.resolve(), outer.resolve()
    except OSError:
        return False
    return inner == outer or outer in inner.parents


def check_output_folder(
    path: str | os.PathLike, *, force: bool, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Path:
    """Refuse a folder output that is a file, holds an input, is non-empty without --force, or cannot be written.

    `--force` replaces only an earlier cleanse output (a folder holding a run record) or an empty folder, and never a
    folder that holds one of `inputs`: replacing a data folder by mistake would delete the data.
    """
    path = Path(path)
    _check_name(path)
    if path.exists() and not path.is_dir():
        raise CleanseError(f"{path}: output exists and is not a folder; choose another path with -o")
    for item in inputs:
        if item is not None and Path(item).exists() and _inside(Path(item), path):
            raise CleanseError(f"{path}: the output folder is an input or holds one ({item}); choose another -o")
    if path.exists() and any(path.iterdir()):
        if not force:
            raise CleanseError(f"{path}: output folder is not empty; pass --force to replace it or choose another -o")
        if not any(p.is_file() and (p.name == RUN_RECORD or p.name.endswith("." + RUN_RECORD)) for p in path.iterdir()):
            raise CleanseError(
                f"{path}: not a cleanse output (no run record: {RUN_RECORD} or *.{RUN_RECORD}), "
                "so --force will not replace it; choose another -o or empty the folder yourself"
            )
    _check_parent(path, "output folder's parent")
    return path


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, force: bool, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Iterator[Path]:
    """Build a directory output in a temporary folder beside the target, then rename it into place.

    See check_output_folder for what may be replaced.
    """
    import shutil

    path = check_output_folder(path, force=force, inputs=inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=_parent(path)))
    except OSError as exc:
        raise write_error(path, exc) from None
    os.chmod(tmp, _default_mode(directory=True))
    with _undo_on_error(lambda: shutil.rmtree(tmp, ignore_errors=True), path):
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)


class OutputSet:
    """All-or-nothing outputs: each file is written to a reserved temporary path, renamed on commit."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def reserve(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        try:
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".part", dir=_parent(final))
        except OSError as exc:
            raise write_error(final, exc) from None
        os.close(fd)
        os.chmod(tmp, _default_mode())
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        for tmp, final in self._pending:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise write_error(final, exc) from None
        self._pending.clear()

    def rollback(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending.clear()


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    outputs = OutputSet()
    with _undo_on_error(outputs.rollback, None):
        yield outputs
        outputs.commit()
