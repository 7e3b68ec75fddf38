"""Inference-only speed-ups for a loaded Grounding DINO, same arithmetic up to float rounding.

* Activation checkpointing off: the SwinT-OGC config ships ``use_checkpoint`` and
  ``use_transformer_ckpt`` on (a training memory saver); at inference each layer then still goes
  through a reentrant autograd.Function.
* Multi-scale deformable attention without groundingdino's CUDA extension: its pure-PyTorch path
  grid-samples every level into one (heads, C, queries, levels * points) tensor (~330 MB per
  encoder layer at 800 px), then weights and sums it; here the bilinear corners and attention
  weights of each (query, head) are one weighted ``embedding_bag`` gather (2.7x faster per layer).
  The grid_sample form stays for OpenVINO (``grid_sample_attention``, see there why).

Both act on one model instance (each attention module's class is swapped for a subclass), so
another Grounding DINO in the same process (bench/'s reference chain) is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from groundingdino.models.GroundingDINO.ms_deform_attn import MultiScaleDeformableAttention
from torch import nn


def use_fast_inference(model: nn.Module) -> int:
    """Apply both speed-ups to ``model`` in place (idempotent); returns the attention modules patched."""
    for module in model.modules():
        for flag in ("use_checkpoint", "use_transformer_ckpt"):
            if isinstance(getattr(module, flag, None), bool):
                setattr(module, flag, False)
    patched = 0
    for module in model.modules():
        if type(module) is MultiScaleDeformableAttention:
            module.__class__ = FastDeformableAttention
        patched += isinstance(module, FastDeformableAttention)
    return patched


def deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor | list[tuple[int, int]],
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """groundingdino's multi_scale_deformable_attn_pytorch as one weighted gather.

    Each sample is grid_sample's bilinear interpolation (align_corners=False, zeros padding): four
    corners of one level's value map, weighted by the bilinear and attention weights. All corners of
    all levels and points of one (query, head) are one bag of ``F.embedding_bag(mode="sum")``, so
    nothing of size (heads, C, queries, points) is materialised per level.

    value (bs, keys, heads, C); spatial_shapes (levels, 2) int64 (h, w) of each level (or a list of
    them); sampling_locations (bs, queries, heads, levels, points, 2) in [0, 1]; attention_weights
    (bs, queries, heads, levels, points). Returns (bs, queries, heads * C).

    The level sizes are only read as tensor values (never as Python ints), so ``torch.export`` traces
    this with the feature map sizes symbolic (``backend/dino_graph.py``).
    """
    bs, keys, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    device, dtype = sampling_locations.device, sampling_locations.dtype
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=device)
    heights, widths = shapes[:, 0:1], shapes[:, 1:2]  # levels, 1
    sizes = heights * widths
    starts = torch.cat([torch.zeros_like(sizes[:1]), sizes[:-1]]).cumsum(0)
    # grid_sample's unnormalisation, written as it computes it (same rounding of the sample points).
    grid = 2 * sampling_locations - 1
    x = ((grid[..., 0] + 1) * widths.to(dtype) - 1) / 2  # bs, queries, heads, levels, points
    y = ((grid[..., 1] + 1) * heights.to(dtype) - 1) / 2
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    # Bilinear weights of the (left, right) and (top, bottom) corners; zero outside the map.
    wx = torch.stack([(1 - fx) * ((x0 >= 0) & (x0 < widths)), fx * ((x0 >= -1) & (x0 < widths - 1))], -1)
    wy = torch.stack([(1 - fy) * ((y0 >= 0) & (y0 < heights)), fy * ((y0 >= -1) & (y0 < heights - 1))], -1)
    weights = wy[..., :, None] * wx[..., None, :] * attention_weights[..., None, None]  # (..., 2, 2)
    # Row-major index of the top-left corner; the others are +1, +width, +width+1. Corners outside
    # the map have weight 0, so clamping only keeps their index valid.
    corner_offsets = (torch.stack([torch.zeros_like(widths), widths], -1)[..., :, None]
                      + torch.arange(2, device=device))  # levels, 1, 2, 2
    index = (starts + y0 * widths + x0)[..., None, None] + corner_offsets
    index = index.clamp_(0, keys - 1).mul_(heads).add_(torch.arange(heads, device=device).view(heads, 1, 1, 1, 1))
    if bs > 1:
        index += (torch.arange(bs, device=device) * (keys * heads)).view(bs, 1, 1, 1, 1, 1, 1)
    per_bag = levels * points * 4
    out = F.embedding_bag(index.view(-1, per_bag), value.reshape(-1, channels), mode="sum",
                          per_sample_weights=weights.reshape(-1, per_bag).to(value.dtype))
    return out.view(bs, queries, heads * channels)


def grid_sample_attention(value: torch.Tensor, sizes: Sequence[tuple[int, int]],
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """groundingdino's multi_scale_deformable_attn_pytorch (one ``grid_sample`` per level), for export.

    OpenVINO's CPU plugin compiles ``embedding_bag`` only with a static number of bags, and the
    encoder's bags follow the image's token count; its GridSample takes any size. The points lie on
    the grid's row axis and the queries along its columns, so each level samples into (heads, C,
    points, queries) and its weighted sum over points adds rows of contiguous queries; levels are
    summed as they come. groundingdino's layout (queries, points innermost) reduces 16 scattered
    values per output and concatenates the levels first: on OpenVINO bf16 at 800x1066 this form
    takes 0.7x its time (bench/README.md). Same products, summed in another order (f32 rounding).
    ``sizes``: each level's (h, w), symbolic under export. Shapes as ``deformable_attention``.
    """
    bs, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in sizes], dim=1)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5)  # bs, heads, levels, points, queries, 2
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(bs * heads, 1, levels, points, queries)
    out = None
    for level, (h, w) in enumerate(sizes):
        level_value = values[level].flatten(2).transpose(1, 2).reshape(bs * heads, channels, h, w)
        sampled = F.grid_sample(level_value, grids[:, :, level].flatten(0, 1), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # bs * heads, C, points, queries
        summed = (sampled * weights[:, :, level]).sum(2)
        out = summed if out is None else out + summed
    assert out is not None  # levels >= 1
    return out.view(bs, heads * channels, queries).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class LevelShapes:
    """The feature levels' sizes as both forms the deformable attention can use, and which core to run.

    ``backend/dino_graph.py`` passes this where groundingdino passes its ``spatial_shapes`` tensor.
    """

    sizes: tuple[tuple[int, int], ...]  # (h, w) per level: ints, or symbolic ints under torch.export
    tensor: torch.Tensor  # levels x 2 int64, the same sizes as values
    grid_sample: bool  # True: ``grid_sample_attention`` (exportable to OpenVINO); False: ``deformable_attention``


class FastDeformableAttention(MultiScaleDeformableAttention):
    """MultiScaleDeformableAttention.forward with ``deformable_attention`` as its core.

    ``spatial_shapes`` is groundingdino's (levels x 2) tensor or a ``LevelShapes``.
    """

    def forward(self, query, key=None, value=None, query_pos=None, key_padding_mask=None,
                reference_points=None, spatial_shapes=None, level_start_index=None, **kwargs):
        if value is None:
            value = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        _, num_value, _ = value.shape
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], float(0))
        value = value.view(bs, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        weights = weights.view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        levels = spatial_shapes if isinstance(spatial_shapes, LevelShapes) else None
        if levels is not None:
            spatial_shapes = levels.tensor
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
        if levels is not None and levels.grid_sample:
            sampled = grid_sample_attention(value, levels.sizes, locations, weights)
        else:
            sampled = deformable_attention(value, spatial_shapes, locations, weights)
        output = self.output_proj(sampled)
        return output if self.batch_first else output.permute(1, 0, 2)
