"""/api/segment answers with what the explain page draws, compactly: each mask one 1-bit PNG at most
WORKING_SIDE px on the long side (``mask_width`` x ``mask_height``), never a full-size Label Studio
brush RLE (8 masks of a 1-megapixel photo were ~8 MB of JSON numbers the page never read)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from backend._wsgi import ServerSettings, create_app
from backend.api_schema import SegmentationJson, parse
from backend.heatmaps import WORKING_SIDE
from backend.images import working_size
from explain_ui.views import segments_from_json
from tests.test_memory import generated_photo

PROMPT = "person . rocket . flag"
PNG_OVERHEAD = 1024  # signature, IHDR, IDAT/IEND chunk headers, zlib header: well under 1 KiB
FIELDS = 1024  # a segment's label, scores, box, area, token scores as JSON


def _answer(engine, rgb: np.ndarray) -> tuple[bytes, SegmentationJson]:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    client = create_app(engine=engine, settings=ServerSettings(load_on_start=False)).test_client()
    form = {"image": (io.BytesIO(buffer.getvalue()), "photo.png"), "prompt": PROMPT, "box_threshold": "0",
            "text_threshold": "0"}
    response = client.post("/api/segment", data=form, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    return response.data, parse(response.get_json(), SegmentationJson)


def _bitmap_bound(masks: int, height: int, width: int) -> int:
    """Bytes of an answer whose masks are each no bigger than their raw bitmap at ``height`` x ``width``
    (one bit a pixel plus PNG's filter byte a row), base64'd, with the segment's other fields."""
    png = (width + 7) // 8 * height + height + PNG_OVERHEAD
    return masks * (4 * -(-png // 3) + FIELDS) + FIELDS


@pytest.mark.parametrize("width, height", [(1000, 1000), (2400, 1600)])
def test_segment_answer_is_at_most_a_bitmap_per_mask_at_working_size(engine, width, height):
    rgb = generated_photo(width, height, seed=5)
    data, body = _answer(engine, rgb)
    mask_size = working_size((height, width), WORKING_SIDE)
    assert (body["width"], body["height"]) == (width, height)
    assert (body["mask_height"], body["mask_width"]) == mask_size
    assert len(body["segments"]) == engine.config.max_detections, "every mask the engine may find"
    assert len(data) <= _bitmap_bound(len(body["segments"]), *mask_size)
    assert all("mask_rle" not in segment for segment in body["segments"])
    expected = engine.segment(rgb, PROMPT, 0.0, 0.0)  # from the engine's caches: the same masks
    for sent, segment in zip(body["segments"], expected, strict=True):
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask_png"]))))
        assert np.array_equal(mask, segment.mask_source.resized(*mask_size))
        assert sent["area"] == segment.area  # counted at the image's own size


def test_page_draws_the_compact_masks_at_the_image_size(engine):
    rgb = generated_photo(1000, 1000, seed=6)
    _, body = _answer(engine, rgb)
    segments = segments_from_json(body["segments"], rgb)
    expected = engine.segment(rgb, PROMPT, 0.0, 0.0)
    assert [s.label for s in segments] == [s.label for s in expected]
    for shown, segment in zip(segments, expected, strict=True):
        assert np.array_equal(shown.mask, segment.mask)  # under WORKING_SIDE: the masks themselves


def test_page_keeps_a_big_photo_s_masks_as_sent_and_draws_at_working_size(engine):
    """A photo past WORKING_SIDE: the page holds each mask at the size it came (no full-size copies of
    a 12-megapixel mask per segment) and draws the Output picture at that size, masks on it."""
    from explain_ui.views import Segmentation

    width, height = 2400, 1600
    rgb = generated_photo(width, height, seed=7)
    _, body = _answer(engine, rgb)
    segments = segments_from_json(body["segments"], rgb)
    mask_size = (body["mask_height"], body["mask_width"])
    for shown, sent in zip(segments, body["segments"], strict=True):
        assert shown.mask_source.size == (height, width) and shown.area == sent["area"]
        assert shown.mask.shape == (height, width)  # still made full size when something asks
        assert np.array_equal(shown.mask_source.resized(*mask_size),
                              np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask_png"])))))
    result = Segmentation(rgb, segments)
    drawn = result.overlay(show_labels=False)
    assert drawn.shape == (*mask_size, 3)
    plain = Segmentation(rgb, []).overlay(show_labels=False)
    painted = np.any(drawn != plain, axis=2)
    union = np.logical_or.reduce([s.mask_source.resized(*mask_size) for s in segments])
    assert painted[union].mean() > 0.9  # the masks are what is coloured


def test_segment_and_explain_answers_of_a_big_photo_draw_the_same_output(engine):
    """The page runs Segment, then Explain, and keeps the Output picture when the masks are the same:
    both answers send them at the same working size, so they compare equal without full-size copies."""
    from explain_ui.panels import same_masks
    from explain_ui.views import Segmentation

    rgb = generated_photo(2400, 1600, seed=8)
    _, segmented = _answer(engine, rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    client = create_app(engine=engine, settings=ServerSettings(load_on_start=False)).test_client()
    form = {"image": (io.BytesIO(buffer.getvalue()), "photo.png"), "prompt": PROMPT, "box_threshold": "0",
            "text_threshold": "0"}
    explained = client.post("/api/explain", data=form, content_type="multipart/form-data").get_json()
    shown = Segmentation(rgb, segments_from_json(segmented["segments"], rgb))
    result = Segmentation(rgb, segments_from_json(explained["segments"], rgb))
    assert same_masks(shown, result)
    fewer = Segmentation(rgb, result.segments[:-1] + [result.segments[0]])  # one mask swapped for another
    assert not same_masks(shown, fewer)
