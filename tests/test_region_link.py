"""The "Why this mask" link of a predicted region: the ids the backend gives results, the link it
writes, how the page reads the link back and which mask it opens first (issue 13, item 9).

Pure functions on real results (``segments_to_results`` with real RLE) and real masks; the browser
test is tests/test_browser_region_link.py.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.label_config import parse_label_config
from backend.ls_model import ModelSettings
from backend.ls_results import parse_region_id, prediction, region_id, segments_to_results
from backend.types import Segment
from explain_ui import region_link, views
from explain_ui.region_link import region_first, region_html

H, W = 40, 60
CONFIG = """
<View>
  <Image name="image" value="$img"/>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="car"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="car"/></RectangleLabels>
</View>
"""


def box_segment(label: str, box: tuple[int, int, int, int], score: float = 0.8) -> Segment:
    x0, y0, x1, y1 = box
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return Segment(label=label, box=(float(x0), float(y0), float(x1), float(y1)), score=score, predicted_iou=0.9,
                   mask=mask, phrase_scores={label: score}, token_scores=((label, score), ("other", 0.1)))


CAR = box_segment("car", (2, 2, 20, 20), 0.9)
CAT = box_segment("cat", (30, 10, 55, 35), 0.6)
EMPTY = Segment(label="cat", box=(0.0, 0.0, 1.0, 1.0), score=0.3, predicted_iou=0.5, mask=np.zeros((H, W), bool))


def shown(*segments: Segment) -> views.Segmentation:
    return views.Segmentation(np.full((H, W, 3), 120, np.uint8), list(segments))


def stored(*segments: Segment) -> dict:
    """A stored prediction of ``segments`` (engine order), as the backend writes it."""
    results, scores = segments_to_results(segments, parse_label_config(CONFIG).targets[0], W, H)
    return {"id": 1, "created_at": "2026-11-30T10:00:00Z", "result": results, **prediction(results, scores, "v1")}


# -- ids the backend gives results ----------------------------------------------------------------------
def test_result_ids_name_the_control_and_the_mask_number_in_engine_order():
    results, _ = segments_to_results([CAR, EMPTY, CAT], parse_label_config(CONFIG).targets[0], W, H)
    # The empty mask makes no result but keeps its number: ids follow the page's "#n".
    assert [r["id"] for r in results] == ["mask-1", "box-1", "mask-3", "box-3"]
    again, _ = segments_to_results([CAR, EMPTY, CAT], parse_label_config(CONFIG).targets[0], W, H)
    assert [r["id"] for r in again] == [r["id"] for r in results]  # predicting again: the same ids


@given(st.text(min_size=1, max_size=80), st.integers(1, 99_999))
def test_region_ids_read_back_for_any_control_name(name, number):
    ident = region_id(name, number)
    assert "#" not in ident and len(ident) <= 47
    ref = parse_region_id(ident)
    assert ref.number == number and ref.index == number - 1
    assert ref.control == name or (ref.control.startswith("c") and len(ref.control) == 9)


def test_distinct_unsafe_control_names_get_distinct_ids():
    assert region_id("my mask", 1) != region_id("my-mask", 1)
    assert region_id("label", 2) == "label-2"


@pytest.mark.parametrize("value", ["", "label", "label-0", "label-01", "-2", "label-2#a1", "label--2",
                                   "a" * 41 + "-2", "läbel-2", "label-2 x", "label-1234567", "<b>-2"])
def test_values_that_are_no_region_id_say_what_one_looks_like(value):
    with pytest.raises(ValueError, match="not a region of this backend.*'label-2'"):
        parse_region_id(value)


# -- the link --------------------------------------------------------------------------------------------
def test_link_carries_the_region_and_the_page_reads_it_back():
    settings = ModelSettings(explain_ui_url="http://ui.example:7860")
    link = settings.explain_link(12, "3", "mask-2")
    assert link == "http://ui.example:7860/?task=12&project=3&region=mask-2"
    assert views.deep_link(dict(parse_qsl(urlsplit(link).query))) == views.DeepLink(12, "3", "mask-2")
    assert settings.explain_link(12, None, None) == "http://ui.example:7860/?task=12"
    assert settings.explain_link(None, "3", "mask-2") is None and settings.explain_link(True, "3") is None
    assert ModelSettings().explain_link(12, "3", "mask-2") is None  # no EXPLAIN_UI_URL: no link


@pytest.mark.parametrize("query, region", [
    ("task=12&region=mask-2", "mask-2"),
    ("task=12&region=%20mask-2%20", "mask-2"),
    ("task=12&region=mask%2D2", "mask-2"),  # percent-encoded by a copy/paste or a mail client
    ("task=12&project=3&region=", None),
    ("task=12", None),
    ("task=12&region=%3Cscript%3E", "<script>"),  # kept as given: reported beside the task
])
def test_deep_link_keeps_the_region_as_given(query, region):
    link = views.deep_link(dict(parse_qsl(query, keep_blank_values=True)))
    assert link is not None and link.task_id == 12 and link.region == region


# -- which mask the page opens first -----------------------------------------------------------------
def test_no_region_in_the_link_focuses_nothing():
    assert region_first(None, shown(CAR, CAT)) is None
    assert region_html(None, shown(CAR, CAT)) == ""


def test_region_id_names_the_mask_when_no_prediction_is_stored():
    focus = region_first("mask-2", shown(CAR, CAT))
    assert (focus.index, focus.matched_by) == (1, "region id")


def test_stored_mask_finds_its_mask_when_the_order_changed():
    """The stored prediction had CAR as #1, CAT as #2; the page shows them the other way round."""
    predictions = [stored(CAR, CAT)]
    focus = region_first("mask-2", shown(CAT, CAR), predictions)
    assert (focus.index, focus.matched_by) == (0, "stored mask")
    focus = region_first("box-1", shown(CAT, CAR), predictions)  # a rectangle result: by its box
    assert (focus.index, focus.matched_by) == (1, "stored box")


