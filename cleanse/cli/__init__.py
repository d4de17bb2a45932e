"""The command line interface (thin: parse, call the engine, print)."""

from cleanse.cli.app import app, main

__all__ = ["app", "main"]
