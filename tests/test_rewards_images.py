"""Image loading for rewards: every input kind and awkward mode becomes 8-bit RGB, bad files fail per file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prefalign.errors import PrefalignError
from prefalign.rewards.images import ImageLoadError, list_image_files, load_rgb, open_image


def _gradient(h: int = 20, w: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1).astype(np.uint8)


def test_rgba_drops_alpha_like_official_convert(tmp_path):
    rgba = np.concatenate([_gradient(), np.full((20, 30, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgba[..., :3])


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    gray = _gradient()[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g.png")), np.repeat(gray[..., None], 3, -1))
    Image.fromarray(_gradient()).quantize(16).save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    cmyk = load_rgb(tmp_path / "c.jpg")
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk).astype(int) - _gradient()).mean() < 8


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")  # PIL stores I;16 PNG, reads back as 'I' / 'I;16'
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "d.png"))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]  # plain .convert("RGB") would give [0, 255, 255, 255]
    assert np.asarray(load_rgb(values))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_tensors_and_arrays(tmp_path):
    arr = _gradient()
    assert np.array_equal(np.asarray(load_rgb(arr)), arr)
    assert np.array_equal(np.asarray(load_rgb(np.moveaxis(arr, -1, 0))), arr)  # CHW accepted
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert np.array_equal(np.asarray(load_rgb(x)), arr)  # round-trips exactly through rounding
    with pytest.raises(PrefalignError, match="shape"):
        load_rgb(torch.rand(2, 3, 8, 8))
    with pytest.raises(PrefalignError, match="unsupported image type"):
        load_rgb(42)


def test_corrupt_truncated_and_missing_files_raise_per_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("junk.png", "cut.png", "missing.png"):
        with pytest.raises(ImageLoadError, match=name):
            open_image(tmp_path / name)


def test_huge_images_are_reduced_not_refused(tmp_path):
    """Above MAX_PIXELS an image is box-reduced by an integer factor; PIL's bomb guard is lifted for it."""
    big = Image.new("RGB", (400, 300), (10, 200, 30))
    big.save(tmp_path / "big.png")
    img = open_image(tmp_path / "big.png", max_pixels=10_000)
    assert img.size == (400 // 4, 300 // 4) and img.getpixel((5, 5)) == (10, 200, 30)
    big.save(tmp_path / "big.jpg", quality=90)
    assert open_image(tmp_path / "big.jpg", max_pixels=10_000).width * 4 <= 400  # JPEG draft decode
    # Past PIL's default decompression-bomb error threshold (~179 MP): a flat 1-bit PNG keeps the test fast.
    Image.new("1", (14_000, 13_000), 1).save(tmp_path / "bomb.png")
    huge = open_image(tmp_path / "bomb.png")
    assert (
        huge.mode == "RGB"
        and huge.width * huge.height <= 64_000_000
        and huge.getpixel((0, 0)) == (255, 255, 255)
    )
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the process-wide guard is restored


def test_list_image_files_sorted_by_name(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt", "c.WEBP"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.png", "c.WEBP"]
