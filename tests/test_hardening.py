"""Hardening against hostile or broken input: safetensors headers checked before anything is
allocated, names that could become paths, and state files that survive a crash anywhere.

(Photo-folder bombs, truncated and 0-byte files: tests/test_data.py; lying package
metadata: tests/test_package.py; verified, resumable hub downloads: tests/test_hub.py.)
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mos.common.base import build_tiny
from mos.common.concepts import ConceptError, parse_concept_name
from mos.common.fused import FusedModel
from mos.common.package import ConceptPackage, PackageError
from mos.common.safecheck import HeaderError, check_header
from mos.server.registry import Registry
from tests.conftest import random_fused, random_package


def raw_file(path, header: dict, data: bytes = b"", length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def test_a_valid_file_passes_and_its_header_is_returned(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file(
        {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path), {"k": "v"}
    )
    header = check_header(path, max_bytes=10_000)
    assert header["a"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        ({}, b"", 2**40, "header length"),  # asks for a terabyte of header
        ({}, b"", 10_000, "header length"),  # longer than the file
        ({"x": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16, None, "needs 4000000000000 bytes"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8, None, "outside"),
        ({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype 'I64' is not allowed"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "bad shape"),
        ({"x": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, None, "bad shape"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "overlaps"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12, None, "after the last"),
        ({"__metadata__": {"a": 1}}, b"", None, "strings"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, b"\0" * 4, None, "malformed"),
    ],
)  # fmt: skip
def test_hostile_headers_are_refused_before_allocation(tmp_path, header, data, length, message):
    path = raw_file(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(HeaderError, match=message):
        check_header(path, max_bytes=10_000)


def test_loaders_refuse_hostile_files_naming_them(tmp_path):
    bomb = raw_file(
        tmp_path / "bomb.safetensors",
        {"x": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    with pytest.raises(PackageError, match="bomb.safetensors"):
        ConceptPackage.load(bomb)
    with pytest.raises(PackageError, match="bomb.safetensors"):
        FusedModel.load_compact(bomb)
    text = tmp_path / "junk.safetensors"
    text.write_bytes(b"\x05\0\0\0\0\0\0\0{]]]]")
    with pytest.raises(PackageError, match="not JSON"):
        ConceptPackage.load(text)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../../etc/passwd",
        "/abs",
        "a/b",
        "a\\b",
        "a\x00b",
        "x" * 65,
        "",
        ".",
        "..",
        "a b",
        "<dog1",
    ],
)
def test_concept_names_can_never_become_paths(name):
    with pytest.raises(ConceptError):
        parse_concept_name(name)


def test_a_crash_at_any_write_leaves_the_registry_loadable(tmp_path, monkeypatch):
    """Let the k-th rename of an atomic write fail (as a crash there would), for every k."""
    import mos.common.files as files

    base = build_tiny()
    real_replace = files.os.replace
    pkgs = [random_package(base, n, seed=i) for i, n in enumerate(["dog1", "cat2"])]
    fused = random_fused(base, pkgs)
    k = 0
    while True:
        state = tmp_path / f"s{k}"
        reg = Registry.open(state, base)
        calls = {"n": 0}

        def failing_replace(src, dst, calls=calls, k=k):
            if calls["n"] == k:
                raise OSError("simulated crash")
            calls["n"] += 1
            return real_replace(src, dst)

        monkeypatch.setattr(files.os, "replace", failing_replace)
        crashed = False
        try:
            for p in pkgs:
                reg.accept(p, origin="t")
            reg.publish(fused)
        except OSError:
            crashed = True
        finally:
            monkeypatch.setattr(files.os, "replace", real_replace)
        again = Registry.open(state, base)  # always loadable ...
        for name in again.entries:  # ... and everything it lists is whole
            again.package(name)
        for mv in again.models:
            assert sorted(c.name for c in again.load_model(mv).concepts) == ["cat2", "dog1"]
        assert not list(state.rglob(".*.tmp")), "temporary files left behind"
        if not crashed:
            assert len(again.models) == 1 and len(again.entries) == 2
            break
        k += 1
    assert k >= 4  # every write of accept and publish was interrupted once
