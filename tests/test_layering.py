"""Imports flow one way: each layer imports only the layers below it (read from the source, not run).

    helpers        errors, plain_data, validation, atomic, data, memory, runtime, targets
    methods/       the protocol and one file per method
    model          the wrapper (knows no file format)
    peft_format    adapters on disk; saving, combine: above it
    train, config, runner, evaluation, predict, extract, merge_report, compare, report, cli, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deltatune"
# module -> deltatune modules it must never import (directly)
TOP = ("evaluation", "predict", "extract", "merge_report", "compare", "report", "demo")  # commands' own modules
FORBIDDEN = {
    "model": ("peft_format", "saving", "train", "config", "runner", "cli", "combine", *TOP),
    "methods": ("model", "peft_format", "saving", "train", "config", "runner", "cli", "combine", *TOP),
    "peft_format": ("saving", "train", "config", "runner", "cli"),
    "train": ("config", "runner", "cli", "peft_format", "saving", *TOP),
    "plain_data": ("*",),
    "validation": ("*",),
    "errors": ("*",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deltatune"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("deltatune"))
    return names


def sources(layer: str) -> list[Path]:
    folder = PACKAGE / layer
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    for path in sources(layer):
        for module in imported_modules(path):
            top = module.split(".")[1] if "." in module else "deltatune"
            if FORBIDDEN[layer] == ("*",):
                assert module == "deltatune.errors", f"{path.name} imports {module}"
            else:
                assert top not in FORBIDDEN[layer] and module != "deltatune", f"{path.name} imports {module}"


def test_no_import_is_deferred_past_the_top_of_a_file():
    for path in PACKAGE.rglob("*.py"):
        assert "noqa: E402" not in path.read_text(encoding="utf-8"), path
