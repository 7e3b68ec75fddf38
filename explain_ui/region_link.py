"""Which mask a "Why this mask" link from Label Studio points at, and the block that shows its
explanation first.

The backend writes ``?task=ID&project=P&region=<result id>`` on every predicted region, with result
ids ``<control>-<n>`` (``backend.ls_results.region_id``): mask ``n`` in the engine's order, the
page's "#n". The id alone names a mask of the explanation shown now; when the task's stored
predictions hold that result, its own mask (or box) picks the explained mask it overlaps most, so a
link keeps naming the mask that was clicked even if the explanation's order or set changed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.ls_results import parse_region_id
from backend.types import Box

from .client import BackendError
from .html_parts import data_url, score_bar
from .views import ExplanationView, GalleryItem, Segmentation, stored_segments

MATCH_IOU = 0.5  # a stored region and an explained mask overlapping less than this are not the same mask
_NUMBERED = re.compile(r"#(\d+)\s")  # the "#n " every per-mask caption of the page starts with

# After the deep link's last step: bring the region's block into view (on a phone it sits under the
# page's header, where the Input form would otherwise fill the screen). Gradio paints the block just
# after the event ends, so wait for it (up to 5 s).
SCROLL_JS = """() => {
  const until = Date.now() + 5000;
  const go = () => {
    const block = document.querySelector('#task-region .region-focus');
    if (!block) { if (Date.now() < until) setTimeout(go, 100); return; }
    const top = block.getBoundingClientRect().top;
    if (top < 0 || top > window.innerHeight / 3) block.scrollIntoView({block: 'start'});
  };
  go();
}"""


@dataclass(frozen=True)
class RegionFocus:
    """A link's region resolved against the masks on show."""

    region: str  # as the link gave it
    index: int | None  # into the shown segments; None when it names none of them
    message: str = ""  # why ``index`` is None (plain text), or a note on how it was matched
    matched_by: str = ""  # "stored mask", "stored box" or "region id"


def stored_result(predictions: Sequence[Mapping[str, Any]], region: str) -> Mapping[str, Any] | None:
    """The result with id ``region`` in the task's stored predictions (the newest holding it)."""
    dated = sorted(enumerate(predictions), key=lambda ip: (str(ip[1].get("created_at") or ""), ip[0]), reverse=True)
    for _, prediction in dated:
        for result in prediction.get("result") or []:
            if isinstance(result, Mapping) and str(result.get("id")) == region:
                return result
    return None


def _box_iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _stored_box(result: Mapping[str, Any], width: int, height: int) -> Box | None:
    """A stored rectangle's or polygon's box in pixels of a ``width`` x ``height`` image."""
    value = result.get("value") or {}
    try:
        if result.get("type") == "rectanglelabels":
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            return x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100
        if result.get("type") == "polygonlabels":
            points = np.asarray(value["points"], dtype=float).reshape(-1, 2)
            return (points[:, 0].min() * width / 100, points[:, 1].min() * height / 100,
                    points[:, 0].max() * width / 100, points[:, 1].max() * height / 100)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _overlaps(result: Mapping[str, Any], shown: Segmentation) -> tuple[list[float], str] | None:
    """IoU of a stored result with each shown mask, and what was compared; None when it can't be read."""
    height, width = shown.rgb.shape[:2]
    if result.get("type") == "brushlabels":
        try:
            (stored,) = stored_segments({"result": [result]}, shown.rgb)
        except (BackendError, ValueError):
            return None
        mask = stored.mask
        return [_mask_iou(mask, segment.mask) for segment in shown.segments], "stored mask"
    box = _stored_box(result, width, height)
    if box is None:
        return None
    return [_box_iou(box, segment.box) for segment in shown.segments], "stored box"


