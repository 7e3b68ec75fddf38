"""SAM's ViT blocks written for OpenVINO's CPU plugin: segment_anything's arithmetic, less data movement.

The converted stock block spends much of its non-matmul time in generic permutes (``unknown_bf16``, a
few GB/s): a windowed block permuted its tokens into windows, split q/k/v and heads, moved q twice
more for the decomposed relative position (``einsum`` becomes a transpose of q on each side), merged
the heads and permuted the windows back. Here, for the exported graphs only (the torch path keeps
``sam_attention``'s SDPA forward):

* the qkv projection runs as three linears (slices of its weight, folded to constants by OpenVINO),
  and each is permuted once, straight from the token grid to (windows, heads, tokens, head_dim): the
  window partition rides on the head split, and no q/k/v split is copied;
* a window's output goes back to the grid and merges its heads in one permute, and the projection
  runs on the cropped grid (per token, so the same values without the padding's rows);
* the relative-position terms are matmuls that read q where it lies (``rel_pos_terms``);
* a window's attention is one SDPA over all heads (the torch path's head chunks bound its memory;
  the graph's whole mask is tens of MB);
* a global block runs its heads one at a time, as the torch path does, each from its own rows of the
  qkv weight, and concatenates their outputs on the channels: no head split or merge at all.

``bench/README.md`` ("Fewer permutes in the OpenVINO graphs") has what each step measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

if TYPE_CHECKING:
    from segment_anything.modeling.image_encoder import Attention as VitAttention
    from segment_anything.modeling.image_encoder import Block

RelPos = tuple[torch.Tensor, torch.Tensor] | None  # rel_h (B, heads, H, W, H), rel_w (B, heads, H, W, W)

# Widest grid whose rel_w is one block-diagonal matmul (below): a window (14) is, a global block (64)
# would multiply 64x the work.
_BLOCK_DIAGONAL_MAX = 16


def linear_rows(linear: nn.Linear, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """The outputs ``rows`` of ``linear`` on ``x`` (..., in): one linear from those rows of its weight (a
    constant in the graph), not a slice of the whole output."""
    return F.linear(x, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def qkv_part(attn: Any, x: torch.Tensor, part: int) -> torch.Tensor:
    """q (0), k (1) or v (2) of a fused qkv projection ``attn.qkv`` (SAM's ViT, Swin) on tokens ``x``
    (..., C): (..., C)."""
    size = attn.qkv.out_features // 3
    return linear_rows(attn.qkv, x, slice(part * size, (part + 1) * size))


def grid_to_windows(t: torch.Tensor, rows: int, cols: int, size: int, heads: int) -> torch.Tensor:
    """Tokens t (B, rows * size, cols * size, heads * d) as (B * windows, heads, size², d), in one permute:
    the window partition and the head split together."""
    b = t.shape[0]
    t = t.reshape(b, rows, size, cols, size, heads, -1)
    return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(b * rows * cols, heads, size * size, -1)


def windows_to_grid(out: torch.Tensor, batch: int, rows: int, cols: int, size: int) -> torch.Tensor:
    """``grid_to_windows``' inverse for attention outputs (B * windows, heads, size², d): (B, rows * size,
    cols * size, heads * d), the head merge and the window merge in one permute."""
    heads = out.shape[1]
    out = out.reshape(batch, rows, cols, heads, size, size, -1).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, rows * size, cols * size, -1)


def rel_pos_terms(attn: VitAttention, q: torch.Tensor, size: tuple[int, int]) -> RelPos:
    """``sam_attention._decomposed_rel_pos``'s terms (the same values) as matmuls OpenVINO runs without
    moving q: q (B, heads, H*W, C) unscaled; None without relative positions.

    rel_h[.., y, x, k] = q[.., y, x] . Rh[y, k] is a matmul batched over the rows y with Rh broadcast;
    rel_w[.., y, x, k] = q[.., y, x] . Rw[x, k] is, on a narrow grid, one matmul of each row's (x, c)
    block with the block-diagonal of Rw (zeros elsewhere, so the same sums), and on a wide one a
    matmul batched over the columns, on q with rows and columns swapped.
    """
    if not attn.use_rel_pos:
        return None
    b, heads, _, c = q.shape
    h, w = size
    rh = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)  # (H, H, C); a constant in the graph
    rw = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)  # (W, W, C)
    grid = q.reshape(b * heads, h, w, c)
    rel_h = grid @ rh.transpose(1, 2)  # (BH, H, W, C) @ (H, C, H)
    if w <= _BLOCK_DIAGONAL_MAX:
        eye = torch.eye(w, dtype=q.dtype, device=q.device)
        diagonal = (rw.transpose(1, 2)[:, :, None, :] * eye[:, None, :, None]).reshape(w * c, w * w)
        rel_w = (grid.reshape(b * heads, h, w * c) @ diagonal).view(b * heads, h, w, w)
    else:
        rel_w = (grid.transpose(1, 2) @ rw.transpose(1, 2)).transpose(1, 2)
    return rel_h.view(b, heads, h, w, h), rel_w.view(b, heads, h, w, w)


def global_qkv(attn: VitAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RelPos]:
    """q, k, v (B, heads, N, head_dim) of a global block's attention on x (B, H, W, C), N = H * W, and
    its relative-position terms (or None)."""
    b, h, w, _ = x.shape
    q, k, v = (qkv_part(attn, x, i).view(b, h * w, attn.num_heads, -1).transpose(1, 2) for i in range(3))
    return q, k, v, rel_pos_terms(attn, q, (h, w))


def merge_heads(attn: VitAttention, out: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The output projection of attention ``out`` (B, heads, N, head_dim): (B, H, W, C)."""
    return attn.proj(out.transpose(1, 2).reshape(out.shape[0], *grid, -1))


