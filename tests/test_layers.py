"""The import layering of docs/contributing.md: each package imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cleanse"
LEAVES = {"errors", "registry", "version", "stats", "viz", "heatmap"}
FILES = LEAVES | {"files", "formats"}
ALLOWED: dict[str, set[str]] = {
    "files": LEAVES,
    "formats": LEAVES | {"files"},
    "data": FILES,
    "attacks": FILES | {"data"},
    "models": FILES,
    "training_defaults": FILES | {"data"},
    "engine": FILES | {"data", "attacks", "models"},
    "scan": FILES | {"data", "attacks", "models", "engine"},
    "recipes": FILES | {"data", "attacks", "models", "engine"},
    "report": FILES | {"data", "attacks", "models", "engine"},
    "record": FILES,
}
ALLOWED["jobs"] = set().union(*ALLOWED.values()) | set(ALLOWED) | LEAVES


def _imports(path: Path) -> set[str]:
    """The cleanse top-level packages/modules a file imports ("" for the package face `cleanse` itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cleanse":
                found.add(parts[1] if len(parts) > 1 else "")
    return found


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("layer", sorted(ALLOWED) + sorted(LEAVES))
def test_each_layer_imports_only_the_layers_below(layer: str) -> None:
    allowed = ALLOWED.get(layer, LEAVES)
    files = [p for p in PACKAGE.rglob("*.py") if _layer(p) == layer]
    assert files or layer in LEAVES, f"no module for layer {layer}"
    for path in files:
        wrong = _imports(path) - allowed - {layer}
        assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {sorted(wrong)} (the face '' is cleanse itself)"


def test_only_the_cli_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if _layer(path) not in ("cli", "__main__"):
            assert "cli" not in _imports(path), f"{path.relative_to(PACKAGE.parent)} imports cleanse.cli"
