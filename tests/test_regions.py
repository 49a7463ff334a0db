"""Regionally controllable sampling: masks and the combination rule against brute force,
the regional processor against per-cell attention, and the pipeline's two identities."""

from __future__ import annotations

import json

import pytest
import torch

from mos.common.attention import (
    RegionalCrossAttnProcessor,
    attention_forward,
    cross_attention_layers,
)
from mos.common.base import build_tiny
from mos.common.pipeline import MixOfShowPipeline
from mos.common.regions import (
    Region,
    RegionError,
    box_from_pixels,
    box_mask,
    combine,
    crop_view,
    latent_sizes,
    region_masks,
    view_stride,
    view_windows,
)


def test_box_mask_matches_the_cell_centre_rule():
    box = (0.1, 0.25, 0.6, 0.9)
    h, w = 7, 9
    mask = box_mask(box, h, w)
    for i in range(h):
        for j in range(w):
            cy, cx = (i + 0.5) / h, (j + 0.5) / w
            assert bool(mask[i, j]) == (0.1 <= cx < 0.6 and 0.25 <= cy < 0.9)
    assert region_masks([box], h, w)[0].reshape(h, w).bool().equal(mask)


def test_bad_boxes_and_prompts_are_refused_clearly():
    with pytest.raises(RegionError, match="outside"):
        Region("a dog", (0.5, 0.0, 1.2, 1.0))
    with pytest.raises(RegionError, match="zero area"):
        Region("a dog", (0.5, 0.2, 0.5, 0.8))
    with pytest.raises(RegionError, match="prompt"):
        Region("  ", (0.0, 0.0, 1.0, 1.0))
    assert box_from_pixels((0, 16, 32, 64), 64, 64) == (0.0, 0.25, 0.5, 1.0)
    assert box_from_pixels((0.0, 0.25, 0.5, 1.0), 64, 64) == (0.0, 0.25, 0.5, 1.0)
    with pytest.raises(RegionError, match="outside the 64x64"):
        box_from_pixels((0, 0, 80, 64), 64, 64)
    with pytest.raises(RegionError, match="whole numbers"):
        box_from_pixels((0, 0, 1.5, 1), 64, 64)  # neither fractions nor pixels


def test_combine_averages_overlaps_and_keeps_the_rest_against_brute_force():
    g = torch.Generator().manual_seed(0)
    b, n, c, r = 2, 30, 5, 3
    glob = torch.randn(b, n, c, generator=g)
    outs = torch.randn(r, b, n, c, generator=g)
    masks = (torch.rand(r, n, generator=g) > 0.5).float()
    got = combine(glob, outs, masks)
    for cell in range(n):
        covering = [k for k in range(r) if masks[k, cell] > 0]
        want = (
            glob[:, cell]
            if not covering
            else torch.stack([outs[k, :, cell] for k in covering]).mean(0)
        )
        torch.testing.assert_close(got[:, cell], want)


def test_latent_sizes_follow_strided_convolutions():
    assert latent_sizes(8, 12, 3) == [(8, 12), (4, 6), (2, 3)]
    assert latent_sizes(5, 5, 3) == [(5, 5), (3, 3), (2, 2)]


def test_regional_processor_equals_per_cell_attention():
    base = build_tiny()
    _, attn = cross_attention_layers(base.unet)[0]
    g = torch.Generator().manual_seed(1)
    h, w, t = 4, 6, 5
    hidden = torch.randn(2, h * w, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 3 * t, attn.to_k.in_features, generator=g)
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.3, 0.5, 1.0, 1.0)]  # overlapping
    masks = region_masks(boxes, h, w)
    proc = RegionalCrossAttnProcessor(0, {h * w: masks}, t)
    with torch.no_grad():
        got = proc(attn, hidden, context)
        per = [attention_forward(attn, hidden, context[:, k * t : (k + 1) * t]) for k in range(3)]
    for cell in range(h * w):
        covering = [k + 1 for k in range(2) if masks[k, cell] > 0]
        want = (
            per[0][:, cell]
            if not covering
            else sum(per[k][:, cell] for k in covering) / len(covering)
        )
        torch.testing.assert_close(got[:, cell], want, rtol=1e-5, atol=1e-6)


