"""Find the run records a report is built from: JSON files with a top-level `cleanse_run` key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanse.errors import CleanseError

KNOWN = ("train", "scan", "unlearn", "explain", "poison", "demo")


@dataclass
class Record:
    path: Path
    doc: dict[str, Any]

    @property
    def command(self) -> str:
        return str(self.doc.get("command"))

    @property
    def folder(self) -> Path:
        return self.path.parent

    def result(self) -> dict[str, Any] | None:
        """The result file a record points to (`scan.json`, `explain.json`), when it is still there."""
        name = self.doc.get("result")
        if not isinstance(name, str):
            return None
        path = self.folder / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "cleanse_run" in doc and "command" in doc else None


def find_records(inputs: list[str]) -> list[Record]:
    """Run records from files and (recursively) folders, in a stable order; bad inputs exit 2."""
    found: dict[Path, Record] = {}
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise CleanseError(
                f"{path}: no such file or folder; pass run records (*.run.json, run.json) or folders holding them"
            )
        candidates = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        hits = 0
        for candidate in candidates:
            doc = _read(candidate)
            if doc is not None:
                found[candidate.resolve()] = Record(candidate, doc)
                hits += 1
        if path.is_file() and not hits:
            raise CleanseError(
                f"{path}: not a cleanse run record (no top-level 'cleanse_run' key); pass the .run.json a command wrote"
            )
    records = sorted(
        found.values(),
        key=lambda r: (
            KNOWN.index(r.command) if r.command in KNOWN else len(KNOWN),
            str(r.doc.get("created")),
            str(r.path),
        ),
    )
    return records
