"""The `cleanse` command line: one typer app, one top-level handler that owns the exit codes."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from cleanse.cli.common import SESSION, console
from cleanse.cli.demo import demo_command
from cleanse.cli.explain import explain_command
from cleanse.cli.poison import poison_command
from cleanse.cli.report import report_command
from cleanse.cli.scan import scan_command
from cleanse.cli.train import train_command
from cleanse.cli.unlearn import unlearn_command
from cleanse.engine.memory import is_out_of_memory
from cleanse.errors import EXIT_INTERNAL, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, CleanseError, Terminated
from cleanse.files import is_write_error
from cleanse.version import __version__


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _stopped(what: str) -> str:
    """One line: what stopped the run, where it was, and that no output was written."""
    where = f" {SESSION.progress}" if SESSION.progress else ""
    resume = SESSION.resume_file
    note = (
        f"; the last checkpoint is in {resume}: rerun the same command with --resume to continue"
        if resume and resume.is_file()
        else ""
    )
    return f"{what}{where}; no output was written{note}"


class Interrupted(BaseException):
    """Ctrl-C inside a command, carried past typer (which would turn it into a bare exit 130)."""


class CleanseGroup(TyperGroup):
    """Runs click without its own exception handling and maps every outcome to a documented exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (e.g. some test runners)
            previous = None
        try:
            code = self._run(argv, prog_name, windows_expand_args=windows_expand_args, **extra)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def _run(self, argv: list[str], prog_name: Any, **extra: Any) -> int:
        debug = "--debug" in argv
        try:
            result = super().main(args=argv, prog_name=prog_name or "cleanse", standalone_mode=False, **extra)
            return result if isinstance(result, int) else 0
        except Exit as exc:
            return exc.exit_code
        except CleanseError as exc:
            console.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
            return exc.exit_code
        except TyperException as exc:  # click-style usage errors (bad option, missing argument ...)
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show(file=sys.stderr)  # type: ignore[attr-defined]
            else:
                ctx = getattr(exc, "ctx", None)
                where = ctx.command_path if ctx is not None else "cleanse"
                console.print(
                    f"error: {exc.format_message()} (see '{where} --help')",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            return EXIT_USAGE
        except (Interrupted, KeyboardInterrupt, Abort):
            console.print(_stopped("interrupted (SIGINT)"), markup=False, highlight=False, soft_wrap=True)
            return EXIT_SIGINT
        except Terminated:
            console.print(_stopped("terminated (SIGTERM)"), markup=False, highlight=False, soft_wrap=True)
            return EXIT_SIGTERM
        except Exception as exc:
            if is_out_of_memory(exc):  # a usage limit, not a bug: name what lowers the footprint
                command = next((a for a in argv if a in LOWER_FOOTPRINT), None)
                fix = LOWER_FOOTPRINT.get(command or "", "use a smaller input")
                console.print(
                    f"error: out of memory{f' in cleanse {command}' if command else ''}: {fix}, free memory on the "
                    "device, or run on another --device",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
                return EXIT_USAGE
            if is_write_error(exc):  # the file system refused (read-only, full, name too long): bad input, not a bug
                where = getattr(exc, "filename", None) or "a file"
                console.print(
                    f"error: {where}: {exc.strerror} "
                    "(the file system refused; check the path, permissions and free space)",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
                return EXIT_USAGE
            if debug or SESSION.debug:
                traceback.print_exc()
            console.print(
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                markup=False,
                soft_wrap=True,
            )
            return EXIT_INTERNAL


# What lowers each command's memory footprint, for the one line an allocation failure exits 2 with (scan's own
# out-of-memory message, from inside the job, names the detector and chunk as well).
LOWER_FOOTPRINT = {
    "train": "lower --batch-size",
    "unlearn": "lower --memory-budget, or the recipe's batch with --param batch_size=N",
    "scan": "lower --memory-budget",
    "explain": "explain fewer images (--n)",
    "report": "draw fewer images per sheet (--n)",
    "poison": "poison a smaller DATA",
    "demo": "run cleanse demo --quick",
}


app = typer.Typer(
    cls=CleanseGroup,
    name="cleanse",
    help="Audit image classifiers for backdoors and remove them.\n\nExit codes: 0 ok / no backdoor found, "
    "1 backdoor suspected (scan), 2 bad input or usage, 3 internal error, 130 interrupted, 143 terminated.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cleanse {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Audit image classifiers for backdoors and remove them."""


app.command("poison")(poison_command)
app.command("train")(train_command)
app.command("scan")(scan_command)
app.command("unlearn")(unlearn_command)
app.command("explain")(explain_command)
app.command("report")(report_command)
app.command("demo")(demo_command)


def main() -> None:
    app()
