"""Tests for maskrcnn.io: image reading in every pixel mode, EXIF orientation, clear errors, image listing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.io import IMAGE_EXTENSIONS, ImageReadError, list_images, prefetch, read_image, read_image_size

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_roundtrip(tmp_path):
    out = read_image(_save(Image.fromarray(RGB), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)
    assert read_image_size(tmp_path / "a.png") == (5, 7)


@pytest.mark.parametrize("mode", ["L", "P", "1", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    img = Image.fromarray(RGB).convert(mode)
    out = read_image(_save(img, tmp_path / "a.png"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([RGB, np.zeros((5, 7, 1), np.uint8)], axis=2)  # fully transparent
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    np.testing.assert_array_equal(out, RGB)


def test_16bit_is_scaled(tmp_path):
    values = np.array([[0, 257, 257 * 100], [65535, 1000, 30000]], dtype=np.uint16)
    out = read_image(_save(Image.fromarray(values), tmp_path / "a.png"))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()


def test_cmyk(tmp_path):
    img = Image.fromarray(RGB).convert("CMYK")
    out = read_image(_save(img, tmp_path / "a.tif"))
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("orientation, rotate_k", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation(tmp_path, orientation, rotate_k):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(RGB), tmp_path / "a.png", exif=exif)
    out = read_image(path)
    np.testing.assert_array_equal(out, np.rot90(RGB, k=rotate_k))  # k=-1: 90 degrees clockwise
    assert read_image_size(path) == out.shape[:2]


def _corrupt_png(p: Path) -> None:
    Image.fromarray(RGB).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case, setup, words", [
    ("missing", lambda p: None, "not found"),
    ("empty", lambda p: p.write_bytes(b""), "empty"),
    ("text", lambda p: p.write_text("hello, not an image"), "not a recognised image"),
    ("truncated", _corrupt_png, "cannot decode"),
    ("directory", lambda p: p.mkdir(), "directory"),
])
def test_read_errors_name_the_file(tmp_path, case, setup, words):
    path = tmp_path / f"{case}.png"
    setup(path)
    with pytest.raises(ImageReadError, match=words) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_list_images(tmp_path):
    for rel in ["b.png", "a.JPG", "notes.txt", "sub/c.png", "sub/deeper/d.bmp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(list_images([tmp_path])) == ["a.JPG", "b.png"]
    assert names(list_images([str(tmp_path)], recursive=True)) == ["a.JPG", "b.png", "sub/c.png",
                                                                    "sub/deeper/d.bmp"]
    # files named twice (folder + file + pattern) come back once; an explicit file is taken whatever its suffix
    got = list_images([tmp_path / "b.png", str(tmp_path / "*.png"), tmp_path, tmp_path / "notes.txt"])
    assert names(got) == ["a.JPG", "b.png", "notes.txt"]
    assert names(list_images([str(tmp_path / "**" / "*.png")], recursive=True)) == ["b.png", "sub/c.png"]
    assert list_images([str(tmp_path / "*.gif")]) == []
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([tmp_path / "nope.png"])
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_prefetch_keeps_order_and_reads_ahead():
    produced: list[int] = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    gen = prefetch(items(), depth=3)
    assert next(gen) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:  # the thread fills the queue behind our back
        time.sleep(0.01)
    assert len(produced) >= 4
    assert [0, *gen] == list(range(20))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))


def test_prefetch_reraises_where_the_item_failed():
    def items():
        yield 1
        raise ImageReadError("bad.png: not an image")

    gen = prefetch(items())
    assert next(gen) == 1
    with pytest.raises(ImageReadError, match="bad.png"):
        next(gen)


def test_prefetch_closed_early_stops_its_thread():
    gen = prefetch(iter(range(10**9)), depth=2)
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "maskrcnn-prefetch" and t.is_alive() for t in threading.enumerate())
