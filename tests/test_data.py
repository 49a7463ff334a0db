from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mos.client.data import (
    DEFAULT_CAPTION,
    PhotoFolderError,
    load_photo_folder,
    photo_tensors,
)
from tests.conftest import make_photos


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "a.jpg", exif=exif, quality=95)
    (photo,) = load_photo_folder(tmp_path)
    assert photo.image.size == (20, 40)
    top = np.asarray(photo.image)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue stripe is now at the top


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    ext = "jpg" if mode == "CMYK" else "png"
    Image.new("RGB", (24, 24), (10, 200, 30)).convert(mode).save(tmp_path / f"x.{ext}")
    (photo,) = load_photo_folder(tmp_path)
    assert photo.image.mode == "RGB" and photo.image.size == (24, 24)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    (photo,) = load_photo_folder(tmp_path)
    assert photo.image.getpixel((3, 3)) == (255, 255, 255)


def test_webp_captions_and_masks(tmp_path):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.webp")
    (tmp_path / "a.txt").write_text("a <TOK> sitting on grass\n")
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "b.png")
    m = Image.new("L", (30, 20), 0)
    m.paste(255, (10, 0, 20, 20))
    m.save(tmp_path / "b.mask.png")
    a, b = load_photo_folder(tmp_path)
    assert a.caption == "a <TOK> sitting on grass" and a.mask is None
    assert b.caption == DEFAULT_CAPTION and b.mask is not None
    x, mask = photo_tensors(b, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert mask.shape == (1, 16, 16)
    # centre crop of a 30x20 image: the mask's middle third stays in the middle
    assert mask[0, :, 8].min() > 0.9 and mask[0, :, 0].max() < 0.1


def _problems(folder, **kw):
    with pytest.raises(PhotoFolderError) as err:
        load_photo_folder(folder, **kw)
    return dict(err.value.problems), str(err.value)


def test_every_bad_file_is_named(tmp_path):
    folder = make_photos(tmp_path / "p", count=2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "fake.png").write_bytes(b"this is not a png")
    good = folder / "00.png"
    (folder / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # 144 MP, a few kB on disk
    (folder / "01.txt").write_text("a caption without the placeholder")
    Image.new("L", (10, 10)).save(folder / "00.mask.png")  # wrong size for 00.png
    problems, message = _problems(folder)
    assert set(problems) == {
        "empty.jpg",
        "notes.pdf",
        "fake.png",
        "cut.png",
        "bomb.png",
        "01.png",
        "00.png",
    }
    assert "0 bytes" in problems["empty.jpg"]
    assert "not an image" in problems["notes.pdf"]
    assert "not an image" in problems["fake.png"]
    assert "truncated" in problems["cut.png"]
    assert "decompression bomb" in problems["bomb.png"]
    assert "<TOK>" in problems["01.png"]
    assert "mask" in problems["00.png"]
    assert "7 problem(s)" in message


def test_skip_bad_keeps_the_good_ones(tmp_path):
    folder = make_photos(tmp_path / "p", count=3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    photos = load_photo_folder(folder, skip_bad=True)
    assert [p.path.name for p in photos] == ["00.png", "01.png", "02.png"]


def test_empty_or_missing_folder(tmp_path):
    problems, message = _problems(tmp_path)
    assert "no usable photos" in message
    (tmp_path / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    _problems(tmp_path)
    _, message = _problems(tmp_path / "nope")
    assert "not a folder" in message
    (tmp_path / "bad.jpg").write_bytes(b"x")
    _, message = _problems(tmp_path, skip_bad=True)
    assert "no usable photos" in message


def _photo(w: int, h: int, caption: str = "", mask: bool = False):
    from PIL import Image

    from mos.client.data import Photo

    img = Image.new("RGB", (w, h), (250, 10, 10))
    m = Image.new("L", (w, h), 255) if mask else None
    return Photo(Path("x.png"), img, caption or "a photo of a <TOK>", m, captioned=bool(caption))


def test_canvas_view_places_the_photo_and_marks_its_area():
    from mos.client.data import canvas_view

    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        x, mask, area = canvas_view(_photo(30, 60, mask=True), 32, gen, scale=(0.5, 1.0))
        assert x.shape == (3, 32, 32) and area.shape == mask.shape == (1, 32, 32)
        inside = area[0] > 0
        assert 0 < int(inside.sum()) < 32 * 32  # a tall photo never fills the square canvas
        assert torch.all(x[:, ~inside] == -1.0)  # black canvas outside the photo
        assert float(x[0][inside].mean()) > 0.8  # the red photo inside
        assert torch.equal(mask, area)  # an all-subject mask, cut to the photo
        rows = inside.any(dim=1).nonzero()
        assert int(rows.max() - rows.min()) + 1 >= 16  # long edge at least half the canvas


def test_crop_view_takes_a_random_full_square():
    from mos.client.data import crop_view

    photo = _photo(64, 32)
    photo.image.paste((0, 0, 250), (0, 0, 32, 32))  # left half blue
    blues = set()
    for seed in range(8):
        x, mask, area = crop_view(photo, 16, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 16, 16) and bool(area.all()) and bool(mask.all())
        blues.add(round(float((x[2] > 0).float().mean()), 2))
    assert len(blues) > 2  # the crop's position varies with the draw


def test_templated_caption_keeps_the_first_tag_and_shuffles_the_rest():
    from mos.client.data import HUMAN_TEMPLATES, OBJECT_TEMPLATES, templated_caption

    photo = _photo(8, 8, caption="<TOK>, smiling, on a beach, at night")
    seen = set()
    for seed in range(20):
        text = templated_caption(photo, "human", torch.Generator().manual_seed(seed))
        prefix = max((t[:-2] for t in HUMAN_TEMPLATES if text.startswith(t[:-2])), key=len)
        rest = text[len(prefix) :]
        tags = rest.split(", ")
        assert tags[0] == "<TOK>" and sorted(tags[1:]) == ["at night", "on a beach", "smiling"]
        seen.add(text)
    assert len(seen) > 5
    uncaptioned = templated_caption(_photo(8, 8), "object", torch.Generator().manual_seed(0))
    assert uncaptioned in {t.format("<TOK>") for t in OBJECT_TEMPLATES}
