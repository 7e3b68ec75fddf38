"""Attention maps drawn over the photo, and their wire form: numpy, OpenCV and PIL only (no torch), so the
backend and the explain UI (a separate process that never loads a model) draw them with one code.

A map is SAM's token grid (64 x 64 for a 1024 input). ``token_map_to_image`` lays it over the photo the
way SAM laid the photo over the grid (resize to the long side, pad bottom/right); ``render_explanation``
colours every map of an ``Explanation`` and blends it over the photo. The HTTP API sends the grids, not
pictures (``token_map_png``: 8-bit grayscale PNG, a few KB each), and the page renders them here.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from .api_schema import LegendJson
from .images import working_size
from .types import Explanation

COLORMAP = "jet"  # heatmap colours; the legend names it for the UI
LEGEND = LegendJson(
    colormap=COLORMAP,
    low="blue: little attention",
    high="red: most attention (each map scaled to its own min..max)",
    notes=[
        "Encoder 'attention received': for a global-attention block of SAM's image encoder, the true "
        "softmax attention (q.k + relative position), averaged over heads and over every image token "
        "that looks: red places are the ones the whole image attends to.",
        "Encoder 'where the mask looks': the same attention rows, averaged over the tokens inside the "
        "mask only: what the mask's own region attended to in the last global block.",
        "Decoder map: SAM's mask decoder, final token-to-image attention of the mask token that "
        "produced this mask: where the decoder looked when it drew it.",
        "Label grounding: Grounding DINO's score of each prompt word for this box (sigmoid of the "
        "token logit); the label is the requested phrase whose words scored highest.",
    ],
)

# What an explanation is drawn at. Maps hold 64 x 64 tokens, so more pixels add bytes, not detail.
WORKING_SIDE = 1024  # long side of the masks an explanation sends
# Long side of every drawn map (4 px a token of a 1024 input): the page draws a dozen or more maps
# per explanation and Gradio encodes each (~0.2 s a megapixel), so bigger costs time, not detail.
MAP_SIDE = 256
MASK_MAPS = 16  # masks (best first) whose maps are sent and drawn; the rest keep their scores only
DEFAULT_ALPHA = 0.5  # heatmap opacity over the photo


# -- geometry ------------------------------------------------------------------------------------------
def normalize_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (float32); a constant map becomes zeros."""
    m = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if m.size == 0:
        return m
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def valid_tokens(input_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """Token rows and columns that saw real pixels (the rest is SAM's bottom/right padding)."""
    # A partial token (the resized side not a multiple of the patch) still saw real pixels: keep it.
    return math.ceil(input_size[0] / patch), math.ceil(input_size[1] / patch)


def token_map_to_image(
    token_map: np.ndarray,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int = 1024,
    normalize: bool = True,
) -> np.ndarray:
    """Lay a token-grid map over the original image: (H, W) float32.

    SAM resized the image so its long side is ``img_size`` (giving ``input_size``) and padded the
    bottom/right to a square. The map is cropped to the tokens that saw real pixels, upsampled to
    their pixel extent (token centres on patch centres), cropped exactly to ``input_size`` and
    resized to ``original_size``. ``normalize`` min-max scales the result to [0, 1].
    """
    token_map = np.asarray(token_map, dtype=np.float32)
    if token_map.ndim != 2:
        raise ValueError(f"token_map must be 2-D (h_tok, w_tok), got shape {token_map.shape}")
    h_tok, w_tok = token_map.shape
    patch = img_size // h_tok
    if patch * h_tok != img_size or patch * w_tok != img_size:
        raise ValueError(f"token grid {token_map.shape} does not tile a {img_size} x {img_size} input")
    h_in, w_in = int(input_size[0]), int(input_size[1])
    height, width = int(original_size[0]), int(original_size[1])
    if not (0 < h_in <= img_size and 0 < w_in <= img_size) or height <= 0 or width <= 0:
        raise ValueError(f"bad sizes: input_size={input_size}, original_size={original_size}")
    th, tw = valid_tokens((h_in, w_in), patch)
    valid = np.ascontiguousarray(token_map[:th, :tw])
    # cv2 sizes are (width, height). INTER_LINEAR maps pixel centres, so token i's value sits at the
    # centre of its patch, pixels [i*patch, (i+1)*patch).
    resized = cv2.resize(valid, (tw * patch, th * patch), interpolation=cv2.INTER_LINEAR)[:h_in, :w_in]
    shrink = height < h_in or width < w_in
    out = cv2.resize(
        np.ascontiguousarray(resized),
        (width, height),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )
    out = out.reshape(height, width).astype(np.float32, copy=False)
    return normalize_map(out) if normalize else out


def colorize(heatmap: np.ndarray, cmap: str = COLORMAP) -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 RGB with an OpenCV colormap ("jet", "turbo", ...)."""
    m = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    return _colormap_rgb(cmap)[np.round(m * 255).astype(np.uint8)]


@functools.cache
def _colormap_rgb(cmap: str) -> np.ndarray:
    """OpenCV's colormap as a 256 x 3 RGB table: indexing it is the same as ``cv2.applyColorMap`` and
    several times faster on a busy machine (the page colours a dozen maps per explanation)."""
    code = getattr(cv2, f"COLORMAP_{cmap.upper()}", None)
    if code is None:
        raise ValueError(f"unknown colormap {cmap!r}")
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), code)
    table = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(256, 3)  # applyColorMap gives BGR
    table.setflags(write=False)
    return table


def overlay(image_rgb: np.ndarray, heatmap_rgb: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Blend a colorized heatmap over an RGB image: (1 - alpha) * image + alpha * heatmap, uint8."""
    if image_rgb.shape != heatmap_rgb.shape or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"need two (H, W, 3) arrays of one shape, got {image_rgb.shape} and {heatmap_rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blend = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * heatmap_rgb.astype(np.float32)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def at_working_size(image_rgb: np.ndarray, max_side: int = WORKING_SIDE) -> np.ndarray:
    """``image_rgb`` shrunk to ``working_size`` (area averaging), or itself when already small."""
    height, width = working_size(image_rgb.shape[:2], max_side)
    if (height, width) == image_rgb.shape[:2]:
        return image_rgb
    return cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)


