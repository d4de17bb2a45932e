"""Hardening, command-line arguments: out-of-range and malformed options, the clean subset, and output paths that
would overwrite an input or cannot be written; plus --debug, the one way to see a traceback (internal errors only).

The corpus cases live in tests/hardening_corpus.py (ARGUMENT_CASES).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import pytest
from hardening_corpus import ARGUMENT_CASES, Case, check_bad_input
from helpers import error_line
from typer.testing import CliRunner

from cleanse.cli import app

runner = CliRunner()


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=[c.id for c in ARGUMENT_CASES])
def test_bad_input(case: Case, inp: dict[str, Path], tmp_path: Path) -> None:
    check_bad_input(case, inp, tmp_path)


def test_unwritable_output_folder(inp: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip(
                "running as root: a chmod-ed folder stays writable (the /proc and parent-is-a-file cases cover this)"
            )
        result = runner.invoke(app, ["poison", str(inp["d10"]), "-o", str(folder / "p.safetensors")])
        assert result.exit_code == 2 and "output folder is not writable" in error_line(result)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_debug_shows_a_traceback_only_for_internal_errors(inp: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    result = runner.invoke(app, ["train", str(inp["d10"]), "-o", str(inp["d10"]), "--force", "--debug"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    train_job = importlib.import_module("cleanse.jobs.train")  # the module: cleanse.jobs.train is also the job function

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(train_job, "load_data", boom)
    quiet = runner.invoke(app, ["train", str(inp["d10"]), "-o", str(tmp_path / "m.safetensors")])
    assert (
        quiet.exit_code == 3
        and "Traceback" not in quiet.output
        and "internal error: RuntimeError: boom" in quiet.stderr
    )
    loud = runner.invoke(app, ["train", str(inp["d10"]), "-o", str(tmp_path / "m.safetensors"), "--debug"])
    assert loud.exit_code == 3 and "Traceback" in loud.stderr
    assert list(tmp_path.iterdir()) == []
