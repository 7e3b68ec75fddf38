"""Explanations: which attention produced each mask, and which prompt words each box matched.

Building one is cheap because the attention was recorded by the forward passes that made the
masks (see ``segmenter``); this module reduces it per mask and lays maps over the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import sam_attention
from .images import working_size
from .segmenter import Decoded, ImageEmbedding
from .types import Explanation, MaskExplanation, Segment

COLORMAP = "jet"  # heatmap colours; the legend names it for the UI
LEGEND = {
    "colormap": COLORMAP,
    "low": "blue: little attention",
    "high": "red: most attention (each map scaled to its own min..max)",
    "notes": [
        "Encoder 'attention received': for a global-attention block of SAM's image encoder, the true "
        "softmax attention (q.k + relative position), averaged over heads and over every image token "
        "that looks: bright places are the ones the whole image attends to.",
        "Encoder 'where the mask looks': the same attention rows, averaged over the tokens inside the "
        "mask only: what the mask's own region attended to in the last global block.",
        "Decoder map: SAM's mask decoder, final token-to-image attention of the mask token that "
        "produced this mask: where the decoder looked when it drew it.",
        "Label grounding: Grounding DINO's score of each prompt word for this box (sigmoid of the "
        "token logit); the label is the requested phrase whose words scored highest.",
    ],
}


def build_explanation(
    model_version: str,
    segments: Sequence[Segment],
    embedding: ImageEmbedding,
    decoded: Decoded,
    img_size: int,
    patch_size: int,
) -> Explanation:
    """Per-mask maps from the attention recorded while ``segments`` were made."""
    notes = list(embedding.notes)
    attention = embedding.attention
    masks = []
    for i, segment in enumerate(segments):
        token_look: dict[int, np.ndarray] = {}
        mask = segment.mask if attention is not None else None  # made full size once, then dropped
        if attention is not None and mask is not None and mask.any():
            weights = sam_attention.mask_to_token_grid(mask, embedding.input_size, img_size, patch_size)
            token_look[attention.last_block.block_index] = sam_attention.mask_attention_map(
                attention.last_block, weights)
        decoder_map = (decoded.decoder_maps[i] if decoded.decoder_maps is not None
                       else np.zeros(embedding.features.shape[-2:], dtype=np.float32))
        masks.append(MaskExplanation(decoder_map=decoder_map, token_look=token_look))
    if decoded.decoder_maps is None and segments:
        notes.append("decoder attention was not captured (EXPLANATIONS=0)")
    return Explanation(
        model_version=model_version,
        segments=tuple(segments),
        masks=tuple(masks),
        encoder_received=dict(attention.received) if attention is not None else {},
        original_size=embedding.original_size,
        input_size=embedding.input_size,
        img_size=img_size,
        notes=tuple(notes),
    )


# What an explanation is drawn at. Its maps hold 64 x 64 tokens, so more pixels add bytes, not detail;
# a response stays a few MB whatever the photo's size.
WORKING_SIDE = 1024  # long side of the segment overlay and the masks an explanation sends
ENCODER_MAP_SIDE = 512  # long side of the encoder's maps (one per global block: a handful)
MASK_MAP_SIDE = 256  # long side of each mask's maps (decoder + where its tokens look)
MASK_MAPS = 16  # masks (best first) whose maps are drawn; the rest keep their scores only


def at_working_size(image_rgb: np.ndarray, max_side: int = WORKING_SIDE) -> np.ndarray:
    """``image_rgb`` shrunk to ``working_size`` (area averaging), or itself when already small."""
    height, width = working_size(image_rgb.shape[:2], max_side)
    if (height, width) == image_rgb.shape[:2]:
        return image_rgb
    return cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)


@dataclass
class HeatmapImage:
    """One map over the image: the heatmap alone and blended over the photo (all RGB, one size)."""

    title: str
    heatmap: np.ndarray
    overlay: np.ndarray
    image: np.ndarray  # the photo at this size, to blend again at another opacity


@dataclass
class MaskMaps:
    """One segment's explanation as drawn: maps (None / empty past ``MASK_MAPS``) and its scores."""

    index: int
    label: str
    score: float
    decoder: HeatmapImage | None
    token_look: list[tuple[int, HeatmapImage]]  # (encoder block, map)
    grounding: list[tuple[str, float]]  # (prompt token, score)
    phrase_scores: dict[str, float]


@dataclass
class RenderedExplanation:
    encoder: list[tuple[int, HeatmapImage]] = field(default_factory=list)  # per global block, last marked
    masks: list[MaskMaps] = field(default_factory=list)  # per segment, same order


def heatmap_image(title: str, token_map: np.ndarray, explanation: Explanation, image_rgb: np.ndarray,
                  alpha: float = 0.5) -> HeatmapImage:
    """A token-grid map cropped to the valid region, resized to ``image_rgb`` (the image or a scaled
    copy of it), coloured in RGB."""
    values = sam_attention.token_map_to_image(token_map, explanation.input_size, image_rgb.shape[:2],
                                              explanation.img_size)
    colored = sam_attention.colorize(values, COLORMAP)
    return HeatmapImage(title, colored, sam_attention.overlay(image_rgb, colored, alpha), image_rgb)


def render_explanation(explanation: Explanation, image_rgb: np.ndarray, encoder_side: int = ENCODER_MAP_SIDE,
                       mask_side: int = MASK_MAP_SIDE, mask_maps: int = MASK_MAPS) -> RenderedExplanation:
    """The maps of ``explanation`` as RGB images over ``image_rgb`` (the image, or a copy scaled to
    the same aspect ratio), at most ``encoder_side`` / ``mask_side`` px on the long side, for the
    first ``mask_maps`` segments."""
    original = (int(explanation.original_size[0]), int(explanation.original_size[1]))
    if image_rgb.shape[:2] != original and working_size(original, max(image_rgb.shape[:2])) != image_rgb.shape[:2]:
        raise ValueError(f"image is {image_rgb.shape[:2]}, the explanation was made for {explanation.original_size}")
    encoder_rgb, mask_rgb = at_working_size(image_rgb, encoder_side), at_working_size(image_rgb, mask_side)
    rendered = RenderedExplanation()
    last = max(explanation.encoder_received, default=None)
    for block, token_map in sorted(explanation.encoder_received.items()):
        title = f"block {block} (global{', last layer' if block == last else ''})"
        rendered.encoder.append((block, heatmap_image(title, token_map, explanation, encoder_rgb)))
    for i, (segment, mask) in enumerate(zip(explanation.segments, explanation.masks, strict=True)):
        drawn = i < mask_maps
        rendered.masks.append(MaskMaps(
            index=i,
            label=segment.label,
            score=segment.score,
            decoder=heatmap_image(f"{segment.label} {segment.score:.2f}: decoder", mask.decoder_map, explanation,
                                  mask_rgb) if drawn else None,
            token_look=[(b, heatmap_image(f"{segment.label}: block {b} mask tokens look", m, explanation, mask_rgb))
                        for b, m in sorted(mask.token_look.items())] if drawn else [],
            grounding=list(segment.token_scores),
            phrase_scores=dict(segment.phrase_scores),
        ))
    return rendered
