"""Explanations: which attention produced each mask, and which prompt words each box matched.

Building one is cheap because the attention was recorded by the forward passes that made the
masks (see ``segmenter``); this module reduces it per mask. ``heatmaps`` lays the maps over the photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import sam_attention
from .heatmaps import render_explanation
from .segmenter import Decoded, ImageEmbedding
from .types import Explanation, MaskExplanation, Segment

__all__ = ["build_explanation", "render_explanation"]  # drawing lives in ``heatmaps`` (no torch there)


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
    # Each mask's coverage of SAM's tokens, measured in SAM's input frame (the resized image the tokens
    # tile; for SAM's own masks, the thresholded logits before they are scaled to the photo), so no mask
    # is made at the photo's size here: at 12 MP that was ~75 ms per mask.
    looks: dict[int, np.ndarray] = {}
    if attention is not None:
        coverage: dict[int, np.ndarray] = {}
        for i, segment in enumerate(segments):
            in_frame = segment.mask_source.resized(*embedding.input_size)
            if in_frame.any():
                coverage[i] = sam_attention.mask_to_token_grid(in_frame, embedding.input_size, img_size, patch_size)
        if coverage:
            maps = sam_attention.mask_attention_maps(attention.last_block, np.stack(list(coverage.values())))
            looks = dict(zip(coverage, maps, strict=True))
    masks = []
    for i in range(len(segments)):
        token_look = {attention.last_block.block_index: looks[i]} if attention is not None and i in looks else {}
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
