"""Inference-only speed-ups for a loaded Grounding DINO, same arithmetic up to float rounding.

* Activation checkpointing off: the SwinT-OGC config ships ``use_checkpoint`` and
  ``use_transformer_ckpt`` on (a training memory saver); at inference each layer then still goes
  through a reentrant autograd.Function.
* Multi-scale deformable attention on CPU: groundingdino's pure-PyTorch path stacks every level's
  samples into one (heads, C, queries, levels * points) tensor (~330 MB per encoder layer at
  800 px) before weighting them; here each level is weighted and summed as it is sampled.

Both act on one model instance (each attention module's class is swapped for a subclass), so
another Grounding DINO in the same process (bench/'s reference chain) is untouched.
"""

from __future__ import annotations

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


def deformable_attention(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """groundingdino's multi_scale_deformable_attn_pytorch, accumulated level by level.

    value (bs, keys, heads, C); sampling_locations (bs, queries, heads, levels, points, 2) in [0, 1];
    attention_weights (bs, queries, heads, levels, points). Returns (bs, queries, heads * C).
    """
    bs, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(bs * heads, 1, queries, levels, points)
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        v = values[level].flatten(2).transpose(1, 2).reshape(bs * heads, channels, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        contribution = (sampled * weights[:, :, :, level]).sum(-1)  # bs*heads, C, queries
        out = contribution if out is None else out.add_(contribution)
    assert out is not None
    return out.view(bs, heads * channels, queries).transpose(1, 2).contiguous()


class FastDeformableAttention(MultiScaleDeformableAttention):
    """MultiScaleDeformableAttention.forward with ``deformable_attention`` as its core."""

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
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        output = self.output_proj(deformable_attention(value, shapes, locations, weights))
        return output if self.batch_first else output.permute(1, 0, 2)
