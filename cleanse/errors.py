"""Exceptions that map to the documented exit codes.

0 success / no backdoor, 1 backdoor suspected (scan only), 2 bad input or
usage, 3 internal error, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SUSPECTED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class CleanseError(Exception):
    """Bad input or usage: one line that names the problem and the fix; exit 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # always one line


class Terminated(BaseException):
    """Raised from the SIGTERM handler so cleanup runs like for Ctrl-C."""

    exit_code = EXIT_SIGTERM
