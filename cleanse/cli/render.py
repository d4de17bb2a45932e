"""Render engine events: a rich Live table on a terminal, plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.live import Live
from rich.table import Table

from cleanse.cli.common import SESSION, console, emit_json, fmt_rate, say
from cleanse.cli.options import Common
from cleanse.engine.distributed import current, launched, leave
from cleanse.engine.events import Callback, Event
from cleanse.errors import CleanseError
from cleanse.jobs import SPLIT_OVER_RANKS, Figures, Progress, RunSettings
from cleanse.jobs.inputs import ONE_PROCESS

Column = tuple[str, str, Callable[[Any], str]]


def rate_cell(v: Any) -> str:
    return fmt_rate(v)


def float_cell(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def seconds_cell(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}s"


TRAIN_COLUMNS: list[Column] = [
    ("epoch", "epoch", float_cell),
    ("loss", "loss", float_cell),
    ("lr", "lr", float_cell),
    ("train_accuracy", "train acc", rate_cell),
    ("clean_accuracy", "CA", rate_cell),
    ("attack_success_rate", "ASR", rate_cell),
    ("elapsed", "elapsed", seconds_cell),
]


class Monitor:
    """Callable event sink; use as a context manager around the engine call."""

    MAX_ROWS = 30

    def __init__(self, title: str, columns: list[Column], total: int | None = None) -> None:
        self.title, self.columns, self.total = title, columns, total
        self.rows: list[dict[str, Any]] = []
        self.live: Live | None = None

    def __enter__(self) -> Monitor:
        if not SESSION.quiet and console.is_terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)
            self.live = None

    def __call__(self, event: Event) -> None:
        self._track(event)
        if SESSION.quiet:
            return
        if event.kind == "start" and "epochs" in event.data:
            self.total = event.data["epochs"]
        elif event.kind == "row":
            self.rows.append(dict(event.data))
            if self.live is not None:
                self.live.update(self._table())
            else:
                console.print(self._line(event.data), markup=False, highlight=False, soft_wrap=True)
        elif event.kind == "note":
            message = event.data.get("message", "")
            if self.live is not None:
                self.live.console.print(message, markup=False)
            else:
                console.print(message, markup=False, soft_wrap=True)

    def _track(self, event: Event) -> None:
        """Keep SESSION.progress current, so an interrupt can say where it stopped (even with --quiet)."""
        if event.kind == "start" and "epochs" in event.data:
            total = event.data["epochs"]
            SESSION.progress = f"during epoch {event.data.get('first_epoch', 1)}/{total} of {self.title}"
        elif event.kind == "row" and isinstance(event.data.get("epoch"), int):
            done, total = event.data["epoch"], self.total
            phase = event.data.get("phase")
            if total:
                where = f"during epoch {done + 1}/{total}" if done < total else f"after epoch {done}/{total}"
            else:
                where = f"after epoch {done}" if done else "before the first epoch"
            shown = phase and phase != "start" and phase not in self.title
            SESSION.progress = f"{where} of {self.title}" + (f" ({phase})" if shown else "")
        elif event.kind == "row" and event.data.get("step") is not None:
            SESSION.progress = f"after step {event.data['step']} of {self.title}"

    def _line(self, row: dict[str, Any]) -> str:
        parts = []
        for key, header, fmt in self.columns:
            if key in row:
                value = fmt(row[key])
                if key == "epoch" and self.total:
                    value = f"{value}/{self.total}"
                parts.append(f"{header} {value}")
        return f"{self.title}: " + "  ".join(parts)

    def _table(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        present = [c for c in self.columns if any(c[0] in r for r in self.rows)] or self.columns
        for _, header, _ in present:
            table.add_column(header, justify="right")
        for row in self.rows[-self.MAX_ROWS :]:
            table.add_row(*[fmt(row.get(key)) for key, _, fmt in present])
        return table


def metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title, title_justify="left")
    for header in ("", "CA", "ASR", "RA"):
        table.add_column(header, justify="right" if header else "left")
    for name, m in rows:
        table.add_row(
            name,
            fmt_rate(m.get("clean_accuracy")),
            fmt_rate(m.get("attack_success_rate")),
            fmt_rate(m.get("robust_accuracy")),
        )
    return table


def show(renderable: Any) -> None:
    if not SESSION.quiet:
        console.print(renderable)


# Each command module registers how its job's result is shown; composite jobs (demo) show sub-results through it.
VIEWS: dict[type, Callable[[Any], None]] = {}
LOOP_VIEWS: dict[str, tuple[list[Column], Callable[[Event], Event] | None]] = {"train": (TRAIN_COLUMNS, None)}


def view(result_type: type) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    def register(render: Callable[[Any], None]) -> Callable[[Any], None]:
        VIEWS[result_type] = render
        return render

    return register


class CliProgress:
    """The jobs' Progress on the terminal: notes to stderr, live tables for loops, registered views for results."""

    def note(self, message: str, style: str | None = None) -> None:
        say(message, style)

    @contextmanager
    def loop(self, kind: str, title: str, total: int | None = None) -> Iterator[Callback]:
        columns, summarise = LOOP_VIEWS[kind]
        with Monitor(title, columns, total) as monitor:
            if summarise is None:
                yield monitor
            else:
                yield lambda event: monitor(summarise(event) if event.kind == "row" else event)

    def finished(self, result: Any) -> None:
        VIEWS[type(result)](result)

    def resumable(self, path: Path | None) -> None:
        SESSION.resume_file = path


PROGRESS = CliProgress()
Opts = TypeVar("Opts")


class JobResult(Protocol):
    def to_json(self) -> Any: ...


R = TypeVar("R", bound=JobResult)


def run_job(job: Callable[[Opts, RunSettings, Progress], R], options: Opts, common: Common) -> R:
    """What every command does once its flags are parsed: run the job, show its result, print its JSON with --json."""
    if launched() and job not in SPLIT_OVER_RANKS:  # N copies would each do the whole job and write the same files
        raise CleanseError(ONE_PROCESS)
    result = job(options, common.settings(), PROGRESS)
    if not current().main:  # under torchrun rank 0 reports; the others wait for it, then leave
        leave()
        return result
    PROGRESS.finished(result)
    if common.json_out:
        emit_json(result.to_json())
    leave()
    return result


@view(Figures)
def show_figures(figures: Figures) -> None:
    show(metrics_table(figures.title, figures.rows))
