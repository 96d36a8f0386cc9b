"""Shape limits on library code that ruff does not check: no function longer than 80 lines.

Complexity (C901), branches (PLR0912) and statements (PLR0915) are ruff's, in pyproject.toml.
Length is here because ruff has no rule for it; a long function is one that does several things,
and a file one can read in a sitting is made of functions that each do one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("pipeline", "launch")
MAX_FUNCTION_LINES = 80


def _function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function in one file.

    The length runs from the `def` (or its first decorator) to the last line of the body,
    docstring and comments included: what a reader has to scroll through.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                last = child.end_lineno or child.lineno
                found.append((prefix + child.name, first, last - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _library_files() -> list[Path]:
    return sorted(p for pkg in CHECKED_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_library_files_are_found():
    files = _library_files()
    assert any(p.parts[-2:] == ("train", "trainer.py") for p in files), files


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_longer_than_limit(path: Path):
    too_long = [
        f"{path.relative_to(ROOT)}:{line} `{name}` is {length} lines (> {MAX_FUNCTION_LINES})"
        for name, line, length in _function_lengths(path)
        if length > MAX_FUNCTION_LINES
    ]
    if too_long:
        pytest.fail("functions too long; split them into named helpers:\n" + "\n".join(too_long))
