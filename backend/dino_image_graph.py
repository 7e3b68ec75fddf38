"""Grounding DINO's image half (Swin backbone, input projections, positional embeddings) as one module
that ``torch.export`` traces at a dynamic image height and width.

What ``GroundingDinoDetector.image_features`` computes for one image, with the same modules and the
same per-token arithmetic, written so that no shape is decided by a Python branch on a size:
groundingdino's Swin pads only ``if W % patch != 0`` / ``if pad_r > 0``, builds the shifted-window
mask by slice assignment on ``np.ceil(H / window)`` and recovers the batch with ``int(windows / (H *
W / ...))``, each of which fixes the size under export. Here the padding is always applied (a pad of 0
is a no-op), padded sizes are ceil-divisions (so every window view divides exactly), the mask's
regions come from ``arange`` comparisons, and tokens stay B x H x W x C (LayerNorm and Linear act on
the last axis). One image has no padding mask (``nested_tensor_from_tensor_list`` of one tensor is
all False at every level), so the graph takes the image alone. The windows' attention is laid out
for OpenVINO (``_window_attention``: one SDPA, fewer permutes), equal to the stock module's to float
rounding. ``dino_image_runtime`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_blocks import grid_to_windows, qkv_part, windows_to_grid

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

LEVELS = 4  # feature levels of both released Grounding DINOs (num_feature_levels)


@dataclass
class ImageLevels:
    """One image's projected features, per level (what ``DinoImageFeatures`` holds besides the size)."""

    srcs: list[torch.Tensor]  # 1 x 256 x h_l x w_l in the engine's dtype (float32, or bfloat16 under bf16)
    masks: list[torch.Tensor]  # 1 x h_l x w_l bool, True on padding (one image: all False)
    poss: list[torch.Tensor]  # 1 x 256 x h_l x w_l sine positional embedding


def unpadded_masks(srcs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The padding masks of one unbatched image: all False at every level (1 x h_l x w_l bool)."""
    return [torch.zeros(1, *src.shape[2:], dtype=torch.bool, device=src.device) for src in srcs]


class DinoImageGraph(nn.Module):
    """``forward(image 1 x 3 x H x W float32)`` -> (*srcs, *poss): LEVELS of each, 1 x 256 x h_l x w_l.

    The image is normalised and unpadded (``GroundingDinoDetector.preprocess``); on torch any H and W,
    exported for the sides ``dino_image_runtime`` bounds (levels of one token across specialise). Shares
    the model's parameters (no copy). Raises ValueError for a model this does not cover (not a Swin
    backbone with sine positions, absolute position embedding, dilation, or not LEVELS levels).
    """

    model: GroundingDINO

    def __init__(self, model: GroundingDINO) -> None:
        super().__init__()
        from groundingdino.models.GroundingDINO.backbone.position_encoding import PositionEmbeddingSineHW
        from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

        swin, positions = model.backbone[0], model.backbone[1]
        if not isinstance(swin, SwinTransformer) or not isinstance(positions, PositionEmbeddingSineHW):
            raise ValueError(f"only a Swin backbone with sine positions is covered, got {type(swin).__name__} "
                             f"with {type(positions).__name__}")
        if swin.ape or swin.dilation or int(model.num_feature_levels) != LEVELS:
            raise ValueError(f"only Swin without absolute position embedding or dilation, {LEVELS} levels, is "
                             f"covered (ape={swin.ape}, dilation={swin.dilation}, levels={model.num_feature_levels})")
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model: Any = self.model  # groundingdino's modules are untyped
        positions = model.backbone[1]
        features = _swin(model.backbone[0], image)
        srcs = [model.input_proj[level](feature) for level, feature in enumerate(features)]
        for level in range(len(srcs), LEVELS):  # extra levels: strided convolutions of the last map
            srcs.append(model.input_proj[level](features[-1] if level == len(features) else srcs[-1]))
        # Positions of the backbone levels are taken on the backbone's maps (Joiner), of the extra levels
        # on the projected ones: only their sizes matter, and those are the same.
        poss = [_sine_positions(positions, src) for src in srcs]
        return (*srcs, *poss)


def _sine_positions(positions: nn.Module, src: torch.Tensor) -> torch.Tensor:
    """groundingdino's PositionEmbeddingSineHW of an unpadded map (its own forward, mask all False)."""
    from groundingdino.util.misc import NestedTensor

    mask = torch.zeros(src.shape[0], src.shape[2], src.shape[3], dtype=torch.bool, device=src.device)
    return positions(NestedTensor(src, mask)).to(src.dtype)


def _ceil_div(size: Any, step: int) -> Any:
    return (size + step - 1) // step


