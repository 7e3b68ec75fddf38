"""Real photos (scikit-image's) written as files, for tests and benches that import them as tasks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PHOTOS = ("chelsea", "coffee", "astronaut")


def photo_files(folder: Path) -> list[Path]:
    """The three photos as PNG files in ``folder``."""
    import skimage.data

    out = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        out.append(path)
    return out


def distinct_crops(folder: Path, n: int) -> list[Path]:
    """``n`` small (64x64) images, each a different crop of the photos: distinct content, so the engine's
    feature cache can't make one task's work free for another."""
    import skimage.data

    sources = [getattr(skimage.data, name)() for name in PHOTOS]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        size = 96 + 8 * (i % 5)
        top, left = 7 * i % (src.shape[0] - size), 11 * i % (src.shape[1] - size)
        path = folder / f"crop-{i:03d}.png"
        Image.fromarray(src[top:top + size, left:left + size]).resize((64, 64)).save(path)
        out.append(path)
    return out
