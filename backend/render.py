"""Draw segments on an image: coloured masks, boxes, and (optionally) label + score text."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import supervision as sv

from .types import Segment


def segments_to_detections(segments: Sequence[Segment], labels: Sequence[str]) -> sv.Detections:
    """supervision's container; class ids index ``labels`` so one label keeps one colour."""
    if not segments:
        return sv.Detections(xyxy=np.zeros((0, 4)), confidence=np.zeros(0), class_id=np.zeros(0, dtype=int))
    return sv.Detections(
        xyxy=np.array([s.box for s in segments], dtype=np.float32),
        mask=np.stack([s.mask for s in segments]),
        confidence=np.array([s.score for s in segments]),
        class_id=np.array([labels.index(s.label) for s in segments]),
    )


def draw_segments(image_rgb: np.ndarray, segments: Sequence[Segment], show_labels: bool = True,
                  opacity: float = 0.45) -> np.ndarray:
    """An RGB copy of ``image_rgb`` with every segment drawn on it."""
    labels = sorted({s.label for s in segments})
    detections = segments_to_detections(segments, labels)
    # supervision 0.6 draws in OpenCV's BGR order; convert around it so colours stay true in RGB.
    scene = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    scene = sv.MaskAnnotator().annotate(scene, detections, opacity=opacity)
    texts = [f"{s.label} {s.score:.2f}" for s in segments] if show_labels else [""] * len(segments)
    thickness = max(1, round(max(image_rgb.shape[:2]) / 400))
    annotator = sv.BoxAnnotator(thickness=thickness, text_scale=0.4 * thickness, text_thickness=thickness,
                                text_padding=3 * thickness)
    scene = annotator.annotate(scene, detections, labels=texts, skip_label=not show_labels)
    return cv2.cvtColor(scene, cv2.COLOR_BGR2RGB)


def label_color(label: str, labels: Sequence[str]) -> tuple[int, int, int]:
    """The RGB colour ``draw_segments`` uses for ``label`` (for legends)."""
    return sv.ColorPalette.default().by_idx(sorted(labels).index(label)).as_rgb()
