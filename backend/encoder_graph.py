"""SAM's ViT image encoder as one exportable graph that also returns the explanation's reductions.

The torch path records attention through a ``ContextVar`` sink that copies tensors to numpy inside
the forward (``sam_attention.capture_encoder_attention``); an exported graph can have no such side
effect, so here the same reductions are graph outputs instead: for every global block the attention
each token receives from the image's own (unpadded) queries, and for the last global block the
head-averaged matrix (float16) and its plain column mean. One compiled pass then gives the features
and everything ``segmenter.EncoderAttention`` holds. Windowed blocks run as the encoder's own
modules (SDPA once ``sam_attention.use_fast_attention`` patched them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import sam_attention

if TYPE_CHECKING:
    from segment_anything.modeling.image_encoder import Attention as VitAttention

    from .encoder_runtime import ImageEncoder


def global_block_indices(image_encoder: ImageEncoder) -> tuple[int, ...]:
    """Indices of the encoder's global-attention blocks (window_size == 0); () for other encoders."""
    if not sam_attention.supports_encoder_attention(image_encoder):
        return ()
    return tuple(i for i, block in enumerate(image_encoder.blocks) if block.window_size == 0)


def _attention_with_mean(attn: VitAttention, x: torch.Tensor, head_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's global attention (q.k * scale + decomposed rel-pos, softmax, @ v), ``head_chunk`` heads at a
    time so no (B, heads, N, N) tensor exists; also returns the head-averaged softmax (B, N, N)."""
    b, h, w, _ = x.shape
    heads, n = attn.num_heads, h * w
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    rel = sam_attention._decomposed_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)) if attn.use_rel_pos else None
    outs: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    for h0 in range(0, heads, head_chunk):
        h1 = min(h0 + head_chunk, heads)
        q_heads = q[:, h0:h1]
        if total is not None:
            # Adds zero, but makes these heads wait for the previous ones: without the dependency
            # OpenVINO's memory plan keeps every head's N x N softmax of the block alive at once
            # (measured on a vit_b global block in bf16: +1.66 GiB, against +0.70 GiB with it).
            q_heads = q_heads + total[:, :1, :1, None] * 0.0
        logits = (q_heads * attn.scale) @ k[:, h0:h1].transpose(-2, -1)
        if rel is not None:
            rel_h, rel_w = rel[0][:, h0:h1, ..., :, None], rel[1][:, h0:h1, ..., None, :]
            logits = (logits.view(b, h1 - h0, h, w, h, w) + rel_h + rel_w).view(b, h1 - h0, n, n)
        probs = logits.softmax(dim=-1)
        outs.append(probs @ v[:, h0:h1])
        part = probs.sum(dim=1)
        total = part if total is None else total + part
    assert total is not None
    out = torch.cat(outs, dim=1).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out), total / heads


class CapturingEncoder(nn.Module):
    """``forward(image, query_weights)`` -> (features, received of each global block..., last block's
    column mean, last block's matrix as float16).

    ``query_weights`` is (B, N), N = H_tok * W_tok: 1/count on the tokens that saw real pixels, 0 on
    the padding, so ``query_weights @ matrix`` is ``sam_attention.mask_attention_map(block, valid)``.
    Shares the wrapped encoder's parameters (no copy).
    """

    encoder: ImageEncoder

    def __init__(self, image_encoder: ImageEncoder, head_chunk: int = 1) -> None:
        super().__init__()
        self.encoder = image_encoder
        self.global_blocks = global_block_indices(image_encoder)
        if not self.global_blocks:
            raise ValueError(f"{type(image_encoder).__name__} has no global-attention blocks to capture")
        self.head_chunk = head_chunk

    def forward(self, image: torch.Tensor, query_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoder = self.encoder
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        received: list[torch.Tensor] = []
        last = self.global_blocks[-1]
        matrix = x  # replaced at the last global block (there is at least one)
        for i, block in enumerate(encoder.blocks):
            if i not in self.global_blocks:
                x = block(x)
                continue
            # segment_anything's Block.forward for window_size == 0, with the attention's mean kept.
            attended, matrix = _attention_with_mean(block.attn, block.norm1(x), self.head_chunk)
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            received.append(torch.bmm(query_weights[:, None, :], matrix)[:, 0])
            if i == last:
                break
        for block in encoder.blocks[last + 1 :]:  # SAM ends on a global block; structural copies may not
            x = block(x)
        features = encoder.neck(x.permute(0, 3, 1, 2))
        return (features, *received, matrix.mean(dim=1), matrix.to(torch.float16))
