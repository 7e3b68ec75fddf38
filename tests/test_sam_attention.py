"""backend.sam_attention on tiny random-weight SAMs built with segment_anything's (and MobileSAM's) real classes."""

from __future__ import annotations

import copy
import pickle
import threading
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.build_sam import _build_sam
from segment_anything.modeling.image_encoder import Attention as SamViTAttention
from segment_anything.modeling.image_encoder import ImageEncoderViT
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from backend.sam_attention import (
    capture_decoder_attention,
    capture_encoder_attention,
    colorize,
    mask_attention_map,
    mask_attention_maps,
    mask_to_token_grid,
    mask_token_maps,
    normalize_map,
    overlay,
    supports_encoder_attention,
    token_map_to_image,
    use_fast_attention,
    use_stock_attention,
)

GLOBAL_BLOCKS = (1, 3)
N_TOK = 64 * 64


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    sam = _build_sam(
        encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2,
        encoder_global_attn_indexes=list(GLOBAL_BLOCKS), checkpoint=None,
    )
    with torch.no_grad():
        # SAM zero-initialises these; random values make the rel-pos terms (and their scaling) matter.
        sam.image_encoder.pos_embed.normal_(0.0, 0.5)
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0.0, 0.5)
            block.attn.rel_pos_w.normal_(0.0, 0.5)
    return sam.eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def stock_features(tiny_sam, image):
    with torch.no_grad():
        return tiny_sam.image_encoder(image)


def _encoder(tiny_sam):
    return copy.deepcopy(tiny_sam.image_encoder)


@pytest.fixture(scope="module")
def captured(tiny_sam, image):
    """One captured forward of the fast encoder over ``image``, with each global block's input."""
    encoder = _encoder(tiny_sam)
    use_fast_attention(encoder)
    inputs = {}
    hooks = [
        encoder.blocks[i].attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i in GLOBAL_BLOCKS
    ]
    with torch.no_grad(), capture_encoder_attention(encoder) as capture:
        features = encoder(image)
    for hook in hooks:
        hook.remove()
    return encoder, capture, inputs, features


def _reference_mean_attention(attn: SamViTAttention, x: torch.Tensor) -> torch.Tensor:
    """Straight from the definition: softmax(q k^T * scale + rel_h + rel_w), averaged over heads."""
    b, h, w, c = x.shape
    heads = attn.num_heads
    d = c // heads
    qkv = x.reshape(b, h * w, c) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, _ = (t.reshape(b, h * w, heads, d).transpose(1, 2) for t in qkv.split(c, dim=-1))
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * attn.scale
    # Relative position tables indexed by (query - key) offsets; 2*64-1 entries, no interpolation.
    rows, cols = torch.arange(h), torch.arange(w)
    table_h = attn.rel_pos_h[rows[:, None] - rows[None, :] + h - 1]  # (q_row, k_row, d)
    table_w = attn.rel_pos_w[cols[:, None] - cols[None, :] + w - 1]  # (q_col, k_col, d)
    qg = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnyxd,ykd->bnyxk", qg, table_h)
    rel_w = torch.einsum("bnyxd,xld->bnyxl", qg, table_w)
    logits = logits.reshape(b, heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    return logits.reshape(b, heads, h * w, h * w).softmax(dim=-1).mean(dim=1)


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("block_index, shape", [(0, (25, 14, 14, 64)), (1, (1, 64, 64, 64))])
def test_fast_attention_matches_stock_per_block(tiny_sam, block_index, shape):
    encoder = _encoder(tiny_sam)
    use_fast_attention(encoder)
    stock = tiny_sam.image_encoder.blocks[block_index].attn
    fast = encoder.blocks[block_index].attn
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), stock(x), atol=1e-4, rtol=1e-4)
    assert type(fast) is not type(stock) and isinstance(fast, SamViTAttention)


