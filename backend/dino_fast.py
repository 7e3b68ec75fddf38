"""Inference-only speed-ups for a loaded Grounding DINO, same arithmetic up to float rounding.

* Activation checkpointing off: the SwinT-OGC config ships ``use_checkpoint`` and
  ``use_transformer_ckpt`` on (a training memory saver); at inference each layer then still goes
  through a reentrant autograd.Function.
* Multi-scale deformable attention without groundingdino's CUDA extension: its pure-PyTorch path
  grid-samples every level into one (heads, C, queries, levels * points) tensor (~330 MB per
  encoder layer at 800 px), then weights and sums it; here the bilinear corners and attention
  weights of each (query, head) are one weighted ``embedding_bag`` gather (2.7x faster per layer).
  For OpenVINO the attention is exported either as one custom operation
  (``fused_deformable_attention``: a C++ kernel, ``backend/openvino_ops.py``) or, where that library
  can't be built, in grid_sample form (``grid_sample_attention``, see there why), with the value maps
  and sampling grids laid out for it (``level_maps``, ``sampling_grids``).

Both act on one model instance (each attention module's class is swapped for a subclass), so
another Grounding DINO in the same process (bench/'s reference chain) is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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


def level_maps(value: torch.Tensor, sizes: Sequence[tuple[int, int]], heads: int) -> list[torch.Tensor]:
    """The projected value tokens as each level's maps in grid_sample's layout.

    value (bs, keys, heads * C), keys in row-major order level by level; returns per level
    (bs * heads, C, h, w). Each level is split off in token order and permuted on its own (h, w,
    heads, C -> heads, C, h, w), right where OpenVINO widens it to f32 for GridSample: on OpenVINO
    bf16 this is cheaper than transposing the whole value first (bench/README.md).
    """
    bs, _, dim = value.shape
    maps = []
    for level_value, (h, w) in zip(value.split([h * w for h, w in sizes], dim=1), sizes, strict=True):
        level = level_value.view(bs, h, w, heads, dim // heads).permute(0, 3, 4, 1, 2)
        maps.append(level.reshape(bs * heads, dim // heads, h, w))
    return maps


def sampling_grids(offsets: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: torch.Tensor,
                   points: int) -> torch.Tensor:
    """groundingdino's sampling locations, already as grid_sample's grid (2 * location - 1).

    offsets (bs, Q, heads, levels * points * 2): the sampling_offsets projection, channels
    (levels, points, xy) per head; reference_points (bs, Q, levels, 2) points or (bs, Q, levels, 4)
    boxes (cx, cy, w, h), normalised; spatial_shapes (levels, 2) int64 (h, w). Returns
    (bs * heads, levels, points, Q, 2).

    groundingdino computes location = ref + offset / (w, h) (or ref_xy + offset / points * ref_wh * 0.5
    for boxes); here 2 * location - 1 is written as offset * scale + base with scale = 2 / (w, h)
    (or ref_wh / points) and base = 2 * ref - 1, both broadcast along the projection's own layout
    (the offsets are touched once, before the one transpose that puts the queries innermost). Same
    arithmetic up to float rounding.
    """
    bs, queries, heads, _ = offsets.shape
    levels = spatial_shapes.shape[0]
    dtype = offsets.dtype

    def per_point(t: torch.Tensor) -> torch.Tensor:  # (bs, Q, levels, 2) -> (bs, Q, 1, levels * points * 2)
        return t[:, :, None, :, None, :].expand(-1, -1, -1, -1, points, -1).flatten(3)

    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(dtype)  # levels, 2
        scale = (2 / normalizer)[:, None, :].expand(-1, points, -1).flatten()
        base = per_point(2 * reference_points - 1)
    elif reference_points.shape[-1] == 4:
        scale = per_point(reference_points[..., 2:] / points)
        base = per_point(2 * reference_points[..., :2] - 1)
    else:
        raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
    grids = (offsets * scale + base).view(bs, queries, heads, levels, points, 2)
    return grids.permute(0, 2, 3, 4, 1, 5).flatten(0, 1)


def sampling_locations(offsets: torch.Tensor, reference_points: torch.Tensor,
                       spatial_shapes: torch.Tensor) -> torch.Tensor:
    """groundingdino's sampling locations, as MultiScaleDeformableAttention.forward computes them.

    offsets (bs, Q, heads, levels, points, 2); reference_points (bs, Q, levels, 2) points or
    (bs, Q, levels, 4) boxes (cx, cy, w, h), normalised; spatial_shapes (levels, 2) (h, w). Returns
    (bs, Q, heads, levels, points, 2) in [0, 1] where inside the map.
    """
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        points = offsets.shape[4]
        return (reference_points[:, :, None, :, None, :2]
                + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
    raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")


def grid_sample_attention(maps: Sequence[torch.Tensor], grids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """groundingdino's multi_scale_deformable_attn_pytorch (one ``grid_sample`` per level), for export.

    OpenVINO's CPU plugin compiles ``embedding_bag`` only with a static number of bags, and the
    encoder's bags follow the image's token count; its GridSample takes any size. The points lie on
    the grid's row axis and the queries along its columns, so each level samples into (bs * heads, C,
    points, queries) and its weighted sum over points adds rows of contiguous queries; levels are
    summed as they come. groundingdino's layout (queries, points innermost) reduces 16 scattered
    values per output and concatenates the levels first (slower on OpenVINO, bench/README.md). Same
    products, summed in another order (float rounding).

    maps: per level (bs * heads, C, h, w) (``level_maps``); grids (bs * heads, levels, points, Q, 2)
    (``sampling_grids``); weights (bs * heads, 1, levels, points, Q), the softmaxed attention weights.
    Returns (bs * heads, C, Q).
    """
    out = None
    for level, level_map in enumerate(maps):
        sampled = F.grid_sample(level_map, grids[:, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # bs * heads, C, points, Q
        summed = (sampled * weights[:, :, level]).sum(2)
        out = summed if out is None else out + summed
    assert out is not None  # levels >= 1
    return out


@torch.library.custom_op("gsam::deformable_attention", mutates_args=())
def fused_deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor, reference_points: torch.Tensor,
                               offsets: torch.Tensor, weights: torch.Tensor, heads: int, points: int,
                               padding: torch.Tensor, softmax: bool) -> torch.Tensor:
    """MultiScaleDeformableAttention's core from its projections, as one operation (``gsam::deformable_attention``).

    Exported as one node, which ``openvino_ops`` converts to its C++ kernel for OpenVINO
    (``backend/csrc/deformable_attention.cpp``: the bilinear samples accumulated per output, nothing of
    the sampled size materialised). On torch it runs groundingdino's arithmetic (``sampling_locations``,
    then ``deformable_attention``'s gather), the reference the kernel is tested against.

    Arguments:
      value: (bs, keys, heads * C), the value projection, levels one after another, row-major.
      spatial_shapes: (levels, 2) int64, each level's (h, w); their h * w sum to keys.
      reference_points: (bs, Q, levels, 2) points or (bs, Q, levels, 4) boxes (cx, cy, w, h), normalised.
      offsets: (bs, Q, heads * levels * points * 2), the sampling_offsets projection.
      weights: (bs, Q, heads * levels * points), the softmaxed attention weights (``softmax``: their logits).
      heads, points: the module's num_heads and num_points.
      padding: (bs, keys) bool, True on padding tokens: their values are read as zeros.
      softmax: ``weights`` are the attention_weights projection, softmaxed per (query, head) here (in the
        kernel: in registers, no Softmax node's pass over them).
    Returns:
      (bs, Q, heads * C).
    """
    bs, keys, dim = value.shape
    queries, levels = offsets.shape[1], spatial_shapes.shape[0]
    value = value.masked_fill(padding[..., None], 0.0)
    if softmax:
        weights = weights.view(bs, queries, heads, -1).softmax(-1).view(bs, queries, -1)
    locations = sampling_locations(offsets.view(bs, queries, heads, levels, points, 2), reference_points,
                                   spatial_shapes)
    return deformable_attention(value.view(bs, keys, heads, dim // heads), spatial_shapes, locations,
                                weights.view(bs, queries, heads, levels, points))


@fused_deformable_attention.register_fake
def _fused_deformable_attention_shape(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                      reference_points: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
                                      heads: int, points: int, padding: torch.Tensor, softmax: bool) -> torch.Tensor:
    return value.new_empty(value.shape[0], offsets.shape[1], value.shape[2])


# How FastDeformableAttention samples: "gather" (torch: deformable_attention's embedding_bag), "grid_sample"
# (exportable, OpenVINO's GridSample), "fused" (exportable as the one gsam::deformable_attention node).
DeformableCore = Literal["gather", "grid_sample", "fused"]


@dataclass(frozen=True)
class LevelShapes:
    """The feature levels' sizes as both forms the deformable attention can use, and which core to run.

    ``backend/dino_graph.py`` passes this where groundingdino passes its ``spatial_shapes`` tensor.
    """

    sizes: tuple[tuple[int, int], ...]  # (h, w) per level: ints, or symbolic ints under torch.export
    tensor: torch.Tensor  # levels x 2 int64, the same sizes as values
    core: DeformableCore  # how the attention samples (``DeformableCore``)


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
        offsets = self.sampling_offsets(query)
        logits = self.attention_weights(query)
        levels = spatial_shapes if isinstance(spatial_shapes, LevelShapes) else None
        if levels is not None and levels.core == "fused":  # the node masks the value and softmaxes the weights
            padding = (key_padding_mask if key_padding_mask is not None
                       else torch.zeros(bs, num_value, dtype=torch.bool, device=value.device))
            sampled = fused_deformable_attention(value, levels.tensor, reference_points, offsets, logits,
                                                 self.num_heads, self.num_points, padding, True)
            output = self.output_proj(sampled)
            return output if self.batch_first else output.permute(1, 0, 2)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], float(0))
        weights = logits.view(bs, num_query, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        if levels is not None and levels.core == "grid_sample":
            sampled = grid_sample_attention(
                level_maps(value, levels.sizes, self.num_heads),
                sampling_grids(offsets.view(bs, num_query, self.num_heads, -1), reference_points, levels.tensor,
                               self.num_points),
                weights.permute(0, 2, 3, 1).reshape(bs * self.num_heads, 1, self.num_levels, self.num_points,
                                                    num_query))
            output = self.output_proj(sampled.view(bs, -1, num_query).transpose(1, 2))
            return output if self.batch_first else output.permute(1, 0, 2)
        if levels is not None:
            spatial_shapes = levels.tensor
        offsets = offsets.view(bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = weights.view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        locations = sampling_locations(offsets, reference_points, spatial_shapes)
        sampled = deformable_attention(value.view(bs, num_value, self.num_heads, -1), spatial_shapes, locations,
                                       weights)
        output = self.output_proj(sampled)
        return output if self.batch_first else output.permute(1, 0, 2)
