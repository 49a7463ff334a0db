"""The wheel ships every data file the package reads, and every import is declared."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"common": "mos/common", "client": "mos/client", "server": "mos/server",
            "proto": "mos/proto", "toyworld": "mos/toyworld"}  # fmt: skip
# import name -> distribution, for the third-party imports of the package
# (ray comes with the [sim] extra, flwr[simulation])
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "google": "protobuf", "grpc": "grpcio",
                 "ray": "flwr"}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel of a clean checkout: the tracked files copied out (so no build folder of
    an earlier build can add files), built without network."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True)
    src = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


@pytest.mark.slow
def test_the_wheel_holds_every_shipped_weight_and_config(wheel):
    names = set(wheel.namelist())
    weights = [p for p in (ROOT / "toyworld" / "weights").rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in weights)  # the sketch adapter's
    missing = [
        str(p.relative_to(ROOT))
        for p in weights
        if f"mos/toyworld/{p.relative_to(ROOT / 'toyworld').as_posix()}" not in names
    ]
    assert missing == []
    for package, target in PACKAGES.items():
        for src in (ROOT / package).glob("*.py"):
            assert f"{target}/{src.name}" in names


@pytest.mark.slow
def test_the_wheel_registers_the_named_base_and_adapter(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry).decode()
    assert "[mos.bases]" in text and "toy = mos.toyworld.model:toy_base" in text
    assert "[mos.adapters]" in text and "toy-sketch = mos.toyworld.model:toy_sketch_adapter" in text


def third_party_imports() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "mos"}


def test_every_third_party_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["sim"]]
    names = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
             for d in declared}  # fmt: skip
    undeclared = {m for m in third_party_imports() if DISTRIBUTIONS.get(m, m).lower() not in names}
    assert undeclared == set()