def test_fast_encoder_matches_stock_and_is_reversible(tiny_sam, image, stock_features):
    encoder = _encoder(tiny_sam)
    keys = list(encoder.state_dict())
    assert use_fast_attention(encoder) == 4
    assert use_fast_attention(encoder) == 4  # idempotent
    assert list(encoder.state_dict()) == keys
    with torch.no_grad():
        fast = encoder(image)
    torch.testing.assert_close(fast, stock_features, atol=1e-4, rtol=1e-4)

    # Deep copies and pickles keep the patch (no dynamic class names needed).
    windows = torch.randn(25, 14, 14, 64, generator=torch.Generator().manual_seed(4))
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert type(clone.blocks[0].attn) is type(encoder.blocks[0].attn)
        with torch.no_grad():
            torch.testing.assert_close(clone.blocks[0].attn(windows), encoder.blocks[0].attn(windows), atol=0, rtol=0)

    use_stock_attention(encoder)
    assert all(type(b.attn) is SamViTAttention for b in encoder.blocks)
    with torch.no_grad():
        torch.testing.assert_close(encoder(image), stock_features, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- (b)


def test_captured_attention_equals_reference(captured, stock_features):
    encoder, capture, inputs, features = captured
    torch.testing.assert_close(features, stock_features, atol=1e-4, rtol=1e-4)
    assert capture.block_indices == GLOBAL_BLOCKS and sorted(capture.blocks) == list(GLOBAL_BLOCKS)
    assert capture.last.block_index == 3

    for i in GLOBAL_BLOCKS:
        got = capture.blocks[i]
        with torch.no_grad():
            ref = _reference_mean_attention(encoder.blocks[i].attn, inputs[i])[0].numpy()
        assert got.grid == (64, 64) and got.num_heads == 2
        assert got.matrix.dtype == np.float16 and got.matrix.shape == (1, N_TOK, N_TOK)
        assert got.received.dtype == np.float32 and got.received.shape == (1, 64, 64)
        np.testing.assert_allclose(got.matrix[0].astype(np.float32), ref, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(got.received[0], ref.mean(axis=0).reshape(64, 64), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(got.received[0].sum(), 1.0, rtol=1e-4)

        # "Where the mask's own tokens look": the mean of their rows (bool) or a weighted mean.
        token_mask = np.zeros((64, 64), dtype=bool)
        token_mask[10:20, 30:45] = True
        np.testing.assert_allclose(
            mask_attention_map(got, token_mask), ref[token_mask.ravel()].mean(axis=0).reshape(64, 64),
            rtol=2e-3, atol=1e-7,
        )
        weights = np.zeros((64, 64), dtype=np.float32)
        weights[5, 5], weights[50, 7] = 3.0, 1.0
        expected = (3 * ref[5 * 64 + 5] + ref[50 * 64 + 7]) / 4
        np.testing.assert_allclose(mask_attention_map(got, weights), expected.reshape(64, 64), rtol=2e-3, atol=1e-7)
        # Several masks at once (rows shared, rows of one only, a mask over 512+ rows: row chunks): each its own.
        large = np.zeros((64, 64), dtype=np.float32)
        large[:20, :40] = 0.5
        large[12, 33] = 2.0
        together = mask_attention_maps(got, np.stack([token_mask, weights, large]))
        assert together.shape == (3, 64, 64) and together.dtype == np.float32
        for one, alone in zip(together, (token_mask, weights, large), strict=True):
            flat = alone.astype(np.float64).ravel()
            np.testing.assert_allclose(one, (flat @ ref / flat.sum()).reshape(64, 64), rtol=2e-3, atol=1e-7)
        with pytest.raises(ValueError, match="selects no tokens"):
            mask_attention_maps(got, np.stack([token_mask, np.zeros((64, 64), dtype=bool)]))
        with pytest.raises(ValueError, match=r"must be \(masks, \*token grid \(64, 64\)\), got shape \(64, 64\)"):
            mask_attention_maps(got, token_mask)  # one mask without its batch axis


def test_capture_options_and_errors(tiny_sam, image, captured):
    encoder = _encoder(tiny_sam)
    with torch.no_grad(), capture_encoder_attention(encoder, "last", keep_matrix=False, head_chunk=2) as capture:
        encoder(image)
    assert list(capture.blocks) == [3] and capture.blocks[3].matrix is None
    np.testing.assert_allclose(capture.blocks[3].received, captured[1].blocks[3].received, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="keep_matrix"):
        mask_attention_map(capture.blocks[3], np.ones((64, 64), dtype=bool))
    # Windowed blocks are untouched by a capture of block 3 only.
    assert type(encoder.blocks[0].attn) is SamViTAttention

    with pytest.raises(ValueError, match="windowed"):
        with capture_encoder_attention(encoder, [0]):
            pass
    with pytest.raises(ValueError):
        with capture_encoder_attention(encoder, head_chunk=0):
            pass

    # After the `with`, the block runs its plain (SDPA) path and no longer touches the capture.
    before = capture.blocks[3]
    with torch.no_grad():
        encoder.blocks[3].attn(torch.randn(1, 64, 64, 64))
    assert capture.blocks[3] is before and list(capture.blocks) == [3]


def test_capture_with_autograd(tiny_sam, image, captured, stock_features):
    encoder = _encoder(tiny_sam)
    with capture_encoder_attention(encoder, "last", keep_matrix=False) as capture:
        features = encoder(image)
    features.sum().backward()  # the capturing forward stays differentiable
    assert encoder.blocks[3].attn.qkv.weight.grad is not None
    torch.testing.assert_close(features.detach(), stock_features, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(capture.last.received, captured[1].last.received, rtol=1e-5, atol=1e-9)


def test_captures_in_threads_do_not_mix(captured, image):
    encoder = captured[0]  # one encoder shared by both threads
    images = [image, torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(11))]
    expected = [captured[1].last.received]
    with torch.no_grad(), capture_encoder_attention(encoder, "last", keep_matrix=False) as c:
        encoder(images[1])
    expected.append(c.last.received)

    barrier = threading.Barrier(2)
    results: list = [None, None]

    def work(i: int) -> None:
        with torch.no_grad(), capture_encoder_attention(encoder, "last", keep_matrix=False) as c:
            barrier.wait()  # both captures active at once
            encoder(images[i])
            barrier.wait()
        results[i] = c

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        np.testing.assert_allclose(results[i].last.received, expected[i], rtol=1e-5, atol=1e-9)
    assert not np.allclose(expected[0], expected[1])


# ---------------------------------------------------------------------------------------------- (c)


def _planted_encoder(tiny_sam, r: int, c: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Encoder + input image whose global block 1 makes every query attend to token (r, c).

    Block 0 is made an identity (zero residual branches) and pos_embed zero, so every token but the
    planted bright patch is the same vector e after block 1's norm1, the planted one is f. With
    q = alpha (f - e) for every query and k = x, key (r, c) wins each head by scale*alpha*|f_h - e_h|^2.
    """
    encoder = _encoder(tiny_sam)
    image = torch.zeros(1, 3, 1024, 1024)
    image[..., 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 3.0
    with torch.no_grad():
        encoder.pos_embed.zero_()
        b0 = encoder.blocks[0]
        for lin in (b0.attn.proj, b0.mlp.lin2):
            lin.weight.zero_()
            lin.bias.zero_()
        attn = encoder.blocks[1].attn
        tokens = encoder.blocks[1].norm1(encoder.patch_embed(image))
        e, f = tokens[0, 0 if r else 63, 0 if c else 63], tokens[0, r, c]
        dim, heads = e.numel(), attn.num_heads
        margins = attn.scale * ((f - e) ** 2).reshape(heads, -1).sum(dim=1)
        alpha = 40.0 / float(margins.min())
        attn.qkv.weight[:dim].zero_()
        attn.qkv.bias[:dim] = alpha * (f - e)
        attn.qkv.weight[dim : 2 * dim] = torch.eye(dim)
        attn.qkv.bias[dim : 2 * dim].zero_()
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
    return encoder, image


@pytest.mark.parametrize(
    "original_size, token",
    [((480, 640), (40, 60)), ((640, 480), (60, 40)), ((500, 333), (10, 42))],  # last: partial token column
)
def test_planted_attention_lands_on_the_right_pixels(tiny_sam, original_size, token):
    r, c = token
    encoder, image = _planted_encoder(tiny_sam, r, c)
    use_fast_attention(encoder)
    with torch.no_grad(), capture_encoder_attention(encoder, [1]) as capture:
        encoder(image)
    received = capture.blocks[1].received[0]
    assert np.unravel_index(received.argmax(), received.shape) == (r, c)
    assert received[r, c] > 0.99
    # Any query set looks at the planted token too.
    some = np.zeros((64, 64), dtype=bool)
    some[3, 3] = some[50, 20] = True
    assert mask_attention_map(capture.blocks[1], some)[r, c] > 0.99

    height, width = original_size
    input_size = ResizeLongestSide.get_preprocess_shape(height, width, 1024)
    assert 16 * r < input_size[0] and 16 * c < input_size[1], "planted token must be in the unpadded region"
    heat = token_map_to_image(received, input_size, original_size)
    assert heat.shape == original_size and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    sy, sx = height / input_size[0], width / input_size[1]  # original pixels per resized pixel
    assert 16 * r * sy - 1 <= y <= min(16 * (r + 1), input_size[0]) * sy + 1
    assert 16 * c * sx - 1 <= x <= min(16 * (c + 1), input_size[1]) * sx + 1


def test_token_map_to_image_ignores_padding_and_keeps_orientation():
    # 480x640 -> 768x1024: tokens below row 48 are padding and must not show up at all.
    token_map = np.zeros((64, 64), dtype=np.float32)
    token_map[60, 5] = 100.0  # padded region
    token_map[0, 63] = 1.0  # top-right corner
    heat = token_map_to_image(token_map, (768, 1024), (480, 640))
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 10 and x >= 630
    assert heat[470:, :100].max() < 1e-6
    raw = token_map_to_image(token_map, (768, 1024), (480, 640), normalize=False)
    assert raw.max() <= 1.0 + 1e-6
    # Partial last token: 333 wide -> 682 resized -> 43 token columns, the last one 10 px wide.
    token_map = np.zeros((64, 64), dtype=np.float32)
    token_map[:, 42] = 1.0
    heat = token_map_to_image(token_map, (1024, 682), (500, 333))
    assert heat[:, -1].min() > 0.9 and heat[:, :300].max() < 1e-6


def test_mask_to_token_grid():
    mask = np.zeros((480, 640), dtype=bool)
    mask[100:200, 300:400] = True  # x1.6 -> rows 160:320, cols 480:640 -> tokens 10:20, 30:40
    grid = mask_to_token_grid(mask, (768, 1024))
    assert grid.shape == (64, 64)
    expected = np.zeros((64, 64), dtype=np.float32)
    expected[10:20, 30:40] = 1.0
    np.testing.assert_allclose(grid, expected, atol=1e-5)


def test_colorize_is_rgb_and_overlay_blends():
    ramp = np.array([[0.0, 1.0]], dtype=np.float32)
    rgb = colorize(ramp, "jet")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 128)  # jet starts dark blue: blue channel last in RGB
    assert tuple(rgb[0, 1]) == (128, 0, 0)  # and ends dark red
    with pytest.raises(ValueError):
        colorize(ramp, "no-such-map")
    image = np.full((1, 2, 3), 200, dtype=np.uint8)
    np.testing.assert_array_equal(overlay(image, rgb, 0.0), image)
    np.testing.assert_array_equal(overlay(image, rgb, 1.0), rgb)
    assert overlay(image, rgb, 0.5)[0, 0].tolist() == [100, 100, 164]
    np.testing.assert_array_equal(normalize_map(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(normalize_map(np.full((2, 2), 7.0)), np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------- (d)


def _decoder_inputs(sam, n_boxes: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(1, 256, 64, 64, generator=g)
    boxes = torch.tensor([[100.0, 200.0, 500.0, 700.0], [600.0, 50.0, 1000.0, 400.0], [0, 0, 1023, 1023]])[:n_boxes]
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
    return dict(image_embeddings=embeddings, image_pe=pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense)


def _check_decoder_capture(sam):
    decoder = copy.deepcopy(sam.mask_decoder)
    inputs = _decoder_inputs(sam)
    with torch.no_grad():
        stock = decoder(**inputs, multimask_output=False)
        with capture_decoder_attention(decoder) as capture:
            single = decoder(**inputs, multimask_output=False)
            multi = decoder(**inputs, multimask_output=True)
        after = decoder(**inputs, multimask_output=False)  # patched, no capture: stock path
        stock_multi = copy.deepcopy(sam.mask_decoder)(**inputs, multimask_output=True)
    for got, want in ((single, stock), (after, stock), (multi, stock_multi)):
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)

    assert len(capture.calls) == 2
    first = capture.calls[0]
    # 1 iou token + 4 mask tokens + 2 box-corner tokens, over 64x64 image positions; a distribution.
    assert first.shape == (2, 7, N_TOK) and first.dtype == np.float32
    np.testing.assert_allclose(first.sum(axis=-1), 1.0, rtol=1e-5)
    assert capture.attention.shape == (4, 7, N_TOK)

    single_capture = copy.copy(capture)
    single_capture.calls = [first]
    maps = mask_token_maps(single_capture)
    assert maps.shape == (2, 64, 64)
    np.testing.assert_array_equal(maps, first[:, 1].reshape(2, 64, 64))  # mask token 0 = sequence index 1
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    all_three = mask_token_maps(single_capture, multimask_output=True)
    assert all_three.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(all_three, first[:, 2:5].reshape(2, 3, 64, 64))
    picked = mask_token_maps(single_capture, multimask_output=True, selected=[2, 0])
    np.testing.assert_array_equal(picked, np.stack([all_three[0, 2], all_three[1, 0]]))


def test_decoder_capture_segment_anything(tiny_sam):
    _check_decoder_capture(tiny_sam)


@pytest.mark.integration  # builds MobileSAM inline (no model fixture): ~20 s on CPU
def test_mobile_sam_decoder_capture_and_encoder_refusal():
    from mobile_sam import build_sam_vit_t

    torch.manual_seed(0)
    sam = build_sam_vit_t().eval()
    assert type(sam.mask_decoder).__module__.startswith("mobile_sam")
    _check_decoder_capture(sam)
    assert not supports_encoder_attention(sam.image_encoder)
    with pytest.raises(NotImplementedError, match="TinyViT"):
        with capture_encoder_attention(sam.image_encoder):
            pass
    with pytest.raises(NotImplementedError, match="TinyViT"):
        use_fast_attention(sam.image_encoder)
    with pytest.raises(ValueError, match="MaskDecoder"):
        with capture_decoder_attention(sam.image_encoder):
            pass


# ---------------------------------------------------------------------------------------------- (e)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_capture_never_materialises_all_heads():
    torch.manual_seed(0)
    heads = 4
    encoder = ImageEncoderViT(
        img_size=1024, patch_size=16, embed_dim=64, depth=2, num_heads=heads, mlp_ratio=2.0,
        out_chans=32, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, global_attn_indexes=(1,), window_size=14,
    ).eval()
    x = torch.randn(1, 3, 1024, 1024)
    all_heads = heads * N_TOK * N_TOK

    with torch.no_grad(), _LargestTensor() as stock:
        encoder(x)
    assert stock.largest >= all_heads  # the recorder sees stock's (B*heads, N, N) attention

    use_fast_attention(encoder)
    with torch.no_grad(), _LargestTensor() as fast:
        encoder(x)
    assert fast.largest <= N_TOK * N_TOK  # SDPA path: one head's mask at a time for global blocks

    with torch.no_grad(), capture_encoder_attention(encoder) as capture, _LargestTensor() as captured:
        encoder(x)
    assert captured.largest <= N_TOK * N_TOK < all_heads  # one head's logits/softmax, the (B, N, N) mean
    assert capture.blocks[1].matrix.shape == (1, N_TOK, N_TOK)


class _FreshLargeTensors(TorchDispatchMode):
    """Counts aten ops that return a *new* tensor of at least ``size`` elements (out= and in-place
    results, which alias an argument, are not new)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and t.untyped_storage().data_ptr() not in given:
                self.count += 1
        return out


def _global_attention_inputs(heads: int, dtype: torch.dtype, batch: int = 1, side: int = 64):
    g = torch.Generator().manual_seed(heads)
    n, d = side * side, 8
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(3))
    rel = tuple(torch.randn(batch, heads, side, side, side, generator=g).to(dtype) for _ in range(2))
    return q, k, v, rel, d**-0.5, (side, side)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [2, 6])
def test_global_attention_allocates_no_matrix_per_head(dtype, heads):
    """The N x N buffers of a global block are allocated once, not once per head: fresh 16-64 MiB
    blocks are page-faulted in each time, which made capture up to 1.7x dearer (bench/README.md)."""
    from backend.sam_attention import _attend_and_capture, _sdpa

    q, k, v, rel, scale, size = _global_attention_inputs(heads, dtype)
    with torch.no_grad(), _FreshLargeTensors(N_TOK * N_TOK) as fresh:
        _attend_and_capture(q, k, v, rel, scale, size, 1)
    assert fresh.count <= 2  # one logits/softmax buffer and the float32 head-sum, whatever `heads`
    with torch.no_grad(), _FreshLargeTensors(N_TOK * N_TOK) as fresh:
        _sdpa(q, k, v, rel, scale)
    assert fresh.count <= 1  # one rel-pos mask buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_chunk", [1, 2, 3])
def test_capture_is_the_head_mean_of_the_softmax_that_makes_the_output(dtype, head_chunk):
    """In fp32 and bf16, any head chunking, a batch of 2: the output is softmax(logits) @ v computed
    in the input dtype, and the capture is the float32 mean over heads of that very softmax."""
    from backend.sam_attention import _attend_and_capture

    q, k, v, rel, scale, size = _global_attention_inputs(3, dtype, batch=2, side=16)
    b, heads, n, _ = q.shape
    with torch.no_grad():
        mask = (rel[0][..., :, None] + rel[1][..., None, :]).reshape(b * heads, n, n)
        logits = torch.baddbmm(mask, (q * scale).reshape(b * heads, n, -1), k.reshape(b * heads, n, -1).mT)
        attn = logits.softmax(dim=-1)
        expected_out = torch.bmm(attn, v.reshape(b * heads, n, -1)).view(b, heads, n, -1)
        expected_mean = attn.view(b, heads, n, n).float().sum(dim=1) / heads
        out, mean = _attend_and_capture(q, k, v, rel, scale, size, head_chunk)
    assert out.dtype == dtype and mean.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    torch.testing.assert_close(mean, expected_mean, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(mean.sum(dim=-1), torch.ones(b, n), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=0)
