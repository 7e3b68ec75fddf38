"""backend.encoder_blocks (SAM's ViT blocks in the layouts the OpenVINO graphs are exported from) against
segment_anything's own modules, on a tiny random-weight SAM built with the real classes."""

from __future__ import annotations

import pytest
import torch
from segment_anything.build_sam import _build_sam

from backend import sam_attention
from backend.encoder_blocks import rel_pos_terms, run_block
from backend.encoder_graph import CapturingEncoder, PlainEncoder

GLOBAL_BLOCKS = (1, 3)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2,
                     encoder_global_attn_indexes=list(GLOBAL_BLOCKS), checkpoint=None)
    with torch.no_grad():
        # SAM zero-initialises these; random values make the rel-pos terms (and the bias rows) matter.
        sam.image_encoder.pos_embed.normal_(0.0, 0.5)
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0.0, 0.5)
            block.attn.rel_pos_w.normal_(0.0, 0.5)
            block.attn.qkv.bias.normal_(0.0, 0.5)  # padded window tokens are the bias after qkv
    return sam.image_encoder.eval()


@pytest.mark.parametrize("size", [(14, 14), (6, 9), (64, 64), (20, 30)])
def test_rel_pos_terms_equal_sams_einsum(encoder, size):
    """Narrow grids (windows) take the block-diagonal matmul, wide ones (global blocks) the batched one."""
    attn = encoder.blocks[0].attn
    h, w = size
    attn_h = torch.nn.Parameter(torch.randn(2 * h - 1, 32))  # get_rel_pos reads the table at this size
    attn_w = torch.nn.Parameter(torch.randn(2 * w - 1, 32))
    q = torch.randn(3, 2, h * w, 32)
    expected = sam_attention._decomposed_rel_pos(q, attn_h, attn_w, size)
    original = attn.rel_pos_h, attn.rel_pos_w
    try:
        attn.rel_pos_h, attn.rel_pos_w = attn_h, attn_w
        got = rel_pos_terms(attn, q, size)
    finally:
        attn.rel_pos_h, attn.rel_pos_w = original
    assert got is not None
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("grid", [(64, 64), (30, 23)])
def test_block_equals_segment_anythings_block(encoder, index, grid):
    """Windowed (0) and global (1) blocks; 64 and 30 x 23 tokens pad to whole 14-token windows."""
    block = encoder.blocks[index]
    x = torch.randn(1, *grid, 64, generator=torch.Generator().manual_seed(index))
    with torch.no_grad():
        expected, got = block(x), run_block(block, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plain_and_capture_graph_modules_equal_the_stock_encoder(encoder):
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    n = 64 * 64
    with torch.no_grad():
        expected = encoder(image)
        plain = PlainEncoder(encoder)(image)
        captured = CapturingEncoder(encoder)(image, torch.full((1, n), 1.0 / n))[0]
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)


def test_capture_graph_module_receives_what_the_torch_capture_records(encoder):
    """With every query weighted alike, each global block's received map is the torch capture's (mean
    over queries of the head-averaged softmax), and so is the last block's column mean."""
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    n = 64 * 64
    with torch.no_grad():
        _, *received, column_mean, _ = CapturingEncoder(encoder)(image, torch.full((1, n), 1.0 / n))
        with sam_attention.capture_encoder_attention(encoder) as capture:
            encoder(image)
    sam_attention.use_stock_attention(encoder)
    assert len(received) == len(GLOBAL_BLOCKS)
    for got, block in zip(received, GLOBAL_BLOCKS, strict=True):
        expected = torch.from_numpy(capture.blocks[block].received).reshape(1, n)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(column_mean, received[-1], rtol=1e-5, atol=1e-9)


def test_plain_graph_on_openvino_equals_the_stock_encoder(encoder):
    """The converted plain graph in f32, with relative-position tables that are not zero (SAM zero-
    initialises them, and so do the tiny and bench checkpoints, which leaves the terms unchecked there)."""
    import openvino as ov

    from backend.openvino_cache import convert

    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = encoder(image)
    model = convert(PlainEncoder(encoder), (image,))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled([image.numpy()])[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
