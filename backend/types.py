"""Plain data passed between the engine, the HTTP layer and the explain UI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image


def as_box(values: Iterable[float]) -> Box:
    """Four numbers (a tensor row, a JSON list) as a ``Box`` of floats; ValueError for another count."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 4:
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {len(numbers)}")
    return numbers[0], numbers[1], numbers[2], numbers[3]


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
    # The box as Grounding DINO drew it, before ``box`` was clipped to the image. SAM is prompted with
    # this one, as the reference chain (groundingdino predict + SamPredictor) does, so masks match it.
    sam_box: Box | None = None

    @property
    def prompt_box(self) -> Box:
        return self.box if self.sam_box is None else self.sam_box


class MaskSource(Protocol):
    """A mask kept small and made full size only when asked for (``SamMaskLogits``, ``DenseMask``)."""

    @property
    def size(self) -> tuple[int, int]: ...  # H, W of the full mask

    @property
    def area(self) -> int: ...  # set pixels of the full mask

    def resized(self, height: int, width: int) -> np.ndarray: ...  # bool, height x width


@dataclass(frozen=True, eq=False)
class DenseMask:
    """A mask held pixel by pixel (from a PNG or a Label Studio brush)."""

    bits: np.ndarray  # bool, H x W

    @property
    def size(self) -> tuple[int, int]:
        return int(self.bits.shape[0]), int(self.bits.shape[1])

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.bits))

    def resized(self, height: int, width: int) -> np.ndarray:
        if (height, width) == self.size:
            return self.bits
        rows = (np.arange(height) * self.bits.shape[0]) // height  # nearest neighbour
        cols = (np.arange(width) * self.bits.shape[1]) // width
        return self.bits[rows[:, None], cols[None, :]]


@dataclass(frozen=True, eq=False, init=False)
class Segment:
    """A detection cut out by SAM. ``mask`` is the boolean mask at the image's own size, made from
    ``mask_source`` on each access: keep it in a local while using it, and cache Segments, not masks
    (a 4000 x 4000 mask is 16 MB; its source 256 KiB)."""

    label: str
    box: Box
    score: float
    predicted_iou: float
    mask_source: MaskSource
    phrase_scores: dict[str, float]
    token_scores: tuple[tuple[str, float], ...]

    def __init__(self, label: str, box: Box, score: float, predicted_iou: float,
                 mask: np.ndarray | MaskSource, phrase_scores: dict[str, float] | None = None,
                 token_scores: tuple[tuple[str, float], ...] = ()) -> None:
        """``mask``: a bool H x W array, or a ``MaskSource`` that makes one on demand."""
        source = DenseMask(np.asarray(mask, dtype=bool)) if isinstance(mask, np.ndarray) else mask
        for name, value in (("label", label), ("box", box), ("score", score), ("predicted_iou", predicted_iou),
                            ("mask_source", source), ("phrase_scores", dict(phrase_scores or {})),
                            ("token_scores", token_scores)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_detection(cls, detection: Detection, mask: np.ndarray | MaskSource,
                       predicted_iou: float) -> Segment:
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
    def mask(self) -> np.ndarray:
        """bool, H x W of the original image."""
        return self.mask_source.resized(*self.mask_source.size)

    @property
    def area(self) -> int:
        return self.mask_source.area

    def resized(self, height: int, width: int) -> Segment:
        """This segment on the image scaled to ``height`` x ``width`` (mask and box), for drawing."""
        full_h, full_w = self.mask_source.size
        sx, sy = width / full_w, height / full_h
        x0, y0, x1, y1 = self.box
        return Segment(self.label, (x0 * sx, y0 * sy, x1 * sx, y1 * sy), self.score, self.predicted_iou,
                       self.mask_source.resized(height, width), self.phrase_scores, self.token_scores)


@dataclass(frozen=True, eq=False)
class MaskExplanation:
    """Why SAM drew one mask. Maps are on SAM's token grid (64 x 64 for a 1024 input)."""

    # Mask decoder: the final token-to-image attention of the mask token that produced the mask
    # (None: not sent, in an explanation rebuilt from the HTTP API past its first maps).
    decoder_map: np.ndarray | None
    # Encoder: where the mask's own tokens look, per global block (head-averaged softmax rows).
    token_look: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Explanation:
    """Segments of one image + prompt with the attention that produced them.

    Token-grid maps stay small here; ``backend.explainer`` lays them over the original image.
    """

    model_version: str
    segments: tuple[Segment, ...]
    masks: tuple[MaskExplanation, ...]  # one per segment, same order
    # Encoder "attention received" per global block: mean attention each location gets from the
    # image's own (unpadded) tokens. Empty when the encoder has no global attention (MobileSAM).
    encoder_received: dict[int, np.ndarray]
    original_size: tuple[int, int]  # H, W of the image
    input_size: tuple[int, int]  # H, W SAM saw after resizing (before padding)
    img_size: int  # SAM's square input side (1024)
    notes: tuple[str, ...] = ()  # what is missing and why
