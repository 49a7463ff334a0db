import numpy as np
import pytest
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
