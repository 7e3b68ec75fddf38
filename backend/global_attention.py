"""SAM's global-block attention with the explanation's reductions, as one exportable operation.

``gsam::global_attention`` (and ``gsam::global_attention_matrix``, which also returns the last block's
head-averaged matrix) is what the capture graph exports for a global block when the project's OpenVINO
operations library is there (``encoder_graph.CapturingEncoder(attention="fused")``); ``openvino_ops``
converts it to the C++ kernel in ``backend/csrc/global_attention.cpp``, which keeps each block of queries'
probabilities in cache and reduces them there instead of writing N x N tensors per head. On torch the
operation runs segment_anything's arithmetic (the reference the kernel is tested against), one head at a
time so its memory stays one head's N x N.

``LibraryAttention`` calls the same kernel from torch on CPU (ctypes, ``gsam_global_attention``): the
torch runtime's explanation capture (``sam_attention.capture_encoder_reductions``) runs each global
block through it, so explanations cost about what the plain forward does there too. On GPUs that capture
runs ``TorchAttention``, the same reductions in torch ops on the device.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Protocol

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


class GlobalAttentionKernel(Protocol):
    """A global block's attention with the explanation's reductions (``reference``'s arithmetic)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 query_weights: torch.Tensor, heads: int, scale: float, bf16: bool, matrix: bool
                 ) -> tuple[torch.Tensor, ...]:
        """``reference``'s arguments and results; ``bf16``: the products in bf16 with f32 sums."""
        ...


class TorchAttention:
    """``GlobalAttentionKernel`` in torch ops on the tensors' own device: what the torch runtime's explanation
    capture runs on GPUs. ``reference``'s arithmetic one head at a time, the products in the inputs' dtype (as
    segment_anything's under autocast), each head's softmax taken in f32 and reduced at once, so only the
    last block's matrix leaves the device (not every global block's N x N, reduced on the host)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 query_weights: torch.Tensor, heads: int, scale: float, bf16: bool, matrix: bool
                 ) -> tuple[torch.Tensor, ...]:
        b, n, channels = q.shape
        width = channels // heads
        weights = query_weights.to(q.device, torch.float32)[:, None, :]  # (B, 1, N)
        received = torch.zeros(b, n, dtype=torch.float32, device=q.device)
        mean = torch.zeros(b, n, n, dtype=torch.float32, device=q.device) if matrix else None
        outs: list[torch.Tensor] = []
        # Every dtype is chosen here: autocast would round the reductions' operands (the weights too) to bf16.
        with torch.autocast(q.device.type, enabled=False):
            for h in range(heads):
                part = slice(h * width, (h + 1) * width)
                terms = (rel_h[:, h, :, :, None] + rel_w[:, h, :, None, :]).reshape(b, n, n).to(q.dtype)
                logits = torch.baddbmm(terms, q[..., part] * scale, k[..., part].transpose(-2, -1))
                probs = logits.softmax(dim=-1, dtype=torch.float32)
                outs.append(probs.to(q.dtype) @ v[..., part])
                received += (weights @ probs)[:, 0]
                if mean is not None:
                    mean += probs
        out = torch.cat(outs, dim=-1)
        received /= heads
        if mean is None:
            return out, received
        mean /= heads
        return out, received, mean.mean(dim=1), mean.to(torch.float16)


_FLOATS = ctypes.POINTER(ctypes.c_float)
_ERRORS = {1: "sizes that do not fit together", 2: "out of memory"}


class LibraryAttention:
    """The operations library's GlobalAttention kernel called from torch: ``GlobalAttentionKernel`` on CPU
    tensors, the arithmetic of the OpenVINO node (AMX tiles or AVX512-BF16 dot products with ``bf16``), on
    ``torch.get_num_threads()`` threads."""

    def __init__(self, library: Path) -> None:
        function = ctypes.CDLL(str(library)).gsam_global_attention
        function.restype = ctypes.c_int
        function.argtypes = [*[_FLOATS] * 6, *[ctypes.c_int64] * 6, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                             *[_FLOATS] * 3, ctypes.POINTER(ctypes.c_uint16)]
        self._function = function

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 query_weights: torch.Tensor, heads: int, scale: float, bf16: bool, matrix: bool
                 ) -> tuple[torch.Tensor, ...]:
        if q.dim() != 3 or heads < 1 or q.shape[2] % heads:
            raise ValueError(f"q must be (B, N, heads * d) with heads={heads}, got {tuple(q.shape)}")
        b, n, channels = q.shape
        if rel_h.dim() != 4 or rel_w.dim() != 4 or rel_h.shape[3] * rel_w.shape[3] != n:
            raise ValueError(f"rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} must be (B, heads, N, H) "
                             f"and (B, heads, N, W) with H * W = N = {n}")
        expected = {"k": (k, q.shape), "v": (v, q.shape), "rel_h": (rel_h, (b, heads, n, rel_h.shape[3])),
                    "rel_w": (rel_w, (b, heads, n, rel_w.shape[3])), "query_weights": (query_weights, (b, n))}
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name} must be {tuple(shape)} for q {tuple(q.shape)}, got {tuple(tensor.shape)}")
        inputs = [t.detach().to("cpu", torch.float32).contiguous() for t in (q, k, v, rel_h, rel_w, query_weights)]
        out, received = q.new_empty(q.shape, dtype=torch.float32, device="cpu"), q.new_empty(b, n, dtype=torch.float32,
                                                                                           device="cpu")
        column_mean = q.new_empty(b, n, dtype=torch.float32, device="cpu") if matrix else None
        mean = q.new_empty(b, n, n, dtype=torch.float16, device="cpu") if matrix else None
        status = self._function(*(_floats(t) for t in inputs), b, n, heads, channels // heads, rel_h.shape[3],
                                rel_w.shape[3], scale, int(bf16), torch.get_num_threads(), _floats(out),
                                _floats(received), _floats(column_mean),
                                ctypes.cast(mean.data_ptr(), ctypes.POINTER(ctypes.c_uint16)) if mean is not None
                                else None)
        if status:
            raise RuntimeError(f"gsam_global_attention failed: {_ERRORS.get(status, f'status {status}')}")
        if column_mean is None or mean is None:
            return out, received
        return out, received, column_mean, mean


def _floats(tensor: torch.Tensor | None) -> ctypes._Pointer[ctypes.c_float] | None:
    return ctypes.cast(tensor.data_ptr(), _FLOATS) if tensor is not None else None
