"""Image preprocessing (model/images.py): one test per rule of the released code, and bad images as one
InvalidArgument line naming the file."""

import io

import numpy as np
import pytest
import torch

from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.model.images import CLIP_MEAN, CLIP_STD, image_pixels, load_image, preprocess, target_size

Image = pytest.importorskip("PIL.Image")


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_downscale_only_keeps_the_aspect_ratio():
    assert target_size(3000, 1500, 1400, 28) == (1400, 700)          # longest side to the bound
    assert target_size(100, 50, 1400, 28) == (112, 56)                # small: no upscale beyond the grid round-up
    assert target_size(1401, 10, 1400, 28) == (1400, 28)


def test_sides_round_up_to_the_patch_grid():
    assert target_size(29, 56, 1400, 28) == (56, 56)
    assert target_size(28, 1, 1400, 28) == (28, 28)
    h, w = target_size(999, 777, 1400, 28)
    assert h % 28 == 0 and w % 28 == 0 and 999 <= h < 999 + 28 and 777 <= w < 777 + 28


def test_clip_mean_and_std():
    img = Image.new("RGB", (28, 28), (255, 0, 128))
    x = preprocess(img, 1400, 28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    expect = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(x[:, 5, 7], torch.tensor(expect), rtol=1e-6, atol=1e-6)


def test_resize_is_applied():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert image_pixels(png(img), 1400, 28).shape == (3, 56, 56)
    assert image_pixels(png(img), 40, 28).shape == (3, 28, 56)        # 30x50 -> 24x40 -> 28x56


def test_rgba_is_composited_onto_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))          # fully transparent black -> white
    rgba.putpixel((1, 0), (200, 100, 0, 255))    # opaque -> itself
    rgb = load_image(png(rgba))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (200, 100, 0)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    assert load_image(Image.new("L", (1, 1), 9)).getpixel((0, 0)) == (9, 9, 9)


def test_bad_images_are_one_line_naming_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InvalidArgument, match=r"notes\.txt: not a readable image") as e:
        load_image(text)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidArgument, match=r"missing\.png: cannot read the image"):
        load_image(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    big.write_bytes(png(Image.new("RGB", (64, 64))))
    with pytest.raises(InvalidArgument, match=r"big\.png: image too large \(64x64 pixels"):
        load_image(big, max_pixels=1000)
    with pytest.raises(InvalidArgument, match=r"big\.png: image too large \(\d+ bytes"):
        load_image(big, max_bytes=10)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(InvalidArgument, match=r"trunc\.png: not a readable image"):
        load_image(trunc)
