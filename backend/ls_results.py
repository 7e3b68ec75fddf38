"""Segments -> Label Studio results: brush RLE masks, rectangles and polygons for each label control
on the image, and the /predict entry that carries them."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .label_config import BRUSH, POLYGON, RECTANGLE, ImageTarget, LabelControl
from .types import Segment

logger = logging.getLogger(__name__)


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base(control: LabelControl, width: int, height: int, score: float) -> dict[str, Any]:
    return {
        "id": _region_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": score,
        "readonly": False,
    }


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean HxW mask (label-studio-sdk's encoder)."""
    from label_studio_sdk.converter import brush

    return brush.mask2rle(np.ascontiguousarray(mask, dtype=np.uint8) * 255)


def brush_result(control: LabelControl, label: str, segment: Segment, width: int, height: int) -> dict[str, Any]:
    result = _base(control, width, height, round(float(segment.score), 4))
    result["value"] = {"format": "rle", "rle": mask_to_rle(segment.mask), "brushlabels": [label]}
    return result


def _pct(value: float, size: int) -> float:
    return float(min(100.0, max(0.0, value / size * 100.0)))


def rectangle_result(control: LabelControl, label: str, segment: Segment, width: int,
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


def polygon_result(control: LabelControl, label: str, segment: Segment, width: int,
                   height: int) -> dict[str, Any] | None:
    points = mask_polygon(segment.mask)
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

    A segment whose phrase maps to no label of a control is left out of that control (logged).
    """
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    skipped: set[tuple[str, str]] = set()
    for segment in segments:
        if segment.area == 0:  # SAM found nothing inside the box: an empty brush helps nobody
            logger.debug("skipping %r: empty mask", segment.label)
            continue
        used = False
        labels = target.labels_for(segment.label)
        for control in target.controls:
            label = labels.get(control.name)
            if label is None:
                skipped.add((segment.label, control.name))
                continue
            result = _BUILDERS[control.kind](control, label, segment, width, height)
            if result is not None:
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
