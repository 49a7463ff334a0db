"""Gram statistics of im2col patches computed from the input (server/patches.py) against
the brute force: build the patches with ``F.unfold`` and multiply."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mos.common.lora import LoRAConv2d
from mos.server.patches import patch_cross, patch_gram, supported
from mos.server.recorder import GramRecorder


def _patches(x: torch.Tensor, kernel, padding) -> torch.Tensor:
    cols = F.unfold(x.double(), kernel, 1, padding, 1)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


CASES = [
    # (batch, channels, height, width), kernel, padding
    ((2, 3, 6, 5), (3, 3), (1, 1)),  # the UNet's ResNet convolutions
    ((1, 2, 4, 4), (3, 3), (0, 0)),  # no padding: every window is inside
    ((2, 2, 7, 5), (5, 3), (2, 1)),
    ((1, 1, 3, 3), (3, 3), (2, 2)),  # padding wider than the image's half
    ((1, 2, 2, 3), (3, 3), (1, 1)),  # image smaller than the kernel's reach
    ((3, 4, 6, 6), (1, 1), (0, 0)),
    ((1, 2, 5, 5), (2, 2), (1, 0)),  # even kernels, uneven padding
    ((2, 2, 1, 6), (1, 3), (0, 1)),
]


@pytest.mark.parametrize(("shape", "kernel", "padding"), CASES)
def test_patch_gram_and_cross_equal_the_built_patches(shape, kernel, padding):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    p = _patches(x, kernel, padding)
    brute = p.T @ p
    fast = patch_gram(x, kernel, padding)
    assert fast.shape == brute.shape
    assert torch.allclose(fast, brute, atol=1e-12, rtol=0)
    assert torch.equal(fast, fast.T)  # by construction (solve.symmetric), on any kernel
    down = torch.randn(3, p.shape[1], generator=g, dtype=torch.float64)
    assert torch.allclose(patch_cross(x, down, kernel, padding), down @ brute, atol=1e-11)


def test_patch_gram_on_every_small_geometry():
    """Every kernel 1-4 x 1-4, padding 0-3 and image 1-6 x 1-6 the convolution admits."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for kh, kw, ph, pw in itertools.product(range(1, 5), range(1, 5), range(4), range(4)):
        for h, w in ((1, 1), (2, 5), (6, 3), (6, 6)):
            if h + 2 * ph < kh or w + 2 * pw < kw:
                continue
            x = torch.randn(2, 2, h, w, generator=g, dtype=torch.float64)
            p = _patches(x, (kh, kw), (ph, pw))
            assert torch.allclose(patch_gram(x, (kh, kw), (ph, pw)), p.T @ p, atol=1e-12)
            checked += 1
    assert checked > 800


def test_a_kernel_larger_than_the_padded_image_is_refused():
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        patch_gram(torch.randn(1, 1, 1, 1), (3, 3), (0, 0))


def test_only_stride_one_without_dilation_takes_the_shortcut():
    assert supported((1, 1), (1, 1))
    assert not supported((2, 2), (1, 1))
    assert not supported((1, 1), (2, 2))


def _layer(stride: int = 1) -> LoRAConv2d:
    torch.manual_seed(0)
    return LoRAConv2d(nn.Conv2d(3, 4, 3, stride=stride, padding=1), rank=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_recorder_on_a_convolution_equals_its_patches_in_every_mode(stride):
    """Plain, per-model (``groups``) and reduced recording of a LoRA convolution give the
    statistics of its im2col patches; a strided one is recorded from the patches."""
    layer = _layer(stride)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 6, 5, generator=g) for _ in range(3)]  # 2 models x 2 images
    per_model = [torch.cat([layer.patches(x[2 * k : 2 * k + 2]) for x in xs]) for k in range(2)]
    per_model = [p.reshape(-1, 27).double() for p in per_model]
    grams = [p.T @ p for p in per_model]
    downs = torch.randn(2, 5, 27, dtype=torch.float64, generator=g)

    with GramRecorder({"c": layer}) as plain:
        for x in xs:
            layer(x)
    with GramRecorder({"c": layer}, groups=2) as grouped:
        for x in xs:
            layer(x)
    with GramRecorder({"c": layer}, reduce={"c": downs}) as reduced:
        for x in xs:
            layer(x)
    assert not layer._forward_pre_hooks
    assert torch.allclose(plain.grams["c"], grams[0] + grams[1], atol=1e-10)
    assert plain.rows["c"] == sum(p.shape[0] for p in per_model)
    for k in range(2):
        assert torch.allclose(grouped.grams["c"][k], grams[k], atol=1e-10)
        assert torch.allclose(reduced.crosses["c"][k], downs[k] @ grams[k], atol=1e-9)
    assert grouped.rows["c"] == reduced.rows["c"] == per_model[0].shape[0]
    assert torch.allclose(reduced.grams["c"], grams[0] + grams[1], atol=1e-10)


def test_the_l_bfgs_recorder_keeps_the_raw_patches():
    layer = _layer()
    x = torch.randn(2, 3, 5, 5)
    with GramRecorder({"c": layer}, keep_raw=True) as rec:
        layer(x)
    raw = torch.cat(rec.raw["c"])
    assert torch.equal(raw, layer.patches(x).reshape(-1, 27))
    assert torch.allclose(rec.grams["c"], raw.double().T @ raw.double(), atol=1e-10)


def test_an_uneven_batch_for_several_models_is_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="not 2 equal parts"), GramRecorder({"c": layer}, groups=2):
        layer(torch.randn(3, 3, 5, 5))
    assert not layer._forward_pre_hooks
