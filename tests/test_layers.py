"""The package's layers only point down: common (and the generated proto) at the bottom,
client and server beside each other above it, the toy world (and its demo) on top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("proto", "common", "client", "server", "toyworld")
# what each package may import from the others
ALLOWED = {
    "proto": {"proto"},
    "common": {"common", "proto"},
    "client": {"client", "common", "proto"},
    "server": {"server", "common", "proto"},
    "toyworld": set(LAYERS),
}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """The ``mos`` packages a module imports (at any depth: in functions too), with lines."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                target = package
            elif node.level >= 2:
                target = (node.module or "").split(".")[0]
            else:
                parts = (node.module or "").split(".")
                target = parts[1] if parts[0] == "mos" and len(parts) > 1 else ""
            if target:
                out.add((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "mos" and len(parts) > 1:
                    out.add((parts[1], node.lineno))
    return out


def upward_imports() -> list[str]:
    problems = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target, line in sorted(imported_packages(path, package)):
                if target in LAYERS and target not in ALLOWED[package]:
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports mos.{target}")
    return problems


def test_no_module_imports_a_layer_above_or_beside_it():
    assert upward_imports() == []


def test_the_check_sees_relative_absolute_and_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from ..server.fusion import X\n"
        "import mos.toyworld.model\n"
        "def f():\n    from mos.client import cli\n"
        "from .base import Y\n"
    )
    found = imported_packages(module, "common")
    assert found == {("server", 1), ("toyworld", 2), ("client", 4), ("common", 5)}