def _swin(swin: Any, image: torch.Tensor) -> list[torch.Tensor]:
    """SwinTransformer.forward's output maps (out_indices, each B x C_i x H_i x W_i), in eval mode."""
    patch = swin.patch_embed
    ph, pw = patch.patch_size
    height, width = image.shape[2], image.shape[3]
    x = F.pad(image, (0, _ceil_div(width, pw) * pw - width, 0, _ceil_div(height, ph) * ph - height))
    x = patch.proj(x).permute(0, 2, 3, 1)  # B x H x W x C
    if patch.norm is not None:
        x = patch.norm(x)
    outs = []
    for i, layer in enumerate(swin.layers):
        for block in layer.blocks:
            x = _block(block, x)
        if i in swin.out_indices:
            outs.append(getattr(swin, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        if layer.downsample is not None:
            x = _patch_merging(layer.downsample, x)
    return outs


def _block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """SwinTransformerBlock.forward on B x H x W x C tokens (drop path and dropout: eval identities)."""
    batch, height, width, channels = x.shape
    size, shift = int(block.window_size), int(block.shift_size)
    rows, cols = _ceil_div(height, size), _ceil_div(width, size)  # windows down and across
    shortcut = x
    x = F.pad(block.norm1(x), (0, 0, 0, cols * size - width, 0, rows * size - height))
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    mask = _shift_mask(rows, cols, size, shift, x.device) if shift else None
    attended = _window_attention(block.attn, x, size, mask)
    if shift:
        attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
    # The projection acts per token: on the cropped map it has the same values, without the padding's rows.
    x = shortcut + block.attn.proj(_crop(attended, height, width))
    return x + block.mlp(block.norm2(x))


def _window_attention(attn: Any, x: torch.Tensor, size: int, mask: torch.Tensor | None) -> torch.Tensor:
    """WindowAttention.forward over every size x size window of x (B x H x W x C, H and W multiples of
    size; ``mask`` windows x size² x size² or None), before its output projection: B x H x W x C.

    Laid out for OpenVINO's CPU plugin (bench/README.md, "Fewer permutes in the OpenVINO
    graphs"): q, k and v come from three linears (slices of the qkv weight, constants in the graph)
    and each is permuted once from the map into windows and heads, where the stock module permuted
    into windows, then split heads and gathered q, k and v from one tensor; the window's output
    merges heads and windows in one permute; and the attention is one SDPA with the relative-position
    bias and the shift mask as its additive mask, which OpenVINO runs as one fused kernel (the stock
    q * scale @ k^T, add, softmax, @ v: the same terms, rounded in another order).
    """
    batch, height, width, _ = x.shape
    rows, cols, heads, n = height // size, width // size, attn.num_heads, size * size
    q, k, v = (grid_to_windows(qkv_part(attn, x, part), rows, cols, size, heads) for part in range(3))
    # heads x size² x size², from parameters only: a constant in the graph.
    additive = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    additive = additive[None]
    if mask is not None:  # windows x heads x size² x size², the same for every image of the batch
        additive = additive + mask[:, None]
        if batch > 1:
            additive = additive.repeat(batch, 1, 1, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive.to(q.dtype), scale=attn.scale)
    return windows_to_grid(out, batch, rows, cols, size)


def _crop(x: torch.Tensor, height: Any, width: Any) -> torch.Tensor:
    """``x[:, :height, :width]`` of B x H x W x C, as gathers: OpenVINO's converter can't read a slice
    whose end is a computed size (a rank-0 stop), but it reads ``arange`` of one."""
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    return x.index_select(1, rows).index_select(2, cols)


def _shift_mask(rows: Any, cols: Any, size: int, shift: int, device: torch.device) -> torch.Tensor:
    """BasicLayer.forward's mask for shifted windows (windows x size² x size², 0 or -100): tokens of
    the padded map are numbered by region (3 bands down x 3 across, split at -size and -shift), and
    a window's tokens see only their own region."""
    def bands(n: Any) -> torch.Tensor:
        index = torch.arange(n * size, device=device)
        return (index >= n * size - size).long() + (index >= n * size - shift).long()

    region = (bands(rows)[:, None] * 3 + bands(cols)[None, :]).float()
    region = region.view(rows, size, cols, size).permute(0, 2, 1, 3).reshape(-1, size * size)
    different = region[:, None, :] - region[:, :, None]
    return torch.where(different != 0, -100.0, 0.0)


def _patch_merging(merging: Any, x: torch.Tensor) -> torch.Tensor:
    """PatchMerging.forward on B x H x W x C: 2 x 2 neighbours concatenated (odd sides padded)."""
    height, width = x.shape[1], x.shape[2]
    x = F.pad(x, (0, 0, 0, _ceil_div(width, 2) * 2 - width, 0, _ceil_div(height, 2) * 2 - height))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return merging.reduction(merging.norm(x))
