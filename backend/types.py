"""Plain data passed between the engine, the HTTP layer and the explain UI."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image


@dataclass(frozen=True)
class Detection:
    """One Grounding DINO box, already mapped to the requested phrase it matched best."""

    label: str
    box: Box
    score: float
    # Score of every requested phrase for this box (max sigmoid logit over the phrase's tokens).
    phrase_scores: dict[str, float] = field(default_factory=dict)
    # (token text, sigmoid logit) for every prompt token: which words the box matched, how strongly.
    token_scores: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, eq=False)
class Segment:
    """A detection cut out by SAM: a boolean mask at the image's own size."""

    label: str
    box: Box
    score: float
    predicted_iou: float
    mask: np.ndarray  # bool, H x W of the original image
    phrase_scores: dict[str, float] = field(default_factory=dict)
    token_scores: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_detection(cls, detection: Detection, mask: np.ndarray, predicted_iou: float) -> "Segment":
        return cls(
            label=detection.label,
            box=detection.box,
            score=detection.score,
            predicted_iou=predicted_iou,
            mask=mask,
            phrase_scores=detection.phrase_scores,
            token_scores=detection.token_scores,
        )

    @property
    def area(self) -> int:
        return int(self.mask.sum())
