"""The deformable attention that OpenVINO runs (``FastDeformableAttention`` given ``LevelShapes``, as
``DinoTextGraph`` exports it: core "fused", one ``gsam::deformable_attention`` node that becomes the
operations library's C++ kernel, or core "grid_sample", ``dino_fast.level_maps``, ``sampling_grids``
and ``grid_sample_attention``) computes groundingdino's MultiScaleDeformableAttention (its
multi_scale_deformable_attn_pytorch core): in torch float64 up to float rounding, and as a converted
OpenVINO f32 graph at dynamic sizes. Both reference-point forms (encoder points, decoder boxes),
padded maps, and samples exactly on pixel borders, on the map's edges and outside it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from groundingdino.models.GroundingDINO.ms_deform_attn import MultiScaleDeformableAttention

from backend.dino_fast import FastDeformableAttention, LevelShapes

EXPORTED_CORES = ["fused", "grid_sample"]

HEADS, CHANNELS, POINTS = 4, 8, 4
# Several level sets: odd sizes, a one-pixel-wide level, a level of 1 x 1, non-square both ways.
LEVEL_SETS = [
    [(20, 27), (10, 14), (5, 7), (3, 4)],
    [(9, 31), (5, 16), (3, 8), (2, 4)],
    [(17, 6), (1, 3), (4, 1), (1, 1)],
]


def attention_pair(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """groundingdino's module and a copy as FastDeformableAttention (same weights), batch first.

    Random projections, offsets reaching a few pixels (outside the maps too); point 0 of every head
    and level has offset exactly 0, so it samples at the reference point itself (which the inputs put
    on pixel borders and map edges)."""
    torch.manual_seed(seed)
    stock = MultiScaleDeformableAttention(HEADS * CHANNELS, HEADS, len(LEVEL_SETS[0]), POINTS, batch_first=True)
    with torch.no_grad():
        for param in stock.parameters():
            param.normal_(0, 0.3)
        stock.sampling_offsets.bias.mul_(10)
        rows = stock.sampling_offsets.weight.view(HEADS, len(LEVEL_SETS[0]), POINTS, 2, -1)
        rows[:, :, 0] = 0
        stock.sampling_offsets.bias.view(HEADS, len(LEVEL_SETS[0]), POINTS, 2)[:, :, 0] = 0
    stock = stock.to(dtype).eval()
    fast = copy.deepcopy(stock)
    fast.__class__ = FastDeformableAttention
    return stock, fast



def attention_inputs(shapes: list[tuple[int, int]], queries: int, boxes: bool, seed: int,
                     dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """query and value (1, Q / keys, D); key_padding_mask (1, keys), True on each level's bottom and right
    quarter (padding, as DinoTextInputs.padded makes it); reference points (1, Q, levels, 2) spread over
    [-0.3, 1.3], or boxes (1, Q, levels, 4) with those centres. The first queries' references sit exactly
    on 0 and 1 (half a pixel outside the outer pixel centres), the outer centres, whole-pixel borders
    k / w (bilinear weights exactly 0 and 1) and half a pixel outside the map."""
    generator = torch.Generator().manual_seed(seed)
    dim = HEADS * CHANNELS
    keys = sum(h * w for h, w in shapes)
    masks = []
    for h, w in shapes:
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[h - h // 4:] = True
        mask[:, w - w // 4:] = True
        masks.append(mask.flatten())
    levels = len(shapes)
    centres = torch.rand(1, queries, levels, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dtype)  # levels, 2 (x, y)
    edges = [torch.zeros_like(sizes), torch.ones_like(sizes), 0.5 / sizes, 1 - 0.5 / sizes, 1 / sizes,
             (sizes - 1) / sizes, -0.5 / sizes, 1 + 0.5 / sizes]
    for i, edge in enumerate(edges):
        centres[:, i] = edge
    reference = centres
    if boxes:
        reference = torch.cat([centres, torch.rand(1, queries, levels, 2, generator=generator, dtype=dtype) * 0.5
                               + 0.05], -1)
    return {"query": torch.randn(1, queries, dim, generator=generator, dtype=dtype),
            "value": torch.randn(1, keys, dim, generator=generator, dtype=dtype),
            "key_padding_mask": torch.cat(masks)[None], "reference_points": reference}


@pytest.mark.parametrize("core", EXPORTED_CORES)
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
@pytest.mark.parametrize("shapes", LEVEL_SETS)
def test_export_form_is_groundingdino_in_float64(shapes, boxes, core):
    stock, fast = attention_pair(seed=len(shapes[0]) + shapes[0][1])
    inputs = attention_inputs(shapes, queries=120, boxes=boxes, seed=shapes[0][0])
    tensor = torch.tensor(shapes)
    with torch.no_grad():
        expected = stock(**inputs, spatial_shapes=tensor, level_start_index=None)
        ours = fast(**inputs, spatial_shapes=LevelShapes(tuple(shapes), tensor, core))
    assert ours.shape == expected.shape == (1, 120, HEADS * CHANNELS)
    assert expected.abs().max() > 1  # something was sampled
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=1e-10)


class _Attention(torch.nn.Module):
    """The export form with the level sizes read from four (h, w) tensors, as the graph reads them from
    the feature maps' shapes: symbolic under export."""

    def __init__(self, attention: FastDeformableAttention, core: str) -> None:
        super().__init__()
        self.attention = attention
        self.core = core

    def forward(self, query: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor,
                reference_points: torch.Tensor, level0: torch.Tensor, level1: torch.Tensor, level2: torch.Tensor,
                level3: torch.Tensor) -> torch.Tensor:
        sizes = tuple((level.shape[0], level.shape[1]) for level in (level0, level1, level2, level3))
        one = torch.ones((), dtype=torch.long)
        tensor = torch.stack([torch.stack([one * h, one * w]) for h, w in sizes])
        return self.attention(query, value=value, key_padding_mask=key_padding_mask,
                              reference_points=reference_points,
                              spatial_shapes=LevelShapes(sizes, tensor, self.core))


