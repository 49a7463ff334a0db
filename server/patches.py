"""Gram statistics of a convolution's im2col patches without building the patches.

Gradient fusion solves a convolution as a linear map on its im2col patches (LoCon,
docs/method.md, section 2): it needs ``G = P^T P`` ``[C k k, C k k]`` of the patch rows
``P`` and, per concept, ``D P^T P`` for the stacked down factors ``D``. Building ``P``
costs ``k^2`` copies of the input, and ``P^T P`` takes ``(C k^2)^2`` multiply-adds per
position.

For a stride-1 convolution the block ``(d, d')`` of ``G`` (kernel offsets ``d``, ``d'``)
is a lagged correlation of the zero-padded input with itself, ``sum_q x[q] x[q + e]^T``
over a window, and depends on the offsets almost only through their difference ``e = d'
- d``: the window differs from the whole overlap of the input and its shift by strips of
at most the padding's width. So each of the ``(2k - 1)^2`` lags is computed once over the
whole overlap (half of them, ``T_{-e} = T_e^T``), and each block is its lag minus the
strips its window leaves out. At 3x3 that is 13 full products instead of 81, plus
corrections that shrink with the image (a 16x16 latent: about 4x fewer operations, 64x64:
about 5x).

``patch_gram`` and ``patch_cross`` give exactly ``patches(x)^T patches(x)`` and ``D
patches(x)^T patches(x)`` (up to floating-point summation order); ``tests/test_patches.py``
compares them with the brute force. ``patch_gram`` is bitwise symmetric by construction
(``solve.symmetric``), whatever kernel the products ran on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .solve import symmetric

Pair = tuple[int, int]


def supported(stride: Pair, dilation: Pair) -> bool:
    """Whether the shortcut applies (stride 1, no dilation); otherwise build the patches."""
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)


def _span(lo: int, hi: int) -> range:
    return range(lo, max(lo, hi))


def _rect_product(xt: torch.Tensor, rows: range, cols: range, lag: Pair) -> torch.Tensor:
    """``sum_q xt[:, :, q] xt[:, :, q + lag]^T`` over ``q`` in ``rows x cols`` (``xt``:
    ``[C, B, Hp, Wp]``): ``[C, C]``."""
    ey, ex = lag
    c = xt.shape[0]
    a = xt[:, :, rows.start : rows.stop, cols.start : cols.stop].reshape(c, -1)
    b = xt[:, :, rows.start + ey : rows.stop + ey, cols.start + ex : cols.stop + ex]
    return a @ b.reshape(c, -1).T


def patch_gram(
    x: torch.Tensor,
    kernel_size: Pair,
    padding: Pair,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``P^T P`` for the im2col patches ``P`` of a stride-1 convolution of ``x`` ``[B, C, H,
    W]``, in ``F.unfold``'s column order (channel, kernel row, kernel column)."""
    kh, kw = kernel_size
    ph, pw = padding
    xt = F.pad(x.to(dtype), (pw, pw, ph, ph)).transpose(0, 1).contiguous()  # [C, B, Hp, Wp]
    c, _, hp, wp = xt.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the {kh}x{kw} kernel")
    # where the input is not padding: rows [ph, hp - ph), columns [pw, wp - pw)
    inner_r, inner_c = range(ph, hp - ph), range(pw, wp - pw)

    def overlap(inner: range, e: int) -> range:  # q in inner and q + e in inner
        return _span(max(inner.start, inner.start - e), min(inner.stop, inner.stop - e))

    lags: dict[Pair, torch.Tensor] = {}
    for ey in range(-(kh - 1), kh):
        for ex in range(-(kw - 1), kw):
            rows, cols = overlap(inner_r, ey), overlap(inner_c, ex)
            if (ey, ex) >= (0, 0) and rows and cols:
                lags[(ey, ex)] = _rect_product(xt, rows, cols, (ey, ex))
    offsets = [(a, b) for a in range(kh) for b in range(kw)]
    k = len(offsets)
    blocks = torch.zeros(k, k, c, c, dtype=dtype, device=x.device)
    for i, (a, b) in enumerate(offsets):
        for j in range(i, k):
            a2, b2 = offsets[j]
            e = (a2 - a, b2 - b)
            if e >= (0, 0):
                full = lags.get(e)
            else:
                back = lags.get((-e[0], -e[1]))
                full = None if back is None else back.T
            # the overlap's rectangle, and the part of it inside this offset's window
            rows, cols = overlap(inner_r, e[0]), overlap(inner_c, e[1])
            win_r = _span(max(rows.start, a), min(rows.stop, a + ho))
            win_c = _span(max(cols.start, b), min(cols.stop, b + wo))
            if full is None or not (win_r and win_c):  # nothing overlaps: the block stays 0
                continue
            block = blocks[i, j]
            block.copy_(full)
            for strip_r, strip_c in _outside(rows, cols, win_r, win_c):
                block -= _rect_product(xt, strip_r, strip_c, e)
            if j != i:
                blocks[j, i] = block.T
    n = c * k
    full_gram = blocks.reshape(kh, kw, kh, kw, c, c).permute(4, 0, 1, 5, 2, 3).reshape(n, n)
    # The off-diagonal blocks are mirrored above, but a diagonal block is a general product
    # of a strip with itself, which a BLAS kernel need not make bitwise symmetric.
    return symmetric(full_gram)


def _outside(rows: range, cols: range, win_r: range, win_c: range) -> list[tuple[range, range]]:
    """The rectangle ``rows x cols`` minus ``win_r x win_c`` (inside it) as disjoint strips."""
    strips = [
        (_span(rows.start, win_r.start), cols),  # above the window
        (_span(win_r.stop, rows.stop), cols),  # below
        (win_r, _span(cols.start, win_c.start)),  # left of it, on its rows
        (win_r, _span(win_c.stop, cols.stop)),  # right of it
    ]
    return [(r, c) for r, c in strips if r and c]


def patch_cross(
    x: torch.Tensor,
    down: torch.Tensor,
    kernel_size: Pair,
    padding: Pair,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``D P^T P`` ``[R, C k k]`` for down factors ``D`` ``[R, C k k]`` (flattened like
    ``patch_gram``'s columns) and the patches ``P`` of ``x`` ``[B, C, H, W]``.

    ``P`` is never built: with ``S_d`` the input shifted by kernel offset ``d`` (``[C,
    positions]``), ``Y = P D^T = sum_d D_d S_d`` and column block ``d`` of the result is
    ``Y S_d^T``.
    """
    kh, kw = kernel_size
    ph, pw = padding
    xp = F.pad(x.to(dtype), (pw, pw, ph, ph)).transpose(0, 1)  # [C, B, Hp, Wp]
    c, _, hp, wp = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    d = down.to(dtype).reshape(-1, c, kh, kw)
    shifted = [
        xp[:, :, a : a + ho, b : b + wo].reshape(c, -1) for a in range(kh) for b in range(kw)
    ]
    y = d[:, :, 0, 0] @ shifted[0]
    for i, s in enumerate(shifted[1:], start=1):
        y += d[:, :, i // kw, i % kw] @ s
    out = torch.stack([y @ s.T for s in shifted], dim=-1)  # [R, C, kh * kw]
    return out.reshape(d.shape[0], -1)
