"""Every image mode users upload decodes to RGB at the right size and orientation; bad files are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.images import ImageError, image_digest, load_rgb


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(chelsea) -> Image.Image:
    return Image.fromarray(chelsea)  # 451 wide x 300 high


def test_rgb_png_round_trips_exactly(chelsea, photo):
    assert np.array_equal(load_rgb(_encode(photo, "PNG")), chelsea)


def test_grayscale_becomes_three_equal_channels():
    import skimage.data

    camera = skimage.data.camera()  # 512 x 512 uint8 grayscale
    rgb = load_rgb(_encode(Image.fromarray(camera), "PNG"))
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], camera) and np.array_equal(rgb[..., 2], camera)


def test_rgba_composites_transparent_pixels_on_white(chelsea, photo):
    rgba = photo.convert("RGBA")
    alpha = np.full(chelsea.shape[:2], 255, dtype=np.uint8)
    alpha[:50, :50] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgb = load_rgb(_encode(rgba, "PNG"))
    assert (rgb[:50, :50] == 255).all()
    assert np.array_equal(rgb[100:, 100:], chelsea[100:, 100:])


def test_palette_image(photo):
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgb = load_rgb(_encode(palette, "PNG"))
    assert rgb.shape == (300, 451, 3)
    assert np.array_equal(rgb, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256 * 64).reshape(64, 256)).astype(np.uint16)
    rgb = load_rgb(_encode(Image.fromarray(ramp), "PNG"))
    assert rgb.shape == (64, 256, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert len(np.unique(rgb[..., 0])) > 200  # a real ramp, not a binarised image


def test_cmyk_jpeg(photo):
    cmyk = photo.convert("CMYK")
    rgb = load_rgb(_encode(cmyk, "JPEG", quality=95))
    assert rgb.shape == (300, 451, 3)
    assert np.abs(rgb.astype(int) - np.asarray(cmyk.convert("RGB"), dtype=int)).mean() < 8


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
])
def test_exif_orientation_is_applied(photo, orientation, transpose):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(photo, "JPEG", quality=95, exif=exif.tobytes())
    rgb = load_rgb(data)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # pixels as stored, unrotated
    expected = np.asarray(Image.fromarray(stored).transpose(transpose))
    assert rgb.shape == expected.shape
    assert np.array_equal(rgb, expected)
    if orientation in (6, 8):
        assert rgb.shape[:2] == (451, 300)


def test_arrays_of_other_dtypes():
    assert load_rgb(np.ones((4, 5), dtype=np.float32)).max() == 255
    assert load_rgb(np.zeros((4, 5, 4), dtype=np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ImageError, match="shape"):
        load_rgb(np.zeros((4, 5, 2), dtype=np.uint8))


@pytest.mark.parametrize("side, message", [
    (20_000, "400000000 pixels.*limit is 64,000,000 pixels"),  # PIL's own hard stop fires first
    (10_000, "100,000,000 pixels, above the limit of 64,000,000"),  # our limit, from the header alone
])
def test_decompression_bomb_is_refused_before_decoding(side, message):
    bomb = _encode(Image.new("1", (side, side)), "PNG")  # compresses to a few kB
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match=message):
        load_rgb(bomb)


def test_custom_pixel_limit(photo):
    with pytest.raises(ImageError, match="above the limit of 1,000"):
        load_rgb(_encode(photo, "PNG"), max_pixels=1000)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image", "not a readable image"),
])
def test_unreadable_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_rgb(data)


def test_truncated_jpeg(photo):
    data = _encode(photo, "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_rgb(data[: len(data) // 2])


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_rgb(tmp_path / "empty.png")


def test_digest_depends_on_content(chelsea):
    assert image_digest(chelsea) == image_digest(chelsea.copy())
    changed = chelsea.copy()
    changed[0, 0, 0] ^= 1
    assert image_digest(changed) != image_digest(chelsea)


def test_engine_segments_every_mode(engine, photo):
    """Each decoded mode flows through the whole pipeline with masks at the decoded size."""
    for data in (_encode(photo.convert("L"), "PNG"), _encode(photo.convert("CMYK"), "JPEG")):
        segments = engine.segment(data, "cat", box_threshold=0.3)
        assert all(s.mask.shape == (300, 451) for s in segments)
