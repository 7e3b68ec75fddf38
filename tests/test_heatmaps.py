"""backend.heatmaps: the torch-free drawing the backend and the explain page share, and the wire form of
a token-grid map (what /api/explain sends instead of pictures)."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.heatmaps import colorize, token_map_from_png, token_map_png, token_map_to_image


def test_colorize_matches_opencv_at_every_level():
    levels = np.arange(256, dtype=np.float32).reshape(16, 16) / 255
    reference = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(16, 16), cv2.COLORMAP_TURBO),
                             cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(colorize(levels, "turbo"), reference)
    with pytest.raises(ValueError, match="unknown colormap"):
        colorize(levels, "no-such-map")


def test_token_map_png_scales_over_the_photo_tokens_and_lines_up_after_the_trip():
    # A 480 x 640 photo -> 768 x 1024 for SAM: token rows 48.. are padding, with a huge value there.
    rng = np.random.default_rng(0)
    token_map = rng.random((64, 64), dtype=np.float32) * 1e-3
    token_map[48:, :] = 5.0  # padding: must not set the scale
    token_map[10, 40] = 2e-3  # the hottest real token
    data = token_map_png(token_map, (768, 1024), 1024)
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert (image.mode, image.size) == ("L", (64, 64))
    grid = token_map_from_png(data)
    assert grid[10, 40] == 1.0 and grid[:48].min() == 0.0 and grid[48:].min() == 1.0
    np.testing.assert_allclose(grid[:48], (token_map[:48] - token_map[:48].min()) / (2e-3 - token_map[:48].min()),
                               atol=0.5 / 255 + 1e-6)
    # Drawn over the photo, the map from the wire is the map from the model, to 8 bits.
    sent = token_map_to_image(grid, (768, 1024), (480, 640))
    direct = token_map_to_image(token_map, (768, 1024), (480, 640))
    assert sent.shape == direct.shape == (480, 640)
    assert np.abs(sent - direct).max() < 2 / 255
    assert np.unravel_index(sent.argmax(), sent.shape) == np.unravel_index(direct.argmax(), direct.shape)


def test_a_flat_map_is_zeros_and_bad_pngs_are_named():
    assert token_map_from_png(token_map_png(np.full((64, 64), 3.0), (1024, 1024), 1024)).max() == 0.0
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="grayscale"):
        token_map_from_png(base64.b64encode(buffer.getvalue()).decode())
    with pytest.raises(ValueError, match="not a token map"):
        token_map_from_png("bm90IGEgcG5n")
    with pytest.raises(ValueError, match="2-D"):
        token_map_png(np.zeros(64), (1024, 1024), 1024)
