"""SAM's ViT image encoder as one exportable graph that also returns the explanation's reductions.

The torch path records attention through a ``ContextVar`` sink that copies tensors to numpy inside
the forward (``sam_attention.capture_encoder_attention``); an exported graph can have no such side
effect, so here the same reductions are graph outputs instead: for every global block the attention
each token receives from the image's own (unpadded) queries, and for the last global block the
head-averaged matrix (float16) and its plain column mean. One compiled pass then gives the features
and everything ``segmenter.EncoderAttention`` holds. The attention is laid out for OpenVINO's CPU
plugin (``_attention_received`` and ``_attention_matrix`` say what each layout measured), or, with the
project's operations library, as one node per global block that never writes the N x N probabilities
(``attention="fused"``: ``global_attention``). Every block runs in ``encoder_blocks``' layouts (fewer
permutes than the stock modules convert to); ``PlainEncoder`` is the features-only graph in the same
layouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from . import sam_attention
from .encoder_blocks import RelPos, global_qkv, head_qkv, merge_heads, qkv_part, rel_pos_terms, run_block
from .global_attention import fused_global_attention, fused_global_attention_matrix

if TYPE_CHECKING:
    from segment_anything.modeling.image_encoder import Attention as VitAttention

    from .encoder_runtime import ImageEncoder


def global_block_indices(image_encoder: ImageEncoder) -> tuple[int, ...]:
    """Indices of the encoder's global-attention blocks (window_size == 0); () for other encoders."""
    if not sam_attention.supports_encoder_attention(image_encoder):
        return ()
    return tuple(i for i, block in enumerate(image_encoder.blocks) if block.window_size == 0)


def _softmax(attn: VitAttention, q: torch.Tensor, k: torch.Tensor, rel: RelPos,
             heads: slice, rows: slice, grid: tuple[int, int]) -> torch.Tensor:
    """SAM's attention weights softmax((q * scale) @ k^T + rel_h + rel_w) for ``heads`` and the queries of
    grid ``rows``: (B, heads, rows * W, N)."""
    b, (h, w), n = q.shape[0], grid, grid[0] * grid[1]
    c, r = heads.stop - heads.start, rows.stop - rows.start
    logits = (q[:, heads, rows.start * w : rows.stop * w] * attn.scale) @ k[:, heads].transpose(-2, -1)
    if rel is not None:
        rel_h, rel_w = rel[0][:, heads, rows, ..., :, None], rel[1][:, heads, rows, ..., None, :]
        logits = (logits.view(b, c, r, w, h, w) + rel_h + rel_w).view(b, c, r * w, n)
    return logits.softmax(dim=-1)


def _after(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``x`` plus zero, made to depend on ``previous``: without the dependency OpenVINO's memory plan
    keeps every step's N x N softmax of a block alive at once (measured on a vit_b global block in
    bf16: +1.66 GiB, against +0.70 GiB with it)."""
    return x if previous is None else x + previous[:, :1, None, None] * 0.0


def _attention_received(attn: VitAttention, x: torch.Tensor, query_weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's global attention one head at a time, and the attention each key receives from the
    weighted queries, head-averaged: (B, N) = mean_h query_weights @ softmax_h.

    No (N x N) head sum is kept: each head's weights reduce to a vector right away. Measured on a
    vit_b global block in OpenVINO bf16: as fast as the plain graph (0.89 vs 0.88 s), where summing the
    heads' matrices cost 1.39 s (a copy per head for the sum, and f32 conversions of the sum). Each
    head's q, k, v come from its own rows of the qkv weight (``encoder_blocks.head_qkv``) and the
    outputs are concatenated on the channels: no head split or merge to permute.
    """
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    outs: list[torch.Tensor] = []
    received: torch.Tensor | None = None
    for i in range(attn.num_heads):
        q, k, v = head_qkv(attn, tokens, i)
        rel = rel_pos_terms(attn, q, (h, w))
        probs = _softmax(attn, _after(q, received), k, rel, slice(0, 1), slice(0, h), (h, w))
        outs.append((probs @ v)[:, 0])
        part = (query_weights[:, None, None, :] @ probs)[:, 0, 0]
        received = part if received is None else received + part
    assert received is not None
    return attn.proj(torch.cat(outs, dim=-1).view(b, h, w, c)), received / attn.num_heads


def _attention_matrix(attn: VitAttention, x: torch.Tensor, query_weights: torch.Tensor, band: int
                      ) -> tuple[torch.Tensor, ...]:
    """SAM's global attention ``band`` token rows of queries at a time, all heads together, so each
    band's head mean is final when made (no N x N sum read and written once per head).

    Returns (block output, received (B, N) = query_weights @ matrix, column mean (B, N), matrix
    (B, N, N) float16). The head sum is a matmul with 1/heads (a ReduceSum kept the softmax in f32 in
    OpenVINO bf16, with conversions both ways). Measured on a vit_b global block in OpenVINO bf16:
    1.50 s against 1.25 s plain (the per-head N x N sum it replaces: 2.08 s).
    """
    b, h, w, _ = x.shape
    n = h * w
    q, k, v, rel = global_qkv(attn, x)
    heads = attn.num_heads
    outs: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    received: torch.Tensor | None = None
    column_sum: torch.Tensor | None = None
    for r0 in range(0, h, band):
        r1 = min(r0 + band, h)
        count = (r1 - r0) * w
        probs = _softmax(attn, _after(q, received), k, rel, slice(0, heads), slice(r0, r1), (h, w))
        outs.append(probs @ v)
        mean = torch.full((b, 1, heads), 1.0 / heads, dtype=probs.dtype) @ probs.reshape(b, heads, count * n)
        mean = mean.view(b, count, n)
        rows.append(mean.to(torch.float16))
        part = (query_weights[:, None, r0 * w : r1 * w] @ mean)[:, 0]
        column = (torch.ones((b, 1, count), dtype=mean.dtype) @ mean)[:, 0]
        received = part if received is None else received + part
        column_sum = column if column_sum is None else column_sum + column
    assert received is not None and column_sum is not None
    out = merge_heads(attn, torch.cat(outs, dim=2), (h, w))
    return out, received, column_sum / n, torch.cat(rows, dim=1)


