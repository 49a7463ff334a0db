"""Check a ``.safetensors`` file's header before anything is allocated or parsed by torch.

safetensors itself is safe to parse (no code runs), but a hostile file can still ask for
much: a header length of gigabytes, tensors whose shapes claim more elements than the file
holds, dtypes we never use. ``check_header`` reads only the 8-byte length and the JSON
header, with bounds, and checks every entry: a known dtype, non-negative dimensions,
``prod(shape) * itemsize == end - begin``, offsets inside the file and tiling the data
exactly, and metadata made of strings. Loaders call it first and turn ``HeaderError`` into
their own error naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DIMS = 8


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file within our bounds."""


def check_header(
    path: str | Path,
    *,
    max_bytes: int,
    dtypes: frozenset[str] = FLOAT_DTYPES,
    max_tensors: int = 100_000,
) -> dict:
    """The parsed header (tensors only) if ``path`` is within bounds; ``HeaderError`` if not."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise HeaderError(f"{size} bytes is over the {max_bytes}-byte limit")
    if size < 8:
        raise HeaderError(f"{size} bytes: too short for a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise HeaderError(
                f"header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte cap"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise HeaderError(f"header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise HeaderError("metadata must map strings to strings")
    if len(header) > max_tensors:
        raise HeaderError(f"{len(header)} tensors is over the limit of {max_tensors}")
    data = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name!r}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in dtypes:
            raise HeaderError(
                f"tensor {name!r}: dtype {dtype!r} is not allowed ({', '.join(sorted(dtypes))})"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise HeaderError(f"tensor {name!r}: bad shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            raise HeaderError(f"tensor {name!r}: bad data offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data:
            raise HeaderError(
                f"tensor {name!r}: data offsets {offsets} lie outside the file's {data} data bytes"
            )
        if math.prod(shape) * ITEMSIZE[dtype] != end - begin:
            raise HeaderError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {math.prod(shape) * ITEMSIZE[dtype]} "
                f"bytes, the file gives it {end - begin}"
            )
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise HeaderError("tensor data overlaps or leaves gaps")
        position = end
    if position != data:
        raise HeaderError(f"{data - position} bytes after the last tensor")
    header["__metadata__"] = meta
    return header
