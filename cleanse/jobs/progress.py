"""How a job tells its caller what it is doing: notes, live loops, finished sub-results, its resume checkpoint.

Jobs never print. The CLI passes a Progress that renders (a rich Live table on a terminal, plain
lines otherwise, nothing with --quiet); Python callers get `SILENT` unless they pass their own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cleanse.engine.events import Callback, silent


class Progress(Protocol):
    def note(self, message: str, style: str | None = None) -> None:
        """A line for the human reader (a data note, a warning, where a resumed run starts)."""

    def loop(self, kind: str, title: str, total: int | None = None) -> AbstractContextManager[Callback]:
        """A long loop of `kind` (train, unlearn, scan): the returned callback receives its engine events."""

    def finished(self, result: Any) -> None:
        """A job inside a composite job (demo) has finished with `result`."""

    def resumable(self, path: Path | None) -> None:
        """The checkpoint an interruption would leave for --resume (None: none any more)."""


class Silent:
    """A Progress that reports nothing: the default for Python callers."""

    def note(self, message: str, style: str | None = None) -> None:
        pass

    def loop(self, kind: str, title: str, total: int | None = None) -> AbstractContextManager[Callback]:
        return nullcontext(silent)

    def finished(self, result: Any) -> None:
        pass

    def resumable(self, path: Path | None) -> None:
        pass


SILENT = Silent()


@dataclass
class Figures:
    """CA/ASR/RA figures of one or more models, for a composite job to show as one table."""

    title: str
    rows: list[tuple[str, dict[str, Any]]]
