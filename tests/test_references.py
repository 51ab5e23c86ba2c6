"""Every fastrank name that the tests, benchmarks and GPU scripts reference exists.

Many of these files run only where CI does not (a CUDA device, several processes, a long
benchmark): an import or an attribute renamed since they last ran would first fail on the
machine they are for. Checked statically: each ``from fastrank... import name`` resolves, and each
``alias.attribute`` read, ``setattr(alias, "attribute", ...)`` and
``monkeypatch.setattr(alias, "attribute", ...)`` on a fastrank module or class imported under
that alias names an attribute it has (aliases the file also assigns are skipped).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def _imported(node: ast.AST) -> list[tuple[str, str, str]]:
    """``(alias, module, name)`` per fastrank import of ``node`` (name "" for ``import module``)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastrank":
        return [(entry.asname or entry.name, node.module, entry.name) for entry in node.names]
    if isinstance(node, ast.Import):
        return [(entry.asname or entry.name.split(".")[0], entry.asname and entry.name or entry.name.split(".")[0], "")
                for entry in node.names if entry.name.split(".")[0] == "fastrank"]
    return []


def _resolve(module: str, name: str):
    """What ``from module import name`` (``import module`` when name is "") binds."""
    if not name:
        return importlib.import_module(module)
    try:
        return importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module), name)


def missing_references(source: str) -> list[str]:
    """The fastrank references of a Python ``source`` that do not resolve, as ``line: reference``."""
    tree = ast.parse(source)
    assigned = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    assigned |= {arg.arg for node in ast.walk(tree) if isinstance(node, ast.arguments)
                 for arg in [*node.posonlyargs, *node.args, *node.kwonlyargs]}
    missing, aliases = [], {}
    for node in ast.walk(tree):
        for alias, module, name in _imported(node):
            try:
                aliases[alias] = _resolve(module, name)
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] == "fastrank":
                    missing.append(f"{node.lineno}: from {module} import {name} ({error})")
                # else a dependency this machine lacks (Triton without the test extras): unchecked
            except (ImportError, AttributeError) as error:
                missing.append(f"{node.lineno}: from {module} import {name} ({error})")
    aliases = {alias: value for alias, value in aliases.items() if alias not in assigned}

    def check(line: int, alias: str, attribute: str) -> None:
        if alias in aliases and not hasattr(aliases[alias], attribute):
            missing.append(f"{line}: {alias}.{attribute}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and isinstance(node.ctx, ast.Load):
            check(node.lineno, node.value.id, node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name)
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            check(node.lineno, node.args[0].id, node.args[1].value)
    return missing


@pytest.mark.parametrize("path", FILES, ids=[str(path.relative_to(ROOT)) for path in FILES])
def test_fastrank_references_resolve(path):
    missing = missing_references(path.read_text())
    assert not missing, f"{path.relative_to(ROOT)} references fastrank names that do not exist: {missing}"


def test_a_renamed_reference_is_found():
    # The check itself: an import, an attribute read and a monkeypatched name that do not exist.
    source = (
        "import fastrank\n"
        "from fastrank.kernels import _launch\n"
        "from fastrank.rank import _no_such_function\n"
        "def test(monkeypatch):\n"
        "    _launch.PlanCache.replay\n"
        "    fastrank.no_such_layer\n"
        "    monkeypatch.setattr(_launch, 'no_such_helper', None)\n"
    )
    missing = missing_references(source)
    assert [entry.split(":")[0] for entry in missing] == ["3", "6", "7"], missing
