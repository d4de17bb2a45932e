"""The versioned file formats cleanse writes, and the one reader that checks which one a file is.

Every cleanse file is a safetensors file whose string metadata holds one JSON document under the key
`cleanse`, starting with `format` (what the file is, e.g. `cleanse.trigger`) and `format_version` (the
layout of the rest). Each kind of file declares one FileFormat beside its own code, with the messages
its users see; the file's own fields are checked by that code after `FileFormat.read`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from cleanse.errors import CleanseError
from cleanse.files import read_cleanse_metadata, read_safetensors, read_safetensors_mapped


@dataclass(frozen=True)
class FileFormat:
    """One versioned file format: its name, the version written, and the one-line errors for other files.

    The messages are `str.format` templates, each with `{path}`; `wrong_format` may use `{found}` (the file's own
    `format`, or "unknown"), `wrong_version` `{version}` (the file's `format_version`, repr) and `{supported}` (the
    versions this cleanse reads). `no_metadata` is the error for a file without `cleanse` metadata; by default
    `wrong_format` with `{found}` "no 'cleanse' metadata".
    """

    name: str
    version: int
    wrong_format: str
    wrong_version: str
    no_metadata: str | None = None
    readable: tuple[int, ...] = ()  # older versions this cleanse still reads

    def header(self) -> dict[str, Any]:
        """The `format`/`format_version` fields that start every document of this format."""
        return {"format": self.name, "format_version": self.version}

    def check(self, doc: dict[str, Any] | None, path: str | os.PathLike) -> dict[str, Any]:
        """`doc` if it is this format at a version this cleanse reads; else a one-line CleanseError."""
        if doc is None:
            if self.no_metadata is not None:
                raise CleanseError(self.no_metadata.format(path=path))
            raise CleanseError(self.wrong_format.format(path=path, found="no 'cleanse' metadata"))
        if doc.get("format") != self.name:
            raise CleanseError(self.wrong_format.format(path=path, found=doc.get("format", "unknown")))
        version = doc.get("format_version")
        supported = (self.version, *self.readable)
        if isinstance(version, bool) or not isinstance(version, int) or version not in supported:
            raise CleanseError(
                self.wrong_version.format(
                    path=path, version=repr(version), supported=", ".join(str(v) for v in supported)
                )
            )
        return doc

    def read(self, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and checked `cleanse` document of a file of this format."""
        tensors, doc = _read(path)
        return tensors, self.check(doc, path)

    def read_or_raw(
        self, path: str | os.PathLike, mapped: tuple[str, ...] = ()
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Like `read`, but a file without `cleanse` metadata gives None for the caller to judge (a raw state dict).
        The tensors named in `mapped` are memory-mapped, not read (see `read_safetensors_mapped`)."""
        tensors, doc = _read(path, mapped)
        return tensors, None if doc is None else self.check(doc, path)


def _read(
    path: str | os.PathLike, mapped: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    tensors, metadata = read_safetensors_mapped(path, mapped) if mapped else read_safetensors(path)
    return tensors, read_cleanse_metadata(metadata, path)