def test_stored_mask_that_overlaps_no_shown_mask_is_reported():
    other = box_segment("cat", (40, 0, 60, 8))
    focus = region_first("mask-1", shown(other), [stored(CAR)])
    assert focus.index is None
    assert "'mask-1'" in focus.message and "overlaps none of the 1 masks" in focus.message


@pytest.mark.parametrize("value, message", [
    ("mask-3", "'mask-3' from the link is mask #3, but 2 masks are shown now"),
    ("mask-0", "'mask-0' is not a region of this backend"),
    ("garbage", "'garbage' is not a region of this backend"),
    ("x" * 500, "is not a region of this backend"),
])
def test_unknown_or_bad_region_gives_a_clear_message_and_no_focus(value, message):
    focus = region_first(value, shown(CAR, CAT), [stored(CAR, CAT)])
    assert focus.index is None and message in focus.message and "All masks are shown" in focus.message
    block = region_html(focus, shown(CAR, CAT))
    assert 'role="alert"' in block and "x" * 100 not in block  # a long value is cut short


def test_region_value_is_escaped_in_the_block():
    block = region_html(region_first("<img src=x onerror=alert(1)>-1", shown(CAR)), shown(CAR))
    assert "<img src=x" not in block and "&lt;img" in block


def test_block_shows_the_region_mask_its_maps_and_its_grounding_only():
    view = views.ExplanationView(
        decoder_maps=[(np.zeros((4, 4, 3), np.uint8), "#1 car: decoder, overlay"),
                      (np.zeros((4, 4, 3), np.uint8), "#2 cat: decoder, overlay"),
                      (np.zeros((4, 4, 3), np.uint8), "#2 cat: decoder, heatmap")],
        mask_looks=[(np.zeros((4, 4, 3), np.uint8), "#2 block 3 (last)"),
                    (np.zeros((4, 4, 3), np.uint8), "#12 block 3 (last)")])
    segmentation = shown(CAR, CAT)
    block = region_html(region_first("mask-2", segmentation), segmentation, view)
    assert 'data-mask="2"' in block and 'data-region="mask-2"' in block and "#2 cat" in block
    assert block.count("<img ") == 4  # its cut-out, decoder overlay and heatmap, its tokens' look
    assert 'alt="#2 cat: decoder, overlay"' in block and "#1 car" not in block and "#12" not in block
    assert "Why this label" in block and ">cat<" in block


def test_scroll_script_targets_the_block():
    assert "#task-region .region-focus" in region_link.SCROLL_JS
