"""SAM's prompt encoder and mask decoder for many boxes on one image, with the image side done once.

segment_anything's ``MaskDecoder.predict_masks`` copies the image embedding, its positional encoding and
the dense prompt once per box (``repeat_interleave``) and then runs every image-side step once per box, on
tensors whose token-major view is a strided transpose; under CPU autocast each of those steps also casts
image-sized tensors between bf16 and fp32. On 2 cores that was ~0.45 s for 8 boxes, most of it copies
and broadcast adds, not products (bench/README.md, "SAM's mask decoder"). ``BoxDecoder`` runs the same
modules with three changes that keep the arithmetic:

* the image side enters the two-way transformer once (batch 1) and broadcasts against each box's tokens:
  the first block's image projections (the token-to-image keys and values, the image-to-token queries)
  are computed once, and the boxes' image tokens part only where they attend to their own tokens;
* in token-major memory (``channels_last`` in, so the transformer's flatten + permute is a view), which
  is also the layout the output upscaling's transposed convolutions read best;
* the decoder's weights held in the compute dtype (a copy for bf16 / fp16) instead of autocast, so no
  image-sized cast is made per step; only the box prompts' small encoder stays in float32.

Only the mask this engine returns (SAM's single-mask output: mask token 0) goes through its hypernetwork
and the final product. The modules are SAM's own (or a structural copy's, MobileSAM's), so
``decoder_attention.capture_decoder_attention(box_decoder.mask_decoder)`` records the same maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
from torch import nn


class PromptEncoder(Protocol):
    """What ``BoxDecoder`` uses of SAM's PromptEncoder."""

    def __call__(self, points: None, boxes: torch.Tensor, masks: None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_dense_pe(self) -> torch.Tensor: ...


class MaskDecoderParts(Protocol):
    """What ``BoxDecoder`` uses of SAM's MaskDecoder (segment_anything's, or MobileSAM's copy of it)."""

    transformer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    iou_token: nn.Embedding
    mask_tokens: nn.Embedding
    output_upscaling: Callable[[torch.Tensor], torch.Tensor]
    output_hypernetworks_mlps: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    iou_prediction_head: Callable[[torch.Tensor], torch.Tensor]


class BoxDecoder:
    """Box prompts -> low-resolution mask logits and predicted IoUs, for one image embedding.

    Equals ``Sam.prompt_encoder(boxes=...)`` + ``Sam.mask_decoder(..., multimask_output=False)`` up to float
    rounding (the same products, shared where every box computes the same thing).
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: nn.Module, dtype: torch.dtype = torch.float32
                 ) -> None:
        """
        Arguments:
          prompt_encoder: SAM's PromptEncoder (kept as it is: its box embedding is tiny).
          mask_decoder: SAM's MaskDecoder or a structural copy (``transformer``, ``iou_token``,
            ``mask_tokens``, ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``).
          dtype: the compute dtype; the decoder is copied into it when its weights are in another.
        """
        needed = ("transformer", "iou_token", "mask_tokens", "output_upscaling", "output_hypernetworks_mlps",
                  "iou_prediction_head")
        missing = [name for name in needed if not hasattr(mask_decoder, name)]
        if missing:
            raise ValueError(f"expected a SAM MaskDecoder; {type(mask_decoder).__qualname__} has no {missing}")
        self.prompt_encoder = prompt_encoder
        weights_dtype = next(mask_decoder.parameters()).dtype
        self.mask_decoder = mask_decoder if weights_dtype == dtype else copy.deepcopy(mask_decoder).to(dtype)
        self._parts = cast(MaskDecoderParts, self.mask_decoder)
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, image_embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embedding: (1, C, h, w) the image encoder's output, any float dtype.
          boxes: (B, 4) xyxy boxes in SAM's input frame (``ResizeLongestSide.apply_boxes_torch``), B >= 1.
        Returns:
          (low-resolution mask logits (B, 4h, 4w), predicted IoUs (B,)), both float32.
        """
        if image_embedding.dim() != 4 or image_embedding.shape[0] != 1:
            raise ValueError(f"image_embedding must be (1, C, h, w), got {tuple(image_embedding.shape)}")
        decoder, dtype = self._parts, self.dtype
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        # Without a mask prompt, every box's dense prompt is the same no-mask embedding (an expanded view).
        channels_last = torch.channels_last
        image = (image_embedding.to(dense.dtype) + dense[:1]).to(dtype).contiguous(memory_format=channels_last)
        image_pe = self.prompt_encoder.get_dense_pe().to(dtype).contiguous(memory_format=channels_last)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse.to(dtype)), dim=1)
        token_out, image_out = decoder.transformer(image, image_pe, tokens)  # (B, tokens, C), (B, h * w, C)
        batch, (channels, height, width) = image_out.shape[0], image.shape[1:]
        # (B, h * w, C) -> (B, C, h, w) as a view: channels_last memory, as the convolutions read it.
        upscaled = decoder.output_upscaling(image_out.transpose(1, 2).view(batch, channels, height, width))
        hyper = decoder.output_hypernetworks_mlps[0](token_out[:, 1, :])  # mask token 0: the single mask
        masks = torch.bmm(hyper.unsqueeze(1), upscaled.flatten(2)).view(batch, *upscaled.shape[-2:])
        ious = decoder.iou_prediction_head(token_out[:, 0, :])[:, 0]
        return masks.float(), ious.float()
