"""backend/box_decoder.py: SAM's box prompts decoded with the image side once equal segment_anything's (and
MobileSAM's) prompt encoder + mask decoder, single-mask output, box by box and in batches; in bf16 and fp16
it stays as close to fp32 as segment_anything's own autocast does; the decoder attention capture records the same maps;
the model's own decoder keeps its weights."""

from __future__ import annotations

import importlib

import pytest
import torch

from backend.box_decoder import BoxDecoder
from backend.decoder_attention import capture_decoder_attention, mask_token_maps

PACKAGES = ("segment_anything", "mobile_sam")


def sam_parts(package: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A prompt encoder and mask decoder of SAM's real sizes (256 channels, 64 x 64 embedding) built with the
    package's own classes, with random weights (SAM zero-initialises some of them; noise makes every weight
    matter)."""
    modeling = importlib.import_module(f"{package}.modeling")
    torch.manual_seed(seed)
    prompt_encoder = modeling.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(1024, 1024), mask_in_chans=16).eval()
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    decoder = modeling.MaskDecoder(num_multimask_outputs=3, transformer=transformer, transformer_dim=256,
                                   iou_head_depth=3, iou_head_hidden_dim=256).eval()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return prompt_encoder, decoder


def inputs(boxes: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    corners = torch.rand(boxes, 4, generator=generator) * 1024
    return embedding, torch.cat([corners[:, :2].minimum(corners[:, 2:]), corners[:, :2].maximum(corners[:, 2:])], 1)


@torch.inference_mode()
def stock(prompt_encoder, decoder, embedding, boxes, autocast: torch.dtype | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        masks, ious = decoder(image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return masks[:, 0].float(), ious[:, 0].float()


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("boxes", [1, 5])
def test_fp32_equals_the_packages_decoder(package, boxes):
    prompt_encoder, decoder = sam_parts(package)
    embedding, box_tensor = inputs(boxes)
    want_masks, want_ious = stock(prompt_encoder, decoder, embedding, box_tensor)
    masks, ious = BoxDecoder(prompt_encoder, decoder)(embedding, box_tensor)
    assert masks.shape == (boxes, 256, 256) and ious.shape == (boxes,)
    assert masks.dtype == ious.dtype == torch.float32
    assert float(want_masks.abs().max()) > 0.1  # logits that mean something, not a zero map
    torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ious, want_ious, atol=1e-6, rtol=1e-5)


def test_each_box_decodes_as_it_does_alone():
    prompt_encoder, decoder = sam_parts("segment_anything", seed=1)
    embedding, boxes = inputs(4, seed=5)
    box_decoder = BoxDecoder(prompt_encoder, decoder)
    together_masks, together_ious = box_decoder(embedding, boxes)
    for index in range(len(boxes)):
        alone_masks, alone_ious = box_decoder(embedding, boxes[index : index + 1])
        torch.testing.assert_close(together_masks[index : index + 1], alone_masks, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together_ious[index : index + 1], alone_ious, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_is_as_close_to_fp32_as_autocast_is(package, dtype):
    prompt_encoder, decoder = sam_parts(package, seed=2)
    embedding, boxes = inputs(6, seed=7)
    want_masks, want_ious = stock(prompt_encoder, decoder, embedding, boxes)
    autocast_masks, autocast_ious = stock(prompt_encoder, decoder, embedding, boxes, autocast=dtype)
    box_decoder = BoxDecoder(prompt_encoder, decoder, dtype)
    masks, ious = box_decoder(embedding, boxes)
    # The model's own decoder keeps its fp32 weights; the reduced-precision one is a copy.
    assert box_decoder.mask_decoder is not decoder
    assert all(p.dtype == torch.float32 for p in decoder.parameters())
    assert all(p.dtype == dtype for p in box_decoder.mask_decoder.parameters())
    scale = float(want_masks.abs().max())
    autocast_error = float((autocast_masks - want_masks).abs().max())
    assert float((masks - want_masks).abs().max()) <= 2 * autocast_error + 1e-3 * scale
    agreement = float(((masks > 0) == (want_masks > 0)).float().mean())
    autocast_agreement = float(((autocast_masks > 0) == (want_masks > 0)).float().mean())
    assert agreement >= autocast_agreement - 0.005 and agreement > 0.98
    assert float((ious - want_ious).abs().max()) <= 2 * float((autocast_ious - want_ious).abs().max()) + 1e-3


@pytest.mark.parametrize("package", PACKAGES)
def test_captured_decoder_maps_equal_the_stock_decoders(package):
    prompt_encoder, decoder = sam_parts(package, seed=4)
    embedding, boxes = inputs(3, seed=9)
    with capture_decoder_attention(decoder) as stock_capture:
        stock(prompt_encoder, decoder, embedding, boxes)
    box_decoder = BoxDecoder(prompt_encoder, decoder)
    with capture_decoder_attention(box_decoder.mask_decoder) as capture:
        box_decoder(embedding, boxes)
    assert len(capture.calls) == 1 and capture.attention.shape == stock_capture.attention.shape == (3, 7, 4096)
    torch.testing.assert_close(torch.from_numpy(mask_token_maps(capture)),
                               torch.from_numpy(mask_token_maps(stock_capture)), atol=1e-6, rtol=1e-4)


def test_wrong_inputs_are_refused_naming_them():
    prompt_encoder, decoder = sam_parts("segment_anything")
    with pytest.raises(ValueError, match="MaskDecoder.*output_upscaling"):
        BoxDecoder(prompt_encoder, decoder.transformer)
    embedding, boxes = inputs(2)
    with pytest.raises(ValueError, match=r"image_embedding must be \(1, C, h, w\), got \(2, 256, 64, 64\)"):
        BoxDecoder(prompt_encoder, decoder)(embedding.expand(2, -1, -1, -1), boxes)


@pytest.mark.parametrize("input_size, size", [((768, 1024), (3000, 4000)), ((1024, 681), (451, 300)),
                                              ((1024, 1024), (1024, 1024)), ((1, 1024), (1, 40000)),
                                              ((576, 1024), (97, 173))],
                         ids=["12MP-up", "portrait-down", "square-same", "40x-stretch", "odd-down"])
def test_full_size_mask_is_sams_postprocessing_up_to_rounding(input_size, size):
    """SamMaskLogits.resized against segment_anything's ``Sam.postprocess_masks`` (torch's bilinear
    F.interpolate, crop, F.interpolate) on the same logits: pixels disagree only where the logit is within
    float rounding of the threshold."""
    from segment_anything.modeling import Sam

    from backend.segmenter import SamMaskLogits

    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 1, 256, 256, generator=generator) * 4
    sam = Sam.__new__(Sam)  # postprocess_masks reads only image_encoder.img_size
    torch.nn.Module.__init__(sam)
    sam.image_encoder = torch.nn.Module()
    sam.image_encoder.img_size = 1024
    want = Sam.postprocess_masks(sam, logits, input_size, size)[0, 0]
    got = SamMaskLogits(logits[0, 0].numpy(), input_size, size, 1024).resized(*size)
    assert got.shape == size and got.dtype == bool
    disagree = got != (want > 0).numpy()
    assert float(want.abs().numpy()[disagree].max(initial=0.0)) < 1e-3
    assert disagree.mean() < 1e-4


def test_a_transformer_without_blocks_still_gives_every_box_its_mask():
    """With no two-way block the image never meets the boxes' tokens before the final attention: the image
    side stays at batch 1 and is broadcast to every box."""
    from segment_anything.modeling import TwoWayTransformer

    prompt_encoder, decoder = sam_parts("segment_anything", seed=6)
    decoder.transformer = TwoWayTransformer(depth=0, embedding_dim=256, mlp_dim=2048, num_heads=8).eval()
    embedding, boxes = inputs(3, seed=12)
    want_masks, want_ious = stock(prompt_encoder, decoder, embedding, boxes)
    masks, ious = BoxDecoder(prompt_encoder, decoder)(embedding, boxes)
    torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ious, want_ious, atol=1e-6, rtol=1e-5)