@pytest.mark.parametrize("core", EXPORTED_CORES)
@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_export_form_on_openvino_is_groundingdino_at_every_size(boxes, core, ops_library):
    """One conversion with dynamic level sizes and query and key counts; run at sizes it was not traced at."""
    ov = pytest.importorskip("openvino")
    from torch.export import Dim

    from backend.openvino_cache import convert

    stock, fast = attention_pair(seed=3)
    traced = [(24, 37), (12, 19), (6, 10), (3, 5)]
    example = attention_inputs(traced, queries=33, boxes=boxes, seed=0, dtype=torch.float32)
    queries, keys = Dim("queries", min=2, max=100_000), Dim("keys", min=4, max=100_000)
    sides = [(Dim(f"h{i}", min=1, max=1024), Dim(f"w{i}", min=1, max=1024)) for i in range(len(traced))]
    dynamic = ({1: queries}, {1: keys}, {1: keys}, {1: queries}, *({0: h, 1: w} for h, w in sides))
    ops = ops_library if core == "fused" else None
    model = convert(_Attention(copy.deepcopy(fast).float(), core),
                    (*example.values(), *(torch.zeros(h, w) for h, w in traced)), dynamic, ops=ops)
    kinds = {node.get_type_name() for node in model.get_ops()}
    assert ("DeformableAttention" in kinds) == (core == "fused") and ("GridSample" in kinds) == (core != "fused")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for seed, shapes in enumerate(LEVEL_SETS):
        inputs = attention_inputs(shapes, queries=150 + seed, boxes=boxes, seed=10 + seed)
        with torch.no_grad():
            expected = stock(**inputs, spatial_shapes=torch.tensor(shapes), level_start_index=None)
        arrays = [t.numpy() if t.dtype == torch.bool else t.float().numpy() for t in inputs.values()]
        ours = torch.from_numpy(np.asarray(compiled([*arrays, *(np.zeros(s, np.float32) for s in shapes)])[0]))
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-5)
