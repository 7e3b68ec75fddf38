"""The deformable attention that OpenVINO runs (``dino_fast.grid_sample_attention``, exported inside
``DinoTextGraph(for_export=True)``) computes groundingdino's multi_scale_deformable_attn_pytorch:
in torch float64 up to summation order, and as a converted OpenVINO f32 graph at dynamic sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groundingdino.models.GroundingDINO.ms_deform_attn import multi_scale_deformable_attn_pytorch

from backend.dino_fast import grid_sample_attention

HEADS, CHANNELS, POINTS = 4, 8, 4
# Several level sets: odd sizes, a one-pixel-wide level, a level of 1 x 1, non-square both ways.
LEVEL_SETS = [
    [(20, 27), (10, 14), (5, 7), (3, 4)],
    [(9, 31), (5, 16), (3, 8), (2, 4)],
    [(17, 6), (1, 3), (4, 1), (1, 1)],
]


def attention_inputs(shapes: list[tuple[int, int]], queries: int, seed: int,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value (1, keys, heads, C) with each level's right and bottom quarter zeroed (padding, as the
    key padding mask leaves it), locations (1, Q, heads, levels, points, 2) spread over [-0.3, 1.3]
    with some exactly on the map's edges and pixel borders, softmaxed weights (1, Q, heads, levels, points)."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for h, w in shapes:
        level = torch.randn(1, h, w, HEADS, CHANNELS, generator=generator, dtype=dtype)
        level[:, h - h // 4:] = 0
        level[:, :, w - w // 4:] = 0
        maps.append(level.flatten(1, 2))
    value = torch.cat(maps, 1)
    levels = len(shapes)
    locations = torch.rand(1, queries, HEADS, levels, POINTS, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    # Exact edges: 0 and 1 (half a pixel outside the outer pixel centres), the outer centres themselves,
    # and whole-pixel borders k / w, where bilinear weights are exactly 0 and 1.
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dtype)  # levels, 2 (x, y)
    edges = [torch.zeros_like(sizes), torch.ones_like(sizes), 0.5 / sizes, 1 - 0.5 / sizes, 1 / sizes,
             (sizes - 1) / sizes, -0.5 / sizes, 1 + 0.5 / sizes]
    for i, edge in enumerate(edges):
        locations[:, i, :, :, i % POINTS] = edge
    weights = torch.rand(1, queries, HEADS, levels, POINTS, generator=generator, dtype=dtype)
    weights = weights.flatten(-2).softmax(-1).view_as(weights)
    return value, locations, weights


@pytest.mark.parametrize("shapes", LEVEL_SETS)
def test_grid_sample_attention_is_groundingdino_in_float64(shapes):
    value, locations, weights = attention_inputs(shapes, queries=120, seed=len(shapes[0]) + shapes[0][1])
    expected = multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), locations, weights)
    ours = grid_sample_attention(value, shapes, locations, weights)
    assert ours.shape == expected.shape == (1, 120, HEADS * CHANNELS)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)


class _Attention(torch.nn.Module):
    """grid_sample_attention with the level sizes read from four (h, w) tensors, as the graph reads them
    from the feature maps' shapes: symbolic under export."""

    def forward(self, value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor, level0: torch.Tensor,
                level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        sizes = [(level.shape[0], level.shape[1]) for level in (level0, level1, level2, level3)]
        return grid_sample_attention(value, sizes, locations, weights)


def test_grid_sample_attention_on_openvino_is_groundingdino_at_every_size():
    """One conversion with dynamic level sizes and query count; run at sizes it was not traced at."""
    ov = pytest.importorskip("openvino")
    from torch.export import Dim

    traced = [(24, 37), (12, 19), (6, 10), (3, 5)]
    example = (*attention_inputs(traced, queries=33, seed=0, dtype=torch.float32),
               *(torch.zeros(h, w) for h, w in traced))
    queries = Dim("queries", min=2, max=100_000)
    sides = [(Dim(f"h{i}", min=1, max=1024), Dim(f"w{i}", min=1, max=1024)) for i in range(len(traced))]
    dynamic = ({1: Dim.AUTO}, {1: queries}, {1: queries}, *({0: h, 1: w} for h, w in sides))
    with torch.no_grad():
        exported = torch.export.export(_Attention(), example, dynamic_shapes=dynamic)
    compiled = ov.Core().compile_model(ov.convert_model(exported), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for seed, shapes in enumerate(LEVEL_SETS):
        value, locations, weights = attention_inputs(shapes, queries=150 + seed, seed=10 + seed)
        expected = multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), locations, weights)
        arrays = [t.float().numpy() for t in (value, locations, weights)] + [np.zeros(s, np.float32) for s in shapes]
        ours = torch.from_numpy(np.asarray(compiled(arrays)[0])).double()
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)