def region_first(region: str | None, shown: Segmentation,
                 predictions: Sequence[Mapping[str, Any]] = ()) -> RegionFocus | None:
    """Which of the masks on show the link's ``region`` names; None when the link names no region.

    Arguments:
        region: the link's ``region`` value, as given.
        shown: the masks on show (the task's explanation, or its stored prediction).
        predictions: the task's stored predictions, to find the region's own mask in.
    Returns:
        A RegionFocus with the index into ``shown.segments``, or with ``index`` None and a message
        saying why (a value that is no region id of ours, a mask the task no longer has).
    """
    if region is None:
        return None
    try:
        ref = parse_region_id(region)
    except ValueError as exc:
        return RegionFocus(region, None, f"The link's region {exc}. All masks are shown.")
    quoted = repr(region)
    count = len(shown.segments)
    if not count:
        return RegionFocus(region, None, f"Region {quoted} from the link: there are no masks to point at.")
    result = stored_result(predictions, region)
    overlaps = _overlaps(result, shown) if result is not None else None
    if overlaps is not None:
        ious, what = overlaps
        # Best overlap; on a tie, the mask the id numbers.
        best = max(range(count), key=lambda i: (round(ious[i], 6), i == ref.index))
        if ious[best] >= MATCH_IOU:
            return RegionFocus(region, best, matched_by=what)
        return RegionFocus(region, None, f"Region {quoted} from the link: its {what} overlaps none of the {count} "
                                         f"masks shown now (best IoU {ious[best]:.2f}); the prediction may come "
                                         "from another model version or prompt. All masks are shown.")
    if ref.index >= count:
        return RegionFocus(region, None, f"Region {quoted} from the link is mask #{ref.number}, but {count} "
                                         f"mask{'s are' if count != 1 else ' is'} shown now. All masks are shown.")
    return RegionFocus(region, ref.index, matched_by="region id")


def _numbered(items: Sequence[GalleryItem], number: int) -> list[GalleryItem]:
    """The gallery items whose caption is about mask ``#number``."""
    return [item for item in items if (m := _NUMBERED.match(item[1])) and int(m.group(1)) == number]


def _figure(image: np.ndarray, caption: str) -> str:
    text = html.escape(caption)
    return (f'<figure style="margin:0;flex:1 1 160px;max-width:260px"><img src="{data_url(image)}" alt="{text}" '
            f'style="width:100%;height:auto;display:block;border-radius:4px"><figcaption style="font-size:0.85em">'
            f"{text}</figcaption></figure>")


def region_html(focus: RegionFocus | None, shown: Segmentation, view: ExplanationView | None = None) -> str:
    """The block shown first for a link's region: its cut-out, the decoder's and its tokens' maps,
    and Grounding DINO's score of each prompt word; or the reason the region can't be shown.
    "" when the link names no region."""
    if focus is None:
        return ""
    if focus.index is None:
        return (f'<section class="region-focus region-focus-error" role="alert" style="border-left:4px solid '
                f'#b42318;padding:6px 10px"><b>{html.escape(focus.message)}</b></section>')
    segment = shown.segments[focus.index]
    number = focus.index + 1
    cut, caption = shown.mask_gallery()[focus.index]
    figures = [_figure(cut, caption)]
    if view is not None:
        figures += [_figure(image, text) for image, text in _numbered(view.decoder_maps, number)]
        figures += [_figure(image, text) for image, text in _numbered(view.mask_looks, number)]
    top = max((score for _, score in segment.token_scores), default=None)
    bars = "".join(score_bar(token, score, score == top) for token, score in segment.token_scores)
    phrases = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in segment.phrase_scores.items())
    iou = f" · IoU {segment.predicted_iou:.2f}" if np.isfinite(segment.predicted_iou) else ""
    how = {"stored mask": "found by its stored mask", "stored box": "found by its stored box",
           "region id": "found by its id"}.get(focus.matched_by, "")
    return (f'<section class="region-focus" data-region="{html.escape(focus.region)}" data-mask="{number}" '
            f'aria-label="Why mask #{number}" style="border-left:4px solid #e4572e;padding:6px 10px">'
            f'<h3 style="margin:0 0 4px">Why this mask: #{number} {html.escape(segment.label)} · score '
            f"{segment.score:.2f}{iou}</h3>"
            f"<p style=\"margin:0 0 6px\">The region <code>{html.escape(focus.region)}</code> you opened from Label "
            f"Studio ({how}); every mask's maps follow below.</p>"
            f'<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(figures)}</div>'
            + (f'<div class="region-grounding" style="max-width:520px;margin-top:6px"><b>Why this label</b> '
               f"(Grounding DINO's score of each prompt word){bars}</div>" if bars else "")
            + (f"<small>phrase scores: {phrases}</small>" if phrases else "")
            + "</section>")
