"""Speed options keep the outputs: Grounding DINO's inference speed-ups (backend/dino_fast.py) against
groundingdino's own code on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_deformable_attention_equals_groundingdino():
    from groundingdino.models.GroundingDINO.ms_deform_attn import multi_scale_deformable_attn_pytorch

    from backend.dino_fast import deformable_attention

    torch.manual_seed(0)
    shapes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    bs, heads, channels, points = 2, 4, 8, 3
    value = torch.randn(bs, sum(h * w for h, w in shapes), heads, channels)
    queries = 50
    # Some locations outside [0, 1]: the zero padding must match too.
    locations = torch.rand(bs, queries, heads, len(shapes), points, 2) * 1.2 - 0.1
    weights = torch.rand(bs, queries, heads, len(shapes), points)
    expected = multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), locations, weights)
    ours = deformable_attention(value, shapes, locations, weights)
    assert ours.shape == expected.shape == (bs, queries, heads * channels)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_deformable_attention_is_grid_sample_exactly_in_float64():
    """Same samples, weights and zero padding: in float64 only summation order differs."""
    from groundingdino.models.GroundingDINO.ms_deform_attn import multi_scale_deformable_attn_pytorch

    from backend.dino_fast import deformable_attention

    torch.manual_seed(1)
    shapes = [(20, 27), (10, 14), (5, 7), (3, 4)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 8, 4, dtype=torch.float64)
    # Far outside the map too: corners there must contribute nothing, not wrap to the next row/level.
    locations = torch.rand(1, 300, 8, len(shapes), 4, 2, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(1, 300, 8, len(shapes), 4, dtype=torch.float64).softmax(-1)
    expected = multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), locations, weights)
    torch.testing.assert_close(deformable_attention(value, shapes, locations, weights), expected,
                               atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def two_dinos(engine_config):
    """The tiny Grounding DINO twice from the same file: one stock, one with the speed-ups."""
    from backend.dino_fast import use_fast_inference
    from backend.models import build_grounding_dino

    stock, fast = build_grounding_dino(engine_config), build_grounding_dino(engine_config)
    return stock, fast, use_fast_inference(fast)


def test_fast_inference_patches_one_instance_only(two_dinos):
    from groundingdino.models.GroundingDINO.ms_deform_attn import MultiScaleDeformableAttention

    from backend.dino_fast import FastDeformableAttention

    stock, fast, patched = two_dinos
    n_attention = sum(isinstance(m, MultiScaleDeformableAttention) for m in stock.modules())
    assert patched == n_attention > 0
    assert all(type(m) is MultiScaleDeformableAttention for m in stock.modules()
               if isinstance(m, MultiScaleDeformableAttention))
    assert sum(isinstance(m, FastDeformableAttention) for m in fast.modules()) == n_attention
    assert not any(getattr(m, "use_transformer_ckpt", False) or getattr(m, "use_checkpoint", False)
                   for m in fast.modules())
    # The stock instance keeps its config's checkpointing flags (the tiny config turns them off, so
    # only check that the patch did not touch anything the stock model has).
    assert fast.state_dict().keys() == stock.state_dict().keys()


def test_fast_inference_outputs_equal_stock_forward(two_dinos, chelsea):
    import groundingdino.datasets.transforms as T
    from PIL import Image

    stock, fast, _ = two_dinos
    transform = T.Compose([T.RandomResize([320], max_size=533), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    image, _ = transform(Image.fromarray(chelsea), None)
    with torch.no_grad():
        expected = stock(image[None], captions=["cat . dog ."])
        ours = fast(image[None], captions=["cat . dog ."])
    torch.testing.assert_close(ours["pred_boxes"], expected["pred_boxes"], atol=1e-5, rtol=1e-4)
    finite = torch.isfinite(expected["pred_logits"])
    torch.testing.assert_close(ours["pred_logits"][finite], expected["pred_logits"][finite], atol=1e-4, rtol=1e-4)
    assert np.array_equal(torch.isfinite(ours["pred_logits"]).numpy(), finite.numpy())


def test_engine_detector_uses_the_speed_ups(engine):
    from backend.dino_fast import FastDeformableAttention

    assert any(isinstance(m, FastDeformableAttention) for m in engine.detector.model.modules())
