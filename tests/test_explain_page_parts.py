"""The explain page's own pieces without a browser: picture grids (alt text, whole captions), the legend,
the no-detection hint, upload checks, the scikit-image examples and the theme's contrast."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.types import Segment
from explain_ui import html_parts, views
from explain_ui.panels import EXAMPLES, THEME, example_photos, segmentation_summary, uploaded_rgb
from tests.browser_page import contrast


def _decoded(src: str) -> np.ndarray:
    kind, _, data = src.partition(",")
    assert kind.startswith("data:image/")
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"))


def test_picture_grid_gives_every_image_its_alt_text_and_whole_caption(chelsea):
    caption = "block 3 (global, last layer) <b>"
    html = html_parts.figure_grid_html("Encoder maps", [(chelsea, caption), (chelsea[:50, :80], "#2 cat")], "Heatmap")
    assert html.count("<figure>") == 2 and "<h4>Encoder maps</h4>" in html
    assert 'alt="Heatmap: block 3 (global, last layer) &lt;b&gt;"' in html  # escaped, never cut
    assert "<figcaption>block 3 (global, last layer) &lt;b&gt;</figcaption>" in html
    sources = re.findall(r'src="([^"]+)"', html)
    assert [_decoded(s).shape for s in sources] == [chelsea.shape, (50, 80, 3)]  # sent at their own size
    assert np.abs(_decoded(sources[0]).astype(int) - chelsea).mean() < 4  # the same picture (JPEG)
    assert html_parts.figure_grid_html("Encoder maps", [], "Heatmap") == ""  # nothing: no empty grid


def test_mask_cut_outs_are_sent_as_thumbnails_with_the_image_aspect(astronaut):
    html = html_parts.figure_grid_html("Masks", [(astronaut[:, :256], "#1 person")], "Mask", max_side=200)
    (src,) = re.findall(r'src="([^"]+)"', html)
    assert _decoded(src).shape == (200, 100, 3)


def test_output_picture_has_alt_text(chelsea):
    html = html_parts.picture_html(chelsea, 'The image with 1 mask(s) drawn: #1 cat "big"')
    assert 'alt="The image with 1 mask(s) drawn: #1 cat &quot;big&quot;"' in html
    assert html_parts.picture_html(None, "nothing") == ""


def test_legend_puts_the_colour_ends_in_words_beside_the_bar():
    legend = {"colormap": "jet", "low": "blue: little attention", "high": "red: most attention",
              "notes": ["Decoder map: where the decoder looked"]}
    html = html_parts.legend_html(legend)
    assert "linear-gradient(to right, rgb(0,0,128)" in html  # jet starts dark blue ...
    assert html.count("rgb(") == 9 and "rgb(128,0,0)" in html  # ... and ends dark red
    assert "blue: little attention" in html and "red: most attention" in html
    assert "Decoder map: where the decoder looked" in html
    assert html_parts.legend_html({}) == ""


def test_no_detections_say_to_lower_the_box_threshold(chelsea):
    empty = views.Segmentation(chelsea, [], "**0 masks** for cat: nothing above the thresholds")
    text = segmentation_summary(empty, 0.65)
    assert "No objects found" in text and "Box confidence threshold" in text and "0.65" in text
    assert "untick" in segmentation_summary(empty, None)  # the project's thresholds: say how to set one
    found = views.Segmentation(chelsea, [Segment("cat", (0.0, 0.0, 5.0, 5.0), 0.9, 0.8,
                                                 np.ones(chelsea.shape[:2], bool))], "**1 mask**")
    assert segmentation_summary(found, 0.65) == "**1 mask**"


def test_uploads_are_checked_by_the_page(tmp_path: Path, chelsea):
    text = tmp_path / "upload.bin"
    text.write_text("not a photo")
    with pytest.raises(views.InputError, match=r"notes\.png can't be used as an image: .*not a readable image"):
        uploaded_rgb({"path": str(text), "orig_name": "notes.png"})
    with pytest.raises(views.InputError, match="Upload an image first"):
        uploaded_rgb(None)
    tiff = tmp_path / "scan.tif"
    Image.fromarray(chelsea).save(tiff)  # browsers don't draw TIFF; the backend reads it
    assert np.array_equal(uploaded_rgb({"path": str(tiff), "orig_name": "scan.tif"}), chelsea)


def test_examples_are_scikit_image_photos_written_once(tmp_path: Path):
    import skimage.data

    rows = example_photos(tmp_path)
    assert [Path(path).stem for path, _ in rows] == [name for name, _ in EXAMPLES]
    for (path, prompt), (name, expected_prompt) in zip(rows, EXAMPLES, strict=True):
        assert prompt == expected_prompt
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), getattr(skimage.data, name)())
    stamps = [Path(path).stat().st_mtime_ns for path, _ in rows]
    assert example_photos(tmp_path) == rows
    assert [Path(path).stat().st_mtime_ns for path, _ in rows] == stamps


def _hex(colour: str) -> list[int]:
    if colour == "white":
        return [255, 255, 255]
    return [int(colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)]


@pytest.mark.parametrize("mode", ["", "_dark"])
def test_theme_text_reaches_wcag_contrast(mode):
    value = THEME._get_computed_value
    pairs = {"help text": ("block_info_text_color", "block_background_fill"),
             "secondary text": ("body_text_color_subdued", "body_background_fill"),
             "Run button": ("button_primary_text_color", "button_primary_background_fill"),
             "Run button, hovered": ("button_primary_text_color", "button_primary_background_fill_hover")}
    for what, (fg, bg) in pairs.items():
        ratio = contrast(_hex(value(fg + mode)), _hex(value(bg + mode)))
        assert ratio >= 4.5, f"{what}{mode}: {value(fg + mode)} on {value(bg + mode)} is {ratio:.1f}:1"
