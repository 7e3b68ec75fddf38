"""SAM's prompt encoder and mask decoder for many boxes on one image, with the image side done once.

segment_anything's ``MaskDecoder.predict_masks`` copies the image embedding, its positional encoding and
the dense prompt once per box (``repeat_interleave``) and then runs every image-side step once per box, on
tensors whose token-major view is a strided transpose; under CPU autocast each of those steps also casts
image-sized tensors between bf16 and fp32. On 2 cores that was ~0.45 s for 8 boxes, most of it copies,
broadcast adds and softmaxes, not products (bench/README.md, "SAM's mask decoder for many boxes").
``BoxDecoder`` runs the same modules' weights through the same arithmetic, arranged for many boxes:

* the image side enters the two-way transformer once (batch 1) and broadcasts against each box's tokens:
  the first block's image projections (the token-to-image keys and values, the image-to-token queries)
  are computed once, and the boxes' image tokens part only where they attend to their own tokens;
* in token-major memory (``channels_last`` in, so the transformer's flatten + permute is a view), which
  is also the layout the output upscaling's transposed convolutions read best; its channel layer norm
  then runs as ``F.layer_norm`` over the last axis (SAM's LayerNorm2d takes five passes over the map);
* the image-to-token attention's softmax over a box's few tokens taken along the second-last axis of
  the transposed logits (torch's softmax over a last axis of 7 was 4x slower), the blocks' token-to-image
  attention as ``F.scaled_dot_product_attention`` (no transposed copy of the image keys), and each
  block's ``keys + key_pe`` formed once (SAM forms it twice with the same keys);
* the decoder's weights held in the compute dtype (a copy for bf16 / fp16) instead of autocast, so no
  image-sized cast is made per step; only the box prompts' small encoder stays in float32.

Only the mask this engine returns (SAM's single-mask output: mask token 0) goes through its hypernetwork
and the final product. The final token-to-image attention is called as SAM's module, so
``decoder_attention.capture_decoder_attention(box_decoder.mask_decoder)`` records the same maps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn


class PromptEncoder(Protocol):
    """What ``BoxDecoder`` uses of SAM's PromptEncoder."""

    def __call__(self, points: None, boxes: torch.Tensor, masks: None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_dense_pe(self) -> torch.Tensor: ...


class ChannelNorm(Protocol):
    """SAM's LayerNorm2d: per-pixel normalisation over the channels of an NCHW map."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


class TokenAttention(Protocol):
    """SAM's transformer.Attention: projections to ``num_heads`` heads (of a possibly downsampled width)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    num_heads: int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class TwoWayBlock(Protocol):
    """SAM's TwoWayAttentionBlock."""

    self_attn: TokenAttention
    cross_attn_token_to_image: TokenAttention
    cross_attn_image_to_token: TokenAttention
    mlp: Callable[[torch.Tensor], torch.Tensor]
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    norm3: nn.LayerNorm
    norm4: nn.LayerNorm
    skip_first_layer_pe: bool


class TwoWayTransformer(Protocol):
    """SAM's TwoWayTransformer."""

    layers: Sequence[TwoWayBlock]
    final_attn_token_to_image: TokenAttention
    norm_final_attn: nn.LayerNorm


class MaskDecoderParts(Protocol):
    """What ``BoxDecoder`` uses of SAM's MaskDecoder (segment_anything's, or MobileSAM's copy of it)."""

    transformer: TwoWayTransformer
    iou_token: nn.Embedding
    mask_tokens: nn.Embedding
    output_upscaling: Sequence[Callable[[torch.Tensor], torch.Tensor]]
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
        token_out, image_out = two_way_transformer(decoder.transformer, image, image_pe, tokens)
        image_out = image_out.expand(token_out.shape[0], -1, -1)  # a view; batch 1 only where no block ran
        batch, (channels, height, width) = image_out.shape[0], image.shape[1:]
        # (B, h * w, C) -> (B, C, h, w) as a view: channels_last memory, as the convolutions read it.
        upscaled = upscale(decoder.output_upscaling, image_out.transpose(1, 2).view(batch, channels, height, width))
        hyper = decoder.output_hypernetworks_mlps[0](token_out[:, 1, :])  # mask token 0: the single mask
        masks = torch.bmm(hyper.unsqueeze(1), upscaled.flatten(2)).view(batch, *upscaled.shape[-2:])
        ious = decoder.iou_prediction_head(token_out[:, 0, :])[:, 0]
        return masks.float(), ious.float()


def two_way_transformer(transformer: TwoWayTransformer, image: torch.Tensor, image_pe: torch.Tensor,
                        tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_anything's TwoWayTransformer.forward (and its blocks'), with the image at batch 1 until each
    box's tokens have written into it.

    Arguments:
      transformer: SAM's TwoWayTransformer.
      image: (1, C, h, w) the image embedding plus the dense prompt (channels_last: a token-major view).
      image_pe: (1, C, h, w) its positional encoding.
      tokens: (B, N, C) each box's output and prompt tokens (also their positional embedding, as in SAM).
    Returns:
      (tokens (B, N, C), image tokens (B, h * w, C), or (1, h * w, C) where no block ran).
    """
    keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for block in transformer.layers:
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        queries = block.norm1(queries)
        k = keys + key_pe  # SAM forms this twice per block with the same keys
        q = queries + tokens
        queries = block.norm2(queries + tokens_to_image(block.cross_attn_token_to_image, q, k, keys))
        queries = block.norm3(queries + block.mlp(queries))
        q = queries + tokens
        keys = block.norm4(keys + image_to_tokens(block.cross_attn_image_to_token, k, q, queries))
    q = queries + tokens
    k = keys + key_pe
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))
    return queries, keys


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, D) -> (b, heads, n, D / heads), a view, as SAM's Attention._separate_heads."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, heads, n, d) -> (b, n, heads * d), as SAM's Attention._recombine_heads."""
    return x.transpose(1, 2).flatten(2)


def tokens_to_image(attention: TokenAttention, tokens: torch.Tensor, image_keys: torch.Tensor,
                    image_values: torch.Tensor) -> torch.Tensor:
    """SAM's Attention.forward with a box's tokens as queries and the image tokens as keys and values, as
    ``F.scaled_dot_product_attention`` (SAM's 1 / sqrt(head width) scale): the same softmax, without
    SAM's copy of the keys transposed per head (4.4 ms per call for 8 boxes in fp32; the attention 13 ->
    3 ms).

    Arguments:
      attention: the block's ``cross_attn_token_to_image``.
      tokens: (B, N, C) the box's tokens plus their positional embedding.
      image_keys, image_values: (1 or B, I, C) image tokens (keys: plus their positional encoding).
    Returns:
      (B, N, C) the attention's output for every token of every box.
    """
    heads, batch = attention.num_heads, tokens.shape[0]
    queries = split_heads(attention.q_proj(tokens), heads)
    keys = split_heads(attention.k_proj(image_keys), heads).expand(batch, -1, -1, -1)
    values = split_heads(attention.v_proj(image_values), heads).expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(queries, keys, values)  # (B, heads, N, D / heads)
    return attention.out_proj(merge_heads(out))


def image_to_tokens(attention: TokenAttention, image: torch.Tensor, token_keys: torch.Tensor,
                    token_values: torch.Tensor) -> torch.Tensor:
    """SAM's Attention.forward with the image tokens as queries and a box's few tokens as keys, the logits
    held transposed: the softmax runs over the second-last axis (the tokens), the same numbers.

    Arguments:
      attention: the block's ``cross_attn_image_to_token``.
      image: (1 or B, I, C) image tokens plus their positional encoding.
      token_keys, token_values: (B, N, C) the box's tokens (keys: plus their positional embedding).
    Returns:
      (B, I, C) the attention's output for every image token of every box.
    """
    heads = attention.num_heads
    queries = split_heads(attention.q_proj(image), heads)
    keys, values = split_heads(attention.k_proj(token_keys), heads), split_heads(attention.v_proj(token_values), heads)
    logits = (keys @ queries.transpose(-1, -2)) / math.sqrt(queries.shape[-1])  # (B, heads, N, I)
    out = torch.softmax(logits, dim=-2).transpose(-1, -2) @ values  # (B, heads, I, D / heads)
    return attention.out_proj(merge_heads(out))


def upscale(layers: Sequence[Callable[[torch.Tensor], torch.Tensor]], image: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` (transposed convolutions, LayerNorm2d, activations) in order, each
    LayerNorm2d as ``F.layer_norm`` over the channels of the channels_last map (the same normalisation:
    biased variance, its eps)."""
    for layer in layers:
        if type(layer).__name__ == "LayerNorm2d":  # segment_anything's and MobileSAM's (the same class)
            norm = cast(ChannelNorm, layer)
            image = F.layer_norm(image.permute(0, 2, 3, 1), (image.shape[1],), norm.weight, norm.bias,
                                 norm.eps).permute(0, 3, 1, 2)
        else:
            image = layer(image)
    return image
