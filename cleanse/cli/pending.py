"""Subcommands whose issues have not landed yet: they say so in one line and exit 2."""
from __future__ import annotations

import typer

from cleanse.errors import CleanseError

PENDING = {
    "scan": ("Detect a backdoor, its target class and reverse its trigger (not built yet).", "#6"),
    "report": ("JSON, Markdown and HTML reports from run records (not built yet).", "#7"),
}


def register_pending(app: typer.Typer, *names: str) -> None:
    for name in names:
        summary, issue = PENDING[name]
        def command(ctx: typer.Context, _name: str = name, _issue: str = issue) -> None:
            raise CleanseError(f"cleanse {_name} is not built yet (issue {_issue}); available now: poison, train, unlearn, explain, demo")

        command.__doc__ = summary
        app.command(name, help=summary, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