def head_qkv(attn: VitAttention, tokens: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, 1, N, head_dim) of one head, each from that head's rows of the qkv weight, on tokens
    (B, N, C): no head split to permute when the heads run one at a time (global blocks)."""
    channels = attn.qkv.in_features
    size = channels // attn.num_heads

    def part(i: int) -> torch.Tensor:
        rows = slice(i * channels + head * size, i * channels + (head + 1) * size)
        return linear_rows(attn.qkv, tokens, rows)[:, None]

    return part(0), part(1), part(2)


def global_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's Block.forward for window_size == 0 on x (B, H, W, C), one head at a time (as
    ``sam_attention._sdpa`` runs a global block: its N x N mask per head): each head's q, k, v from its
    own linears and its output concatenated on the channels, so no head is split or merged by a permute."""
    attn = block.attn
    b, h, w, c = x.shape
    n = h * w
    tokens = block.norm1(x).reshape(b, n, c)
    outs: list[torch.Tensor] = []
    for head in range(attn.num_heads):
        q, k, v = head_qkv(attn, tokens, head)
        rel = rel_pos_terms(attn, q, (h, w))
        mask = None if rel is None else (rel[0][..., :, None] + rel[1][..., None, :]).reshape(b, 1, n, n)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)[:, 0])
    x = x + attn.proj(torch.cat(outs, dim=-1).view(b, h, w, c))
    return x + block.mlp(block.norm2(x))


def windowed_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's Block.forward for window_size > 0 on x (B, H, W, C): the grid padded at the
    bottom/right to whole windows (with zeros after norm1, as ``window_partition``), attention within
    each window, the padding cropped."""
    attn, size = block.attn, int(block.window_size)
    b, h, w, c = x.shape
    rows, cols, heads = -(-h // size), -(-w // size), attn.num_heads
    tokens = F.pad(block.norm1(x), (0, 0, 0, cols * size - w, 0, rows * size - h))

    q, k, v = (grid_to_windows(qkv_part(attn, tokens, part), rows, cols, size, heads) for part in range(3))
    rel = rel_pos_terms(attn, q, (size, size))
    mask = None
    if rel is not None:  # SAM adds the terms (from the unscaled q) after scaling: the mask is them as they are
        n = size * size
        mask = (rel[0][..., :, None] + rel[1][..., None, :]).reshape(b * rows * cols, heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    out = windows_to_grid(out, b, rows, cols, size)[:, :h, :w]
    x = x + attn.proj(out)
    return x + block.mlp(block.norm2(x))


def run_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` (segment_anything's Block on x (B, H, W, C)) in this module's layouts."""
    return windowed_block(block, x) if block.window_size > 0 else global_block(block, x)