def sample(pipe, prompt, regions=(), negative="", steps=3):
    return pipe(
        prompt,
        negative,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        regions=regions,
        output_type="latent",
    )


def test_no_regions_is_the_plain_pipeline_and_a_full_region_is_its_prompt():
    pipe = MixOfShowPipeline.from_base(build_tiny())
    plain = sample(pipe, "a photo of a dog")
    assert torch.equal(sample(pipe, "a photo of a dog", regions=[]), plain)
    full = Region("a red cat on the beach", (0.0, 0.0, 1.0, 1.0), "blurry")
    regional = sample(pipe, "a photo of a dog", [full])
    direct = sample(pipe, "a red cat on the beach", negative="blurry")
    torch.testing.assert_close(regional, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(regional, plain, atol=1e-4)


def test_a_region_changes_its_box_more_than_the_rest():
    pipe = MixOfShowPipeline.from_base(build_tiny())
    plain = sample(pipe, "a photo of a dog", steps=1)
    region = [Region("a red cat", (0.0, 0.0, 0.5, 1.0))]
    left = sample(pipe, "a photo of a dog", region, steps=1)
    diff = (left - plain).abs().mean(dim=(0, 1))  # [h, w]
    half = diff.shape[1] // 2
    # convolutions and self-attention carry some of it across (exact locality is the
    # processor test's job); the box still changes clearly more
    assert diff[:, :half].mean() > 1.5 * diff[:, half:].mean()


@pytest.mark.parametrize("h,w,size,stride", [(16, 32, 16, 8), (16, 48, 16, 8), (8, 20, 8, 4),
                                              (16, 16, 16, 8), (24, 40, 16, 8)])  # fmt: skip
def test_view_windows_tile_the_latent_flush_with_its_edges(h, w, size, stride):
    views = view_windows(h, w, size, stride, align=4)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for y0, x0, vh, vw in views:
        assert (vh, vw) == (min(size, h), min(size, w))
        assert 0 <= y0 <= h - vh and 0 <= x0 <= w - vw and y0 % 4 == 0 and x0 % 4 == 0
        covered[y0 : y0 + vh, x0 : x0 + vw] += 1
    assert covered.min() >= 1  # every cell is denoised by some window
    xs = sorted({x for _, x, _, _ in views})
    assert xs[0] == 0 and xs[-1] == max(0, w - size)  # the last one flush with the edge
    assert all(b - a <= stride for a, b in zip(xs, xs[1:], strict=False))
    if h <= size and w <= size:
        assert views == [(0, 0, h, w)]
    with pytest.raises(ValueError, match="not multiples of 8"):
        view_windows(16, 36, 16, 8, align=8)
    with pytest.raises(ValueError, match="stride"):
        view_windows(h, w, size, size + 1)


def test_crop_view_takes_the_same_window_at_every_level():
    full = torch.arange(16 * 32).view(1, 1, 16, 32)
    half = full[..., ::2, ::2]
    view = (0, 8, 16, 16)
    assert torch.equal(crop_view(full, view, (16, 32)), full[..., :, 8:24])
    assert torch.equal(crop_view(half, view, (16, 32)), half[..., :, 4:12])
    # a region mask cropped to a window is the mask of the box in the window's coordinates
    box = (0.3, 0.1, 0.7, 0.9)
    cropped = crop_view(box_mask(box, 16, 32), view, (16, 32))
    moved = ((0.3 * 32 - 8) / 16, 0.1, (0.7 * 32 - 8) / 16, 0.9)
    assert torch.equal(cropped, box_mask(moved, 16, 16))


def test_view_stride_is_the_aligned_step_between_windows_sharing_the_overlap():
    assert view_stride(16, 0.5, 4) == 8 and view_stride(16, 0.0, 4) == 16  # halves; tiles
    assert view_stride(16, 0.25, 4) == 12 and view_stride(16, 0.3, 4) == 12  # rounded to 4
    assert view_stride(16, 0.95, 4) == 4  # never below one aligned step
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            view_stride(16, bad)


@pytest.mark.parametrize("overlap", [0.5, 0.0])
def test_native_views_average_the_unet_over_windows_with_their_regions(overlap):
    base = build_tiny()
    pipe = MixOfShowPipeline.from_base(base)
    native = base.default_resolution
    # a canvas of the base's own size is one window: exactly the plain sampler
    plain = sample(pipe, "a photo of a dog")
    views = pipe("a photo of a dog", num_inference_steps=3, output_type="latent",
                 generator=torch.Generator().manual_seed(0), native_views=True)  # fmt: skip
    assert torch.equal(views, plain)
    # one step on a canvas two windows wide, against the windows run by hand
    regions = [
        Region("a red cat", (0.0, 0.0, 0.4, 1.0)),
        Region("a blue car", (0.6, 0.0, 1.0, 1.0)),
    ]
    width = 2 * native
    lat = torch.randn(1, 4, native // 2, native, generator=torch.Generator().manual_seed(1))

    def one_step(**kw):
        return pipe("a photo", num_inference_steps=1, guidance_scale=1.0, width=width,
                    height=native, latents=lat.clone(), regions=regions, output_type="latent",
                    **kw)  # fmt: skip

    got = one_step(native_views=True, view_overlap=overlap)
    size = native // 2
    pred = torch.zeros_like(lat)
    count = torch.zeros_like(lat)
    windows = view_windows(size, 2 * size, size, round(size * (1 - overlap)), align=4)
    assert len(windows) == (3 if overlap else 2)  # tiles: one window per half
    for x0 in windows:
        x0 = x0[1]
        inside = [
            r for r in regions if r.box[0] * 2 * size < x0 + size and r.box[2] * 2 * size > x0
        ]
        moved = [Region(r.prompt, (max(0.0, (r.box[0] * 2 * size - x0) / size), r.box[1],
                                   min(1.0, (r.box[2] * 2 * size - x0) / size), r.box[3]))
                 for r in inside]  # fmt: skip
        window = pipe("a photo", num_inference_steps=1, guidance_scale=1.0, width=native,
                      height=native, latents=lat[..., x0 : x0 + size].clone(), regions=moved,
                      output_type="latent")  # fmt: skip
        # the scheduler's one step is linear in the prediction: recover it from the result
        pred[..., x0 : x0 + size] += window
        count[..., x0 : x0 + size] += 1
    torch.testing.assert_close(got, pred / count, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, one_step(), atol=1e-4)  # not the whole-canvas sampler
    other = one_step(native_views=True, view_overlap=0.5 - overlap)
    assert not torch.allclose(got, other, atol=1e-4)  # the overlap is used


@pytest.fixture
def compact_model(tmp_path):
    return _compact_model(tmp_path)


def _compact_model(tmp_path):
    """A compact fused model of two random concepts (dog1, cat2) on the tiny base."""
    from tests.conftest import random_fused, random_package

    base = build_tiny()
    fused = random_fused(base, [random_package(base, "dog1", 1), random_package(base, "cat2", 2)])
    return fused.save_compact(tmp_path / "fused.safetensors")


def test_mos_sample_writes_the_scene_into_the_png_and_reproduces_it(tmp_path, compact_model):
    from PIL import Image

    from mos.client.sample import SCENE_KEY, main

    out = tmp_path / "a.png"
    args = ["--model", str(compact_model), "--prompt", "a <dog1> and a <cat2>", "--steps", "3"]
    regions = ["--region", "a <dog1>@0,0,16,32", "--region", "a <cat2>@0.5,0,1,1@blurry"]
    assert main([*args, *regions, "--out", str(out)]) == 0
    scene = json.loads(Image.open(out).text[SCENE_KEY])
    assert scene["regions"][0]["box"] == [0.0, 0.0, 16.0, 32.0]
    assert scene["regions"][1]["negative_prompt"] == "blurry"
    again = tmp_path / "b.png"
    assert main(["--model", str(compact_model), "--scene", str(out), "--out", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps({**scene, "seed": 5}))
    grid = tmp_path / "grid.png"
    assert main(["--model", str(compact_model), "--scene", str(scene_file), "--grid", "2",
                 "--out", str(grid)]) == 0  # fmt: skip
    assert json.loads(Image.open(grid).text[SCENE_KEY])["seed"] == 5
    assert Image.open(grid).size[0] > 2 * Image.open(out).size[0]


def test_mos_sample_native_views_are_kept_in_the_scene_and_change_a_wide_image(
    tmp_path, compact_model
):
    from PIL import Image

    from mos.client.sample import SCENE_KEY, main

    args = ["--model", str(compact_model), "--prompt", "a <dog1> and a <cat2>", "--steps", "3",
            "--width", "64", "--height", "32", "--region", "a <dog1>@0,0,0.5,1",
            "--region", "a <cat2>@0.5,0,1,1"]  # fmt: skip
    whole, views = tmp_path / "whole.png", tmp_path / "views.png"
    assert main([*args, "--out", str(whole)]) == 0
    assert main([*args, "--native-views", "--out", str(views)]) == 0
    scene = json.loads(Image.open(views).text[SCENE_KEY])
    assert scene["native_views"] is True and scene["adapter_steps"] == 1.0
    assert json.loads(Image.open(whole).text[SCENE_KEY])["native_views"] is False
    assert Image.open(views).size == (64, 32)
    assert Image.open(views).tobytes() != Image.open(whole).tobytes()
    again = tmp_path / "again.png"
    assert main(["--model", str(compact_model), "--scene", str(views), "--out", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(views).tobytes()
    # side-by-side tiles: kept in the scene, another image
    tiles = tmp_path / "tiles.png"
    assert main([*args, "--native-views", "--view-overlap", "0", "--out", str(tiles)]) == 0
    assert json.loads(Image.open(tiles).text[SCENE_KEY])["view_overlap"] == 0.0
    assert scene["view_overlap"] == 0.5
    assert Image.open(tiles).tobytes() != Image.open(views).tobytes()
    again = tmp_path / "tiles-again.png"
    assert main(["--model", str(compact_model), "--scene", str(tiles), "--out", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(tiles).tobytes()


def test_mos_sample_takes_a_clients_model_folder_and_uses_its_latest_model(tmp_path, compact_model):
    import shutil

    from PIL import Image

    from mos.client.layout import LATEST
    from mos.client.sample import main

    model_dir = tmp_path / "dog1-model"
    (model_dir / "fused").mkdir(parents=True)
    shutil.copy(compact_model, model_dir / "fused" / "v2.safetensors")
    (model_dir / "fused" / "v1.safetensors").write_bytes(b"an older, broken file")
    latest = {"version": 2, "file": "fused/v2.safetensors", "concepts": ["<dog1>", "<cat2>"]}
    (model_dir / LATEST).write_text(json.dumps(latest))
    args = ["--prompt", "a <dog1> and a <cat2>", "--steps", "2"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["--model", str(compact_model), *args, "--out", str(a)]) == 0
    assert main(["--model", str(model_dir), *args, "--out", str(b)]) == 0
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    (model_dir / LATEST).write_text("{not json")
    assert main(["--model", str(model_dir), *args, "--out", str(b)]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "a <owl3>"], "unknown concept token <owl3>"),
        (["--prompt", "a <dog1>", "--region", "a <dog1>@0,0,1.2,1"], "whole numbers"),
        (["--prompt", "a <dog1>", "--region", "a <dog1>@0,0,0,1"], "zero area"),
        (["--prompt", "a <dog1>", "--region", "nobox"], "PROMPT@x0,y0,x1,y1"),
        (["--prompt", "   "], "empty"),
        (["--prompt", "a <dog1>", "--adapter-steps", "1.5"], "adapter_steps"),
        (["--prompt", "a <dog1>", "--view-overlap", "0"], "add --native-views"),
        (["--prompt", "a <dog1>", "--native-views", "--view-overlap", "1"], "view_overlap"),
    ],
)
def test_mos_sample_refuses_bad_input_clearly(tmp_path, compact_model, capsys, extra, message):
    from mos.client.sample import main

    out = tmp_path / "x.png"
    assert main(["--model", str(compact_model), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