def _attention_fused(attn: VitAttention, x: torch.Tensor, query_weights: torch.Tensor, matrix: bool, bf16: bool
                     ) -> tuple[torch.Tensor, ...]:
    """SAM's global attention on x (B, H, W, C) as the library's one node (``global_attention``): q, k and v
    straight from their linears (heads on the channels), the relative-position terms as matmuls.

    Returns (block output, received) and, with ``matrix``, the column mean and the matrix, as
    ``_attention_matrix``.
    """
    b, h, w, c = x.shape
    n, heads = h * w, attn.num_heads
    q, k, v = (qkv_part(attn, x, part).reshape(b, n, c) for part in range(3))
    rel = rel_pos_terms(attn, q.view(b, n, heads, -1).transpose(1, 2), (h, w))
    if rel is None:  # no relative positions: terms of zero
        rel = (q.new_zeros(b, heads, n, h), q.new_zeros(b, heads, n, w))
    rel_h, rel_w = rel[0].reshape(b, heads, n, h), rel[1].reshape(b, heads, n, w)
    op = fused_global_attention_matrix if matrix else fused_global_attention
    out, *reductions = op(q, k, v, rel_h, rel_w, query_weights, heads, float(attn.scale), bf16)
    return (attn.proj(out.view(b, h, w, c)), *reductions)


AttentionForm = Literal["explicit", "fused"]


class CapturingEncoder(nn.Module):
    """``forward(image, query_weights)`` -> (features, received of each global block..., last block's
    column mean, last block's matrix as float16).

    ``query_weights`` is (B, N), N = H_tok * W_tok: 1/count on the tokens that saw real pixels, 0 on
    the padding, so ``query_weights @ matrix`` is ``sam_attention.mask_attention_map(block, valid)``.
    Only the last global block builds the head-averaged matrix (``band`` token rows of queries at a
    time); the others reduce each head's weights to ``received`` directly. ``attention="fused"`` runs
    each global block as the operations library's node instead (``bf16``: its products in bf16, for a
    graph compiled at bf16). Shares the wrapped encoder's parameters (no copy).
    """

    encoder: ImageEncoder

    def __init__(self, image_encoder: ImageEncoder, band: int = 8, attention: AttentionForm = "explicit",
                 bf16: bool = False) -> None:
        super().__init__()
        self.encoder = image_encoder
        self.global_blocks = global_block_indices(image_encoder)
        if not self.global_blocks:
            raise ValueError(f"{type(image_encoder).__name__} has no global-attention blocks to capture")
        if band < 1:
            raise ValueError(f"band must be >= 1 token row, got {band}")
        if attention not in ("explicit", "fused"):
            raise ValueError(f"attention must be 'explicit' or 'fused', got {attention!r}")
        self.band = band
        self.attention = attention
        self.bf16 = bf16

    def forward(self, image: torch.Tensor, query_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoder = self.encoder
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        received: list[torch.Tensor] = []
        last = self.global_blocks[-1]
        column_mean = matrix = x  # replaced at the last global block (there is at least one)
        for i, block in enumerate(encoder.blocks):
            if i not in self.global_blocks:
                x = run_block(block, x)
                continue
            # segment_anything's Block.forward for window_size == 0, with the attention's reductions kept.
            if self.attention == "fused":
                attended, got, *rest = _attention_fused(block.attn, block.norm1(x), query_weights, i == last,
                                                        self.bf16)
                if i == last:
                    column_mean, matrix = rest
            elif i == last:
                attended, got, column_mean, matrix = _attention_matrix(block.attn, block.norm1(x), query_weights,
                                                                       self.band)
            else:
                attended, got = _attention_received(block.attn, block.norm1(x), query_weights)
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            received.append(got)
            if i == last:
                break
        for block in encoder.blocks[last + 1 :]:  # SAM ends on a global block; structural copies may not
            x = run_block(block, x)
        features = encoder.neck(x.permute(0, 3, 1, 2))
        return (features, *received, column_mean, matrix)


class PlainEncoder(nn.Module):
    """``forward(image)`` -> features (B, C_out, H_tok, W_tok): ImageEncoderViT.forward with every block in
    ``encoder_blocks``' layouts, the plain graph's module. Shares the wrapped encoder's parameters."""

    encoder: ImageEncoder

    def __init__(self, image_encoder: ImageEncoder) -> None:
        super().__init__()
        if not sam_attention.supports_encoder_attention(image_encoder):
            raise ValueError(f"{type(image_encoder).__name__} is not SAM's ViT encoder")
        self.encoder = image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = run_block(block, x)
        return encoder.neck(x.permute(0, 3, 1, 2))
