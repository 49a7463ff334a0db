"""T2I-Adapter guidance: the weight map against brute force, condition images, loading, the
pipeline's identity at weight 0, per-region scaling, and mos-sample with adapters."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import T2IAdapter
from PIL import Image

from mos.common.adapters import (
    AdapterCondition,
    AdapterError,
    adapter_features,
    check_adapter_fits,
    condition_tensor,
    load_adapter,
    read_condition_image,
    weight_map,
)
from mos.common.base import build_tiny
from mos.common.pipeline import MixOfShowPipeline
from mos.common.regions import Region


def tiny_adapter(seed: int = 0, in_channels: int = 3, channels=(32, 64, 64)) -> T2IAdapter:
    """A random T2IAdapter shaped for the tiny UNet (VAE factor 2)."""
    torch.manual_seed(seed)
    adapter = T2IAdapter(
        in_channels=in_channels,
        channels=list(channels),
        num_res_blocks=1,
        downscale_factor=2,
        adapter_type="full_adapter",
    )
    with torch.no_grad():  # a realistic, non-negligible influence on the tiny UNet
        for p in adapter.parameters():
            p.mul_(3.0)
    return adapter.eval()


def pose_image(size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), "black")
    for x in range(4, size - 4):
        img.putpixel((x, size // 2), (255, 255, 255))
        img.putpixel((size // 3, x), (255, 0, 0))
    return img


def test_weight_map_matches_brute_force():
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.25, 0.5, 1.0, 1.0), (0.6, 0.0, 0.9, 0.3)]
    weights = [0.0, 2.0, None]  # the third region keeps the global weight
    h, w = 6, 8
    got = weight_map(boxes, weights, 0.7, h, w)
    for i in range(h):
        for j in range(w):
            cy, cx = (i + 0.5) / h, (j + 0.5) / w
            inside = [
                wt
                for (x0, y0, x1, y1), wt in zip(boxes, weights, strict=True)
                if wt is not None and x0 <= cx < x1 and y0 <= cy < y1
            ]
            want = sum(inside) / len(inside) if inside else 0.7
            assert got[i, j].item() == pytest.approx(want)
    assert torch.equal(weight_map(boxes, (), 0.3, h, w), torch.full((h, w), 0.3))
    with pytest.raises(AdapterError, match="one per region"):
        weight_map(boxes, [1.0], 1.0, h, w)


def test_condition_images_are_resized_and_converted(caplog):
    big = pose_image(50)
    with caplog.at_level("INFO"):
        t = condition_tensor(big, 32, 24, 3)
    assert t.shape == (1, 3, 24, 32) and t.min() >= 0.0 and t.max() <= 1.0
    assert "resized" in caplog.text
    grey = condition_tensor(pose_image(32), 32, 32, 1)
    assert grey.shape == (1, 1, 32, 32)
    with pytest.raises(AdapterError, match="expected"):
        condition_tensor(torch.zeros(3, 16, 16), 32, 32, 3)


def test_unreadable_condition_images_are_named(tmp_path):
    bad = tmp_path / "pose.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(AdapterError, match="pose.png: not a readable image"):
        read_condition_image(bad)
    with pytest.raises(AdapterError, match="no such file"):
        read_condition_image(tmp_path / "missing.png")


def test_features_are_scaled_only_inside_a_regions_box():
    adapter = tiny_adapter()
    raw = adapter(condition_tensor(pose_image(), 32, 32, 3))
    box = (0.5, 0.0, 1.0, 1.0)
    cond = AdapterCondition(adapter, pose_image(), weight=0.0, region_weights=(1.0,))
    feats = adapter_features([cond], [box], 32, 32, "cpu", torch.float32)
    assert len(feats) == len(raw) == 3
    for f, r in zip(feats, raw, strict=True):
        half = f.shape[-1] // 2
        assert torch.equal(f[..., :half], torch.zeros_like(f[..., :half]))
        torch.testing.assert_close(f[..., half:], r[..., half:])
    # two adapters add their weighted features
    two = adapter_features(
        [cond, AdapterCondition(adapter, pose_image(), 0.5)], [box], 32, 32, "cpu", torch.float32
    )
    torch.testing.assert_close(two[0], feats[0] + 0.5 * raw[0])


def _sample(pipe, adapters=(), regions=(), steps=3, **kw):
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of a dog", num_inference_steps=steps, guidance_scale=3.0, generator=gen,
                output_type="latent", adapters=adapters, regions=regions, **kw)  # fmt: skip


def test_adapter_weight_zero_equals_no_adapter_and_weight_one_changes_the_image():
    pipe = MixOfShowPipeline.from_base(build_tiny())
    plain = _sample(pipe)
    adapter = tiny_adapter()
    zero = _sample(pipe, [AdapterCondition(adapter, pose_image(), weight=0.0)])
    assert torch.equal(zero, plain)
    one = _sample(pipe, [AdapterCondition(adapter, pose_image(), weight=1.0)])
    assert (one - plain).abs().mean() > 1e-3
    # per-region weight 0 inside the only (whole-image) region: no adapter again
    region = [Region("a photo of a cat", (0.0, 0.0, 1.0, 1.0))]
    off = _sample(pipe, [AdapterCondition(adapter, pose_image(), 1.0, (0.0,))], region)
    assert torch.equal(off, _sample(pipe, (), region))


def test_adapter_steps_guide_only_the_first_steps():
    pipe = MixOfShowPipeline.from_base(build_tiny())
    cond = [AdapterCondition(tiny_adapter(), pose_image())]
    plain, full = _sample(pipe, steps=4), _sample(pipe, cond, steps=4)
    assert torch.equal(_sample(pipe, cond, steps=4, adapter_conditioning_factor=0.0), plain)
    assert torch.equal(_sample(pipe, cond, steps=4, adapter_conditioning_factor=1.0), full)
    # guided in the first 2 of 4 steps: the same latents as a run that stops the adapter
    # there by hand, and neither the unguided nor the fully guided result
    half = _sample(pipe, cond, steps=4, adapter_conditioning_factor=0.5)
    calls = []
    unet_forward = pipe.unet.forward

    def counting(*args, **kwargs):
        calls.append("down_intrablock_additional_residuals" in kwargs)
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = counting
    try:
        _sample(pipe, cond, steps=4, adapter_conditioning_factor=0.5)
    finally:
        pipe.unet.forward = unet_forward
    assert calls == [True, True, False, False]
    assert not torch.equal(half, plain) and not torch.equal(half, full)
    with pytest.raises(ValueError, match="adapter_conditioning_factor"):
        _sample(pipe, cond, adapter_conditioning_factor=1.5)


def test_adapters_for_another_unet_are_refused():
    base = build_tiny()
    with pytest.raises(AdapterError, match="channels"):
        check_adapter_fits(tiny_adapter(channels=(32, 64, 128)), base.unet, base.vae_scale_factor)
    with pytest.raises(AdapterError, match="downscales by 2"):
        check_adapter_fits(tiny_adapter(), base.unet, 8)


def test_load_adapter_from_a_folder_and_clear_errors(tmp_path):
    adapter = tiny_adapter(seed=3)
    adapter.save_pretrained(tmp_path / "pose")
    loaded = load_adapter(tmp_path / "pose")
    for (name, a), (_, b) in zip(
        adapter.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="config.json"):
        load_adapter(tmp_path / "empty")
    with pytest.raises(AdapterError, match="not found"):
        load_adapter("no such thing")


def test_mos_sample_with_an_adapter_and_a_scene_with_region_weights(tmp_path, monkeypatch):
    from mos.client.sample import SCENE_KEY, main
    from tests.test_regions import _compact_model

    model = _compact_model(tmp_path)
    tiny_adapter(seed=1).save_pretrained(tmp_path / "keypose")
    pose_image(48).save(tmp_path / "pose.png")  # another size: resized with a note
    args = ["--model", str(model), "--prompt", "a <dog1>", "--steps", "2"]
    plain, guided = tmp_path / "plain.png", tmp_path / "guided.png"
    assert main([*args, "--out", str(plain)]) == 0
    adapter_args = [
        "--adapter",
        str(tmp_path / "keypose"),
        "--adapter-image",
        str(tmp_path / "pose.png"),
    ]
    assert main([*args, *adapter_args, "--out", str(guided)]) == 0
    assert Image.open(plain).tobytes() != Image.open(guided).tobytes()
    saved = json.loads(Image.open(guided).text[SCENE_KEY])
    assert saved["adapters"][0]["weight"] == 1.0

    # a scene file in its own folder, with relative paths and a per-region weight
    monkeypatch.chdir(tmp_path.parent)
    scene = {
        "prompt": "a <dog1>",
        "steps": 2,
        "adapters": [{"name": "keypose", "model": "keypose", "image": "pose.png", "weight": 0.0}],
        "regions": [
            {"prompt": "a <dog1>", "box": [0, 0, 1, 1], "adapter_weights": {"keypose": 0.0}}
        ],
    }
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    off = tmp_path / "off.png"
    assert (
        main(["--model", str(model), "--scene", str(tmp_path / "scene.json"), "--out", str(off)])
        == 0
    )
    no_adapter = tmp_path / "no_adapter.png"
    scene_without = {
        **scene,
        "adapters": [],
        "regions": [{**scene["regions"][0], "adapter_weights": {}}],
    }
    (tmp_path / "scene2.json").write_text(json.dumps(scene_without))
    assert (
        main(
            [
                "--model",
                str(model),
                "--scene",
                str(tmp_path / "scene2.json"),
                "--out",
                str(no_adapter),
            ]
        )
        == 0
    )
    assert Image.open(off).tobytes() == Image.open(no_adapter).tobytes()
    # the PNG's scene reproduces the image from anywhere (paths were made absolute)
    again = tmp_path / "again.png"
    assert main(["--model", str(model), "--scene", str(off), "--out", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(off).tobytes()


@pytest.mark.parametrize(
    ("scene_extra", "message"),
    [
        ({"regions": [{"prompt": "a <dog1>", "box": [0, 0, 1, 1], "adapter_weights": {"pose": 1.0}}]},
         "adapter 'pose'; the scene's adapters are: none"),
        ({"adapters": [{"model": "x", "image": "y.png"}, {"model": "x", "image": "y.png"}]}, "names must differ"),
        ({"adapters": [{"model": "missing-dir", "image": "pose.png"}]}, "not found"),
    ],
)  # fmt: skip
def test_mos_sample_refuses_bad_adapter_scenes(tmp_path, capsys, scene_extra, message):
    from mos.client.sample import main
    from tests.test_regions import _compact_model

    model = _compact_model(tmp_path)
    pose_image().save(tmp_path / "pose.png")
    (tmp_path / "scene.json").write_text(
        json.dumps({"prompt": "a <dog1>", "steps": 1, **scene_extra})
    )
    out = tmp_path / "x.png"
    assert (
        main(["--model", str(model), "--scene", str(tmp_path / "scene.json"), "--out", str(out)])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()
