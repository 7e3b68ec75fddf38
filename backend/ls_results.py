"""Segments -> Label Studio results: brush RLE masks, rectangles and polygons for each label control
on the image, and the /predict entry that carries them.

Result ids are ``<control>-<n>``: mask ``n`` (1-based, the engine's order, which is the explain page's
"#n") on that control. They are deterministic, so predicting a task again writes the same ids and a
region's "Why this mask" link (``?region=<id>``) names the same mask; the explain page reads ``n``
back with ``parse_region_id``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .label_config import BRUSH, POLYGON, RECTANGLE, ImageTarget, LabelControl
from .types import Segment

logger = logging.getLogger(__name__)


# A control name as it may appear in a region id: URL-safe and without "#" (Label Studio's editor
# keys regions as "<id>#<annotation>") or "-" (the separator before the mask number).
_ID_SAFE = re.compile(r"[A-Za-z0-9_.]{1,40}")
_REGION_ID = re.compile(r"([A-Za-z0-9_.]{1,40})-([1-9][0-9]{0,5})")


@dataclass(frozen=True)
class RegionRef:
    """What a region id written by ``region_id`` names."""

    control: str  # the control part: its name, or "c" + a digest of a name that isn't URL-safe
    number: int  # 1-based mask number in the engine's order (the explain page's "#number")

    @property
    def index(self) -> int:
        return self.number - 1


def region_id(control: str, number: int) -> str:
    """The result id of mask ``number`` (1-based) on the control named ``control``: unique within a
    prediction (control names are unique in a labeling config), the same every time, short and URL-safe.

    >>> region_id("label", 2)
    'label-2'
    """
    if number < 1:
        raise ValueError(f"mask numbers start at 1, got {number}")
    part = control if _ID_SAFE.fullmatch(control) else "c" + hashlib.sha1(control.encode()).hexdigest()[:8]
    return f"{part}-{number}"


def parse_region_id(value: str) -> RegionRef:
    """``region_id``'s inverse; ValueError saying what a region id looks like for anything else."""
    match = _REGION_ID.fullmatch(value)
    if match is None:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(f"{shown!r} is not a region of this backend (its ids look like 'label-2': the "
                         "control's name, '-', the mask number)")
    return RegionRef(match.group(1), int(match.group(2)))


def _base(control: LabelControl, width: int, height: int, score: float) -> dict[str, Any]:
    return {
        "id": "",  # set by segments_to_results, which knows the mask's number
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": score,
        "readonly": False,
    }


