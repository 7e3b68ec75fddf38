"""Explanations: which attention produced each mask, and which prompt words each box matched.

Building one is cheap because the attention was recorded by the forward passes that made the
masks (see ``segmenter``); this module reduces it per mask and lays maps over the original image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from . import sam_attention
from .segmenter import Decoded, ImageEmbedding
from .types import Explanation, MaskExplanation, Segment

LEGEND = {
    "colormap": "jet",
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
        if mask is not None and mask.any():
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


@dataclass
class HeatmapImage:
    """One map over the original image: the heatmap alone and blended over the photo (both RGB)."""

    title: str
    heatmap: np.ndarray
    overlay: np.ndarray


@dataclass
class RenderedExplanation:
    encoder: list[HeatmapImage] = field(default_factory=list)  # one per global block, last marked
    masks: list[dict] = field(default_factory=list)  # per segment: decoder + token_look + grounding


WORKING_SIDE = 1024  # long side of the images an explanation is drawn at: SAM's input, all its maps hold


def working_size(size: tuple[int, int], max_side: int = WORKING_SIDE) -> tuple[int, int]:
    """(H, W) scaled down so the long side is at most ``max_side`` (never up), at least 1 px each."""
    height, width = int(size[0]), int(size[1])
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def at_working_size(image_rgb: np.ndarray, max_side: int = WORKING_SIDE) -> np.ndarray:
    """``image_rgb`` shrunk to ``working_size`` (area averaging), or itself when already small."""
    height, width = working_size(image_rgb.shape[:2], max_side)
    if (height, width) == image_rgb.shape[:2]:
        return image_rgb
    return cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)


def heatmap_image(title: str, token_map: np.ndarray, explanation: Explanation, image_rgb: np.ndarray,
                  alpha: float = 0.5) -> HeatmapImage:
    """A token-grid map cropped to the valid region, resized to ``image_rgb`` (the image or a scaled
    copy of it), coloured in RGB."""
    values = sam_attention.token_map_to_image(token_map, explanation.input_size, image_rgb.shape[:2],
                                              explanation.img_size)
    colored = sam_attention.colorize(values, LEGEND["colormap"])
    return HeatmapImage(title, colored, sam_attention.overlay(image_rgb, colored, alpha))


def render_explanation(explanation: Explanation, image_rgb: np.ndarray) -> RenderedExplanation:
    """Every map of ``explanation`` as RGB images at ``image_rgb``'s size: the original image, or a
    copy scaled to the same aspect ratio (``at_working_size``: maps hold 64 x 64 tokens, and a
    4000 px rendering would only cost memory and bytes on the wire)."""
    original = tuple(explanation.original_size)
    if image_rgb.shape[:2] != original and working_size(original, max(image_rgb.shape[:2])) != image_rgb.shape[:2]:
        raise ValueError(f"image is {image_rgb.shape[:2]}, the explanation was made for {explanation.original_size}")
    rendered = RenderedExplanation()
    last = max(explanation.encoder_received, default=None)
    for block, token_map in sorted(explanation.encoder_received.items()):
        title = f"block {block} (global{', last layer' if block == last else ''})"
        rendered.encoder.append(heatmap_image(title, token_map, explanation, image_rgb))
    for i, (segment, mask) in enumerate(zip(explanation.segments, explanation.masks)):
        rendered.masks.append({
            "index": i,
            "label": segment.label,
            "score": segment.score,
            "decoder": heatmap_image(f"{segment.label} {segment.score:.2f}: decoder", mask.decoder_map,
                                     explanation, image_rgb),
            "token_look": [heatmap_image(f"{segment.label}: block {b} mask tokens look", m, explanation, image_rgb)
                           for b, m in sorted(mask.token_look.items())],
            "grounding": [{"token": token, "score": score} for token, score in segment.token_scores],
            "phrase_scores": dict(segment.phrase_scores),
        })
    return rendered