# -- wire form -------------------------------------------------------------------------------------------
def token_map_png(token_map: np.ndarray, input_size: tuple[int, int], img_size: int) -> str:
    """A token-grid map as base64 8-bit grayscale PNG, min-max scaled over the tokens that saw the
    photo (padding tokens are clipped: ``token_map_to_image`` never shows them). The page scales
    every map to its own min..max, so 256 levels lose nothing it draws.

    Arguments:
        token_map: (h_tok, w_tok) float map tiling SAM's ``img_size`` square input.
        input_size: (H, W) of the photo as SAM saw it, before padding.
        img_size: SAM's square input side.
    Returns:
        base64 text (no ``data:`` prefix) of an h_tok x w_tok PNG.
    """
    grid = np.nan_to_num(np.asarray(token_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"token_map must be a non-empty 2-D grid, got shape {grid.shape}")
    th, tw = valid_tokens(input_size, img_size // grid.shape[0])
    valid = grid[:th, :tw]
    lo, hi = float(valid.min()), float(valid.max())
    scaled = np.zeros_like(grid) if hi <= lo else np.clip((grid - lo) / (hi - lo), 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def token_map_from_png(data: str) -> np.ndarray:
    """``token_map_png``'s text -> (h_tok, w_tok) float32 in [0, 1]; ValueError when it isn't one."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            if image.mode != "L":
                raise ValueError(f"a token map must be an 8-bit grayscale PNG, got mode {image.mode}")
            return np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a token map PNG ({exc})") from exc


# -- drawing ---------------------------------------------------------------------------------------------
@dataclass
class HeatmapImage:
    """One map over the image: the heatmap alone and blended over the photo (all RGB, one size)."""

    title: str
    heatmap: np.ndarray
    overlay: np.ndarray


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
                  alpha: float = DEFAULT_ALPHA) -> HeatmapImage:
    """A token-grid map cropped to the valid region, resized to ``image_rgb`` (the image or a scaled
    copy of it), coloured in RGB."""
    values = token_map_to_image(token_map, explanation.input_size, image_rgb.shape[:2], explanation.img_size)
    colored = colorize(values, COLORMAP)
    return HeatmapImage(title, colored, overlay(image_rgb, colored, alpha))


def render_explanation(explanation: Explanation, image_rgb: np.ndarray, encoder_side: int = MAP_SIDE,
                       mask_side: int = MAP_SIDE, mask_maps: int = MASK_MAPS,
                       alpha: float = DEFAULT_ALPHA) -> RenderedExplanation:
    """The maps of ``explanation`` as RGB images over ``image_rgb``.

    Arguments:
        explanation: token-grid maps (``Engine.explain``, or rebuilt from the HTTP API's JSON).
        image_rgb: the photo (H, W, 3) uint8, or a copy scaled to the same aspect ratio.
        encoder_side, mask_side: longest side of the encoder's / each mask's images, in pixels.
        mask_maps: draw maps for the first this many segments (a segment whose decoder map is None,
            one the backend sent no maps for, gets none either).
        alpha: heatmap opacity in the overlays.
    Returns:
        A ``RenderedExplanation``: per global block and per segment, heatmap and overlay at the photo's
        aspect (at most the photo's own size).
    Raises:
        ValueError: ``image_rgb`` is not the photo the explanation was made for (another aspect).
    """
    original = (int(explanation.original_size[0]), int(explanation.original_size[1]))
    if image_rgb.shape[:2] != original and working_size(original, max(image_rgb.shape[:2])) != image_rgb.shape[:2]:
        raise ValueError(f"image is {image_rgb.shape[:2]}, the explanation was made for {explanation.original_size}")
    encoder_rgb, mask_rgb = at_working_size(image_rgb, encoder_side), at_working_size(image_rgb, mask_side)
    rendered = RenderedExplanation()
    last = max(explanation.encoder_received, default=None)
    for block, token_map in sorted(explanation.encoder_received.items()):
        title = f"block {block} (global{', last layer' if block == last else ''})"
        rendered.encoder.append((block, heatmap_image(title, token_map, explanation, encoder_rgb, alpha)))
    for i, (segment, mask) in enumerate(zip(explanation.segments, explanation.masks, strict=True)):
        drawn = i < mask_maps and mask.decoder_map is not None
        decoder = None
        if drawn and mask.decoder_map is not None:
            decoder = heatmap_image(f"{segment.label} {segment.score:.2f}: decoder", mask.decoder_map, explanation,
                                    mask_rgb, alpha)
        rendered.masks.append(MaskMaps(
            index=i,
            label=segment.label,
            score=segment.score,
            decoder=decoder,
            token_look=[(b, heatmap_image(f"{segment.label}: block {b} mask tokens look", m, explanation, mask_rgb,
                                          alpha))
                        for b, m in sorted(mask.token_look.items())] if drawn else [],
            grounding=list(segment.token_scores),
            phrase_scores=dict(segment.phrase_scores),
        ))
    return rendered
