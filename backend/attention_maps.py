"""Per-mask attention maps from a captured global block: where a mask's own tokens look
(``mask_attention_map``), and a mask on SAM's token grid (``mask_to_token_grid``). Re-exported by
``sam_attention``, whose captures they read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if TYPE_CHECKING:
    from .sam_attention import EncoderBlockAttention


def mask_attention_map(
    block: EncoderBlockAttention, token_mask: np.ndarray, batch_index: int = 0
) -> np.ndarray:
    """Where the mask's own tokens look: mean of the attention rows of the tokens in ``token_mask``.

    ``token_mask`` is (H_tok, W_tok): boolean, or non-negative weights (e.g. the coverage fractions
    from ``mask_to_token_grid``) for a weighted mean. Returns an (H_tok, W_tok) float32 map summing
    to 1. A mask of the valid (unpadded) tokens gives attention received from the image proper.
    """
    return mask_attention_maps(block, np.asarray(token_mask)[None], batch_index)[0]


def mask_attention_maps(
    block: EncoderBlockAttention, token_masks: np.ndarray, batch_index: int = 0
) -> np.ndarray:
    """``mask_attention_map`` for several masks at once: (M, H_tok, W_tok) masks or weights -> (M, H_tok,
    W_tok) float32 maps, each summing to 1.

    The kept matrix is float16; the rows any mask selects are widened to float32 once, in chunks, for
    all the masks together (one pass over those rows, where a mask at a time read each row once per mask
    covering it: ~8 ms per mask at SAM's 4096 tokens).
    """
    if block.matrix is None:
        raise ValueError("this capture was made with keep_matrix=False; the attention matrix was not kept")
    token_masks = np.asarray(token_masks)
    if token_masks.ndim != 3:
        raise ValueError(f"token_masks must be (masks, *token grid {tuple(block.grid)}), got shape {token_masks.shape}")
    if token_masks.shape[1:] != tuple(block.grid):
        raise ValueError(f"token_mask shape {token_masks.shape[1:]} != token grid {tuple(block.grid)}")
    weights = token_masks.astype(np.float32).reshape(len(token_masks), -1)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("token_mask weights must be finite and non-negative")
    totals = weights.sum(axis=1, dtype=np.float64)
    if np.any(totals == 0):
        raise ValueError("token_mask selects no tokens")
    rows = np.flatnonzero(weights.any(axis=0))
    normalised = torch.from_numpy((weights[:, rows] / totals[:, None]).astype(np.float32))
    matrix = torch.from_numpy(block.matrix[batch_index])
    index = torch.from_numpy(rows)
    maps = torch.zeros(len(weights), matrix.shape[1], dtype=torch.float32)
    # Row chunks keep the float32 copy small even for masks covering the whole image; float32 products
    # (not numpy's float64 upcast): this runs for every global block of every explained image.
    with torch.inference_mode():
        for start in range(0, rows.size, 512):
            chunk = matrix.index_select(0, index[start : start + 512]).float()
            maps += normalised[:, start : start + 512] @ chunk
    return maps.numpy().reshape(len(weights), *block.grid)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def mask_to_token_grid(
    mask: np.ndarray, input_size: tuple[int, int], img_size: int = 1024, patch_size: int = 16
) -> np.ndarray:
    """Fraction of each token covered by an original-image mask: (img_size/patch,)*2 float32.

    The inverse of ``token_map_to_image``: resize to ``input_size``, pad bottom/right as SAM does,
    average over patches. Usable directly as ``mask_attention_map`` weights.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h_in, w_in = int(input_size[0]), int(input_size[1])
    grid = img_size // patch_size
    resized = cv2.resize(mask.astype(np.float32), (w_in, h_in), interpolation=cv2.INTER_AREA)
    padded = np.zeros((grid * patch_size, grid * patch_size), dtype=np.float32)
    padded[:h_in, :w_in] = resized.reshape(h_in, w_in)
    return padded.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))
