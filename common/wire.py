"""Concept packages and fused models as Flower records (what travels in a ``Message``).

A concept package becomes an ``ArrayRecord`` (its tensors as fp16/fp32 NumPy arrays; Flower
cannot carry bf16, so bf16 goes as fp32) and a ``ConfigRecord`` (its manifest: the same
strings as the ``.safetensors`` header). A fused model travels the same way. Nothing is ever
pickled: Flower serialises arrays with ``np.save(allow_pickle=False)``, and
:func:`arrays_to_tensors` checks every array's declared dtype, shape and byte size against
a limit *before* decoding it.

Both directions carry a SHA-256 (``checksum.digest``) over names, dtypes, shapes and bytes, so
the receiver can tell that what it stores is what was sent.
"""

from __future__ import annotations

import json
import math

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .checksum import digest, wire_numpy
from .fused import FusedModel
from .package import MAX_PACKAGE_BYTES, ConceptPackage, PackageError

WIRE_DTYPES = {"float16": 2, "float32": 4}
MAX_FUSED_BYTES = 4 << 30  # a fused SD 1.x model of 50 rank-4 concepts is ~0.2 GB


def tensors_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``{name: tensor}`` as an ``ArrayRecord`` of fp16/fp32 NumPy arrays (sorted names)."""
    return ArrayRecord({k: Array(wire_numpy(tensors[k])) for k in sorted(tensors)})


def arrays_to_tensors(
    arrays: ArrayRecord, max_bytes: int, what: str = "record"
) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` after checking dtypes, shapes and sizes (nothing pickled)."""
    total = 0
    for key, arr in arrays.items():
        if arr.stype != "numpy.ndarray":
            raise PackageError(f"{what}: array {key} has serialisation {arr.stype!r}")
        if arr.dtype not in WIRE_DTYPES:
            raise PackageError(f"{what}: array {key} has dtype {arr.dtype}; only fp16/fp32 go")
        if any((not isinstance(n, int)) or n < 0 for n in arr.shape) or len(arr.shape) > 4:
            raise PackageError(f"{what}: array {key} has a bad shape {arr.shape}")
        total += math.prod(arr.shape) * WIRE_DTYPES[arr.dtype]
        if total > max_bytes or len(arr.data) > max_bytes:
            raise PackageError(f"{what}: more than the {max_bytes}-byte limit")
    out = {}
    for key, arr in arrays.items():
        try:
            nd = arr.numpy()
        except (ValueError, TypeError, OSError) as err:
            raise PackageError(f"{what}: array {key} does not decode ({err})") from err
        if str(nd.dtype) != arr.dtype or tuple(nd.shape) != tuple(arr.shape):
            raise PackageError(f"{what}: array {key} is not the {arr.dtype}{arr.shape} it claims")
        out[key] = torch.from_numpy(nd.copy())
    return out


def package_to_records(package: ConceptPackage) -> tuple[ArrayRecord, ConfigRecord]:
    """A package as (arrays, manifest). The manifest carries the digest of the arrays."""
    manifest = dict(package.metadata())
    manifest["sha256"] = package.sha256
    return tensors_to_arrays(package.tensors()), ConfigRecord(manifest)


def package_from_records(
    arrays: ArrayRecord,
    manifest: ConfigRecord,
    max_bytes: int = MAX_PACKAGE_BYTES,
    origin: str = "reply",
) -> ConceptPackage:
    """Validate and rebuild a package (format, sizes, digest, shapes, finite values). The
    manifest must carry the arrays' SHA-256; it is computed once here and kept as the
    package's ``sha256``."""
    meta = {k: v for k, v in manifest.items() if isinstance(v, str)}
    sent = meta.pop("sha256", "")
    if not sent:
        raise PackageError(f"{origin}: the manifest has no sha256 of its arrays")
    tensors = arrays_to_tensors(arrays, max_bytes, origin)
    received = digest(tensors)
    if received != sent:  # first: what arrived is not what was sent
        raise PackageError(f"{origin}: the arrays do not match the manifest's sha256")
    package = ConceptPackage.from_parts(tensors, meta, origin=origin)
    package.seed_sha256(received, tensors)
    return package


def fused_to_records(fused: FusedModel, version: int) -> tuple[ArrayRecord, ConfigRecord]:
    """A ``FusedModel`` as (arrays, meta); ``meta`` has the table, version and digest."""
    tensors = fused.tensors()
    meta = {
        "table": json.dumps(fused.table_json()),
        "version": version,
        "sha256": digest(tensors),
    }
    return tensors_to_arrays(tensors), ConfigRecord(meta)


def fused_from_records(
    arrays: ArrayRecord, meta: ConfigRecord, max_bytes: int = MAX_FUSED_BYTES
) -> tuple[FusedModel, int]:
    """Rebuild and verify a ``FusedModel``; returns ``(fused, version)``."""
    tensors = arrays_to_tensors(arrays, max_bytes, "fused model")
    if meta.get("sha256") != digest(tensors):
        raise PackageError("fused model: the arrays do not match the sha256 the server sent")
    try:
        table = json.loads(str(meta["table"]))
        version = int(meta["version"])
    except (KeyError, ValueError, TypeError) as err:
        raise PackageError(f"fused model: bad metadata ({err})") from err
    return FusedModel.from_tensors(tensors, table, origin="fused model"), version
