"""The shape of the code: short functions in the command line and the sweep, modules a reader can hold.

A function's length counts from its ``def`` line (decorators excluded) to its last line,
``end_lineno - lineno + 1``; a nested function counts within its parent and on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cfgx"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
SHORT_FUNCTION_DIRS = ("cli", "sweep")


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def long_functions(folder: Path, limit: int = MAX_FUNCTION_LINES, root: Path = PKG.parent) -> list[str]:
    """'path:line name: N lines' for each function under ``folder`` longer than ``limit`` lines."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _span(node) > limit:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {_span(node)} lines")
    return out


def long_modules(folder: Path, limit: int = MAX_MODULE_LINES, root: Path = PKG.parent) -> list[str]:
    """'path: N lines' for each module under ``folder`` longer than ``limit`` lines."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


def test_cli_and_sweep_functions_fit_on_a_screen():
    long = [f for d in SHORT_FUNCTION_DIRS for f in long_functions(PKG / d)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_cfgx_module_is_over_400_lines():
    long = long_modules(PKG)
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_the_counters_flag_one_line_over_the_limit(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    lines = [f"    x{i} = {i}" for i in range(60)]
    (folder / "a.py").write_text("def fits():\n" + "\n".join(lines[:59]) + "\n\n\n@staticmethod\ndef over():\n"
                                 + "\n".join(lines) + "\n")
    assert long_functions(folder, root=tmp_path) == ["pkg/a.py:64 over: 61 lines"]
    (folder / "b.py").write_text("x = 1\n" * 400)
    (folder / "c.py").write_text("x = 1\n" * 401)
    assert long_modules(folder, root=tmp_path) == ["pkg/c.py: 401 lines"]
