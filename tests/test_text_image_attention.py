"""``fusion_attention.text_image_attention`` (the fusion layers' attention with its image-side projections moved
onto the text, as the OpenVINO text graph runs it) equals groundingdino's BiMultiHeadAttention: in float64
up to float rounding, with image and text padding, with its clamps and global-max shift acting, at
caption lengths up to 256 tokens; and inside ``DinoTextGraph`` on the tiny model."""

from __future__ import annotations

import pytest
import torch
from groundingdino.models.GroundingDINO.fuse_modules import BiAttentionBlock, BiMultiHeadAttention

from backend.fusion_attention import text_image_attention


def attention(seed: int, v_dim: int = 64, embed_dim: int = 96, heads: int = 4, weight_std: float = 0.1
              ) -> BiMultiHeadAttention:
    torch.manual_seed(seed)
    module = BiMultiHeadAttention(v_dim, v_dim, embed_dim, heads, dropout=0.0)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, weight_std)  # biases too (groundingdino's init leaves them 0)
    return module.double().eval()


def tokens(batch: int, count: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("text_tokens", [1, 7, 256])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("fused", [False, True], ids=["softmaxes", "fusion_softmax-op"])
def test_equals_groundingdinos_module_in_float64(text_tokens, padded, fused):
    module = attention(seed=text_tokens)
    image, text = tokens(2, 301, 64, seed=1), tokens(2, text_tokens, 64, seed=2)
    image_padding = text_padding = None
    if padded:
        image_padding = torch.zeros(2, 301, dtype=torch.bool)
        image_padding[1, 250:] = True
        text_padding = torch.zeros(2, text_tokens, dtype=torch.bool)
        text_padding[0, text_tokens // 2 + 1:] = True
    with torch.no_grad():
        # groundingdino's forward fills its masks' repeats in place: give it copies
        expected = module(image, text, attention_mask_v=None if image_padding is None else image_padding.clone(),
                          attention_mask_l=None if text_padding is None else text_padding.clone())
        ours = text_image_attention(module, image, text, image_padding, text_padding, fused)
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == want.shape
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_clamps_and_shift_act_as_in_groundingdino():
    """Logits far past +-50000 (large weights and tokens): the global-max shift and the clamps decide the
    probabilities, in both directions, as in groundingdino's module."""
    module = attention(seed=5, weight_std=3.0)
    image, text = tokens(1, 120, 64, seed=3, scale=30.0), tokens(1, 9, 64, seed=4, scale=30.0)
    with torch.no_grad():
        query = module.v_proj(image) * module.scale
        key = module.l_proj(text)
        spread = (query.view(1, 120, 4, -1).transpose(1, 2) @ key.view(1, 9, 4, -1).transpose(1, 2).transpose(2, 3))
        assert spread.max() - spread.min() > 2 * 50000  # the clamps cut
        expected = module(image, text)
        ours = text_image_attention(module, image, text, None, None)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_block_with_text_side_attention_equals_groundingdinos_block():
    """The fusion block as DinoTextGraph runs it (fusion_attention.fusion_layer)."""
    from backend.fusion_attention import fusion_layer

    torch.manual_seed(6)
    block = BiAttentionBlock(64, 64, 96, 4, dropout=0.0, init_values=0.5).double().eval()
    with torch.no_grad():
        for param in block.attn.parameters():
            param.normal_(0, 0.1)
        block.gamma_v.normal_(0.5, 0.3)  # a scale per channel (folded into the output matrix's columns)
        block.gamma_l.normal_(0.5, 0.3)
    image, text = tokens(1, 80, 64, seed=7), tokens(1, 11, 64, seed=8)
    image_padding = torch.zeros(1, 80, dtype=torch.bool)
    image_padding[0, 70:] = True
    text_padding = torch.zeros(1, 11, dtype=torch.bool)
    text_padding[0, 9:] = True
    with torch.no_grad():
        expected = block(image, text, attention_mask_v=image_padding.clone(), attention_mask_l=text_padding.clone())
        ours = fusion_layer(block, image, text, image_padding, text_padding)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_runs_in_bf16_as_the_torch_runtime_does(how):
    """Under bf16 autocast (the torch runtime with PRECISION=bf16: projections bf16, einsum not autocast)
    and with bf16 weights: it runs, and stays close to float32."""
    module = attention(seed=9).float()
    image, text = tokens(1, 200, 64, seed=10).float(), tokens(1, 12, 64, seed=11).float()
    with torch.no_grad():
        reference = text_image_attention(module, image, text, None, None)
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours = text_image_attention(module, image, text, None, None)
        else:
            ours = text_image_attention(module.to(torch.bfloat16), image.bfloat16(), text.bfloat16(), None, None)
    for got, want in zip(ours, reference, strict=True):
        assert got.dtype == (torch.bfloat16 if how == "bf16 weights" else got.dtype) and got.isfinite().all()
        cosine = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert cosine > 0.999
