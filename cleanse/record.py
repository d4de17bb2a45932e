"""Run records: the JSON every command that changes or measures a model writes beside its output."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cleanse.files import sha256_file
from cleanse.version import __version__

RUN_SCHEMA = 1


def record_path(output: str | Path) -> Path:
    """X -> X.run.json for a file output; D/run.json for a directory output."""
    output = Path(output)
    try:
        is_dir = output.is_dir()
    except OSError:  # e.g. a name too long to stat: check_output names the problem
        is_dir = False
    return output / "run.json" if is_dir else output.with_name(output.name + ".run.json")


def describe_input(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(str(path))
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    return {"path": str(path)}


def versions(device: torch.device | str | None = None) -> dict[str, Any]:
    return {
        "cleanse": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device) if device is not None else None,
        "threads": torch.get_num_threads(),
    }


def new_record(command: str, argv: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "cleanse_run": RUN_SCHEMA,
        "command": command,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }
