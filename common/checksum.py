"""The SHA-256 digest of a set of tensors as they travel (names, wire dtypes, shapes, bytes):
what a concept package's manifest and a fused model's metadata carry, and what the
registry and the clients compare."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def wire_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as it travels: fp16 and fp32 as they are, anything else as fp32."""
    t = t.detach().to("cpu")
    if t.dtype not in (torch.float16, torch.float32):
        t = t.float()
    return t.contiguous().numpy()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and the bytes as they travel."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        nd = wire_numpy(tensors[key])
        h.update(f"{key}|{nd.dtype}|{list(nd.shape)}|".encode())
        h.update(nd.tobytes())
    return h.hexdigest()