# Label Studio's brush RLE (label-studio-sdk's ``converter.brush.encode_rle`` over the mask's RGBA bytes):
# a 53-bit header (the byte count in 32 bits, wordsize - 1 = 7 in 5, the run-length field sizes 3, 4, 8,
# 16 less one in 4 bits each), then one token per run of equal bytes, then zero bits to a byte boundary
# (a whole zero byte where the bits already end on one, as the SDK pads).
_RLE_HEADER_BITS = 53
_RLE_SIZES = (3, 4, 8, 16)
_RLE_LONGEST = 2**16  # the longest run one token holds; longer runs take several


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean HxW mask: the bytes label-studio-sdk's ``brush.mask2rle``
    makes for the mask as 0/255 (tests/test_ls_results_rle.py checks them equal), from the mask's runs.

    The SDK repeats every pixel four times (RGBA) and encodes run by run in Python strings: ~0.2 s for
    one 12 MP mask, more than the model's share of a task when a photo has several masks. Here the runs
    are the mask's own (each four times as long in RGBA bytes: a run of equal pixels is a run of equal
    bytes, and neighbouring runs differ), and the tokens are packed as bit arrays (a speckled 12 MP mask
    of ~300k runs: ~30 ms).
    """
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("an empty mask has no brush RLE")
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.append(starts, flat.size)).astype(np.int64) * 4  # in RGBA bytes
    values = np.where(flat[starts], 255, 0).astype(np.int64)
    # A run longer than one token holds is (length - 1) // 2**16 tokens of 2**16 bytes, then the rest.
    counts = np.maximum(lengths - 1, 0) // _RLE_LONGEST + 1
    run_values = np.repeat(values, counts)
    run_lengths = np.full(int(counts.sum()), _RLE_LONGEST, dtype=np.int64)
    run_lengths[np.cumsum(counts) - 1] = lengths - (counts - 1) * _RLE_LONGEST
    # The field size index, by the whole run's length (a long run's last token keeps the 16-bit field,
    # however short its rest): <= 8 -> 0 (3 bits), <= 16 -> 1 (4), <= 256 -> 2 (8), else 3 (16). Every run
    # here is a series (4 bytes at least), marked by a leading 1 bit.
    size_index = np.repeat(np.searchsorted(np.array([8, 16, 256]), lengths, side="left"), counts)
    field_bits = np.array(_RLE_SIZES, dtype=np.int64)[size_index]
    token_bits = 1 + 2 + field_bits + 8  # at most 27
    tokens = (((1 << 2 | size_index) << field_bits | (run_lengths - 1)) << 8) | run_values
    header = ((((len(flat) * 4) << 5 | 7) << 16) | 0x237F)  # 32 + 5 + 4 x 4 bits: 3-1, 4-1, 8-1, 16-1
    header_bits = np.unpackbits(np.array([header], dtype=">u8").view(np.uint8))[-_RLE_HEADER_BITS:]
    # Each token's bits, most significant first: its top-aligned 32 bits unpacked, the first ``width`` kept.
    aligned = (tokens << (32 - token_bits)).astype(">u4")
    token_bit_rows = np.unpackbits(aligned.view(np.uint8)).reshape(-1, 32)
    bits = token_bit_rows[np.arange(32) < token_bits[:, None]]
    padding = 8 - (_RLE_HEADER_BITS + bits.size) % 8
    return np.packbits(np.concatenate([header_bits, bits, np.zeros(padding, dtype=np.uint8)])).tolist()


def brush_result(control: LabelControl, label: str, segment: Segment, mask: np.ndarray, width: int,
                 height: int) -> dict[str, Any]:
    result = _base(control, width, height, round(float(segment.score), 4))
    result["value"] = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    return result


def _pct(value: float, size: int) -> float:
    return float(min(100.0, max(0.0, value / size * 100.0)))


def rectangle_result(control: LabelControl, label: str, segment: Segment, mask: np.ndarray, width: int,
                     height: int) -> dict[str, Any]:
    x0, y0, x1, y1 = segment.box
    result = _base(control, width, height, round(float(segment.score), 4))
    x, y = _pct(x0, width), _pct(y0, height)
    result["value"] = {
        "x": x, "y": y, "width": _pct(x1, width) - x, "height": _pct(y1, height) - y,
        "rotation": 0, "rectanglelabels": [label],
    }
    return result


def mask_polygon(mask: np.ndarray, tolerance: float = 0.003) -> np.ndarray | None:
    """The mask's largest outer contour, simplified (Douglas-Peucker at ``tolerance`` x perimeter),
    as an Nx2 array of pixel (x, y); None when the mask has no polygon of 3+ points."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    epsilon = max(1.0, tolerance * cv2.arcLength(largest, True))
    points = cv2.approxPolyDP(largest, epsilon, True).reshape(-1, 2)
    return points if len(points) >= 3 else None


def polygon_result(control: LabelControl, label: str, segment: Segment, mask: np.ndarray, width: int,
                   height: int) -> dict[str, Any] | None:
    points = mask_polygon(mask)
    if points is None:
        return None
    result = _base(control, width, height, round(float(segment.score), 4))
    result["value"] = {
        "points": [[_pct(float(x), width), _pct(float(y), height)] for x, y in points],
        "closed": True,
        "polygonlabels": [label],
    }
    return result


_BUILDERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    BRUSH: brush_result, RECTANGLE: rectangle_result, POLYGON: polygon_result,
}


def segments_to_results(segments: Iterable[Segment], target: ImageTarget, width: int,
                        height: int) -> tuple[list[dict[str, Any]], list[float]]:
    """Results for every label control on ``target``, and the score of each segment that made one.
    The n-th segment's results get the ids ``region_id(control, n)`` (n from 1, empty ones counted).

    A segment whose phrase maps to no label of a control is left out of that control (logged).
    """
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    skipped: set[tuple[str, str]] = set()
    for number, segment in enumerate(segments, 1):
        # Made at the photo's size once for all of this segment's results (at 12 MP ~45 ms), then dropped.
        mask = segment.mask
        if not mask.any():  # SAM found nothing inside the box: an empty brush helps nobody
            logger.debug("skipping %r: empty mask", segment.label)
            continue
        used = False
        labels = target.labels_for(segment.label)
        for control in target.controls:
            label = labels.get(control.name)
            if label is None:
                skipped.add((segment.label, control.name))
                continue
            result = _BUILDERS[control.kind](control, label, segment, mask, width, height)
            if result is not None:
                result["id"] = region_id(control.name, number)
                results.append(result)
                used = True
        if used:
            scores.append(float(segment.score))
    for phrase, control_name in sorted(skipped):
        logger.info("phrase %r matches no label of %r; skipped (name a label, or add it to a label's "
                    "predicted_values)", phrase, control_name)
    return results, scores


def prediction(results: list[dict[str, Any]], scores: Sequence[float], model_version: str) -> dict[str, Any]:
    """One /predict entry; the task score is the mean region score (0 when nothing was found)."""
    return {
        "result": results,
        "score": round(float(np.mean(scores)), 4) if scores else 0.0,
        "model_version": model_version,
    }
