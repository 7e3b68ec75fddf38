"""Turn whatever an image arrives as into an RGB uint8 array, refusing what can't be decoded safely."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = bytes | bytearray | str | os.PathLike | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """The image can't be used: unreadable, empty, or too large."""


def working_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(H, W) scaled down so the long side is at most ``max_side`` (never up), at least 1 px each."""
    height, width = int(size[0]), int(size[1])
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_rgb(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into an HxWx3 uint8 RGB array with EXIF orientation applied.

    Handles grayscale, RGBA, palette, 16-bit, CMYK and EXIF-rotated JPEGs. Images above
    ``max_pixels`` are refused before their pixels are decoded.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError("image is empty (0 bytes)")
        return _pil_to_rgb(_open(io.BytesIO(source), "image bytes", max_pixels), max_pixels)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    return _pil_to_rgb(_open(path, str(path), max_pixels), max_pixels)


def image_digest(image: np.ndarray) -> str:
    """Content hash of a decoded image, used as a cache key for per-image features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def _open(fp, name: str, max_pixels: int) -> Image.Image:
    # PIL's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we check the header
    # size ourselves (before decoding) so the limit is exactly ours and the message names it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as exc:  # PIL's hard stop, far above any sane limit
            raise ImageError(
                f"{name}: image is too large to decode safely ({exc}); the limit is {max_pixels:,} pixels "
                "(MAX_IMAGE_PIXELS)"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not a readable image file") from exc
        except OSError as exc:
            raise ImageError(f"{name}: can't read image: {exc}") from exc
    _check_size(image.width, image.height, max_pixels, name)
    return image


def _check_size(width: int, height: int, max_pixels: int, name: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} (MAX_IMAGE_PIXELS); refusing it as a possible decompression bomb"
        )


def _pil_to_rgb(image: Image.Image, max_pixels: int) -> np.ndarray:
    _check_size(image.width, image.height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _array_to_rgb(np.asarray(image))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Transparent areas become white, as image viewers (and Label Studio) show them.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
        raise ImageError(f"image data is corrupt or truncated: {exc}") from exc


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image has no pixels (shape {array.shape})")
    if array.dtype == np.uint8:
        out = array
    elif np.issubdtype(array.dtype, np.integer):
        # 16-bit (or wider) integers: scale by the dtype's range so a 16-bit photo keeps its look.
        info = np.iinfo(array.dtype)
        top = 65535 if info.max > 255 and array.max(initial=0) <= 65535 else info.max
        out = (array.astype(np.float64) / top * 255.0).round().clip(0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        out = (array * scale).round().clip(0, 255).astype(np.uint8)
    elif array.dtype == bool:
        out = array.astype(np.uint8) * 255
    else:
        raise ImageError(f"unsupported image array dtype {array.dtype}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)
