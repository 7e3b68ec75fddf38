"""SAM's global-block attention with the explanation's reductions, as one exportable operation.

``gsam::global_attention`` (and ``gsam::global_attention_matrix``, which also returns the last block's
head-averaged matrix) is what the capture graph exports for a global block when the project's OpenVINO
operations library is there (``encoder_graph.CapturingEncoder(attention="fused")``); ``openvino_ops``
converts it to the C++ kernel in ``backend/csrc/global_attention.cpp``, which keeps each block of queries'
probabilities in cache and reduces them there instead of writing N x N tensors per head. On torch the
operation runs segment_anything's arithmetic (the reference the kernel is tested against), one head at a
time so its memory stays one head's N x N.
"""

from __future__ import annotations

import torch


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
              query_weights: torch.Tensor, heads: int, scale: float, matrix: bool) -> tuple[torch.Tensor, ...]:
    """segment_anything's global attention and the reductions the explanation keeps.

    Arguments:
      q, k, v: (B, N, heads * d), N = H * W tokens, heads on the channels (q unscaled).
      rel_h: (B, heads, N, H), rel_w: (B, heads, N, W): the decomposed relative-position terms of each
        query by key row and key column (``encoder_blocks.rel_pos_terms``), added after the scaling.
      query_weights: (B, N), each query's weight in ``received``.
      heads: attention heads; scale: the attention's scale (head_dim ** -0.5).
      matrix: also return the column mean and the head-averaged matrix.
    Returns:
      out (B, N, heads * d); received (B, N) = mean_h query_weights @ P_h; and with ``matrix`` the
      column mean (B, N) = mean over queries of mean_h P_h, and mean_h P_h (B, N, N) float16.
    """
    b, n, channels = q.shape
    grid_h, grid_w = rel_h.shape[-1], rel_w.shape[-1]
    width = channels // heads
    outs: list[torch.Tensor] = []
    received = q.new_zeros(b, n)
    mean = q.new_zeros(b, n, n) if matrix else None
    for h in range(heads):
        part = slice(h * width, (h + 1) * width)
        logits = (q[..., part] * scale) @ k[..., part].transpose(-2, -1)
        terms = rel_h[:, h, :, :, None] + rel_w[:, h, :, None, :]  # (B, N, H, W): key j = row * W + column
        probs = (logits + terms.reshape(b, n, grid_h * grid_w)).softmax(dim=-1)
        outs.append(probs @ v[..., part])
        received = received + (query_weights[:, None, :] @ probs)[:, 0] / heads
        if mean is not None:
            mean = mean + probs / heads
    out = torch.cat(outs, dim=-1)
    if mean is None:
        return out, received
    return out, received, mean.mean(dim=1), mean.to(torch.float16)


@torch.library.custom_op("gsam::global_attention", mutates_args=())
def fused_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                           rel_w: torch.Tensor, query_weights: torch.Tensor, heads: int, scale: float,
                           bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A global block's attention and its ``received`` map (``reference``, matrix=False), one operation.
    ``bf16``: the kernel's products run in bf16 (on AMX tiles; set for graphs compiled at bf16)."""
    out, received = reference(q, k, v, rel_h, rel_w, query_weights, heads, scale, matrix=False)
    return out, received


@fused_global_attention.register_fake
def _fused_global_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                                  rel_w: torch.Tensor, query_weights: torch.Tensor, heads: int, scale: float,
                                  bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:2])


@torch.library.custom_op("gsam::global_attention_matrix", mutates_args=())
def fused_global_attention_matrix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                                  rel_w: torch.Tensor, query_weights: torch.Tensor, heads: int, scale: float,
                                  bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_global_attention`` that also returns the column mean and the head-averaged matrix (float16)."""
    out, received, column_mean, mean = reference(q, k, v, rel_h, rel_w, query_weights, heads, scale, matrix=True)
    return out, received, column_mean, mean


@fused_global_attention_matrix.register_fake
def _fused_global_attention_matrix_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                                         rel_w: torch.Tensor, query_weights: torch.Tensor, heads: int, scale: float,
                                         bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, n), q.new_empty(b, n), q.new_empty(b, n, n, dtype=torch.float16)
