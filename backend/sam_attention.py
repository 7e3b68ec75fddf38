"""Fast and explainable attention for SAM's image encoder and mask decoder.

Three things, all over segment_anything's own modules (and structurally identical copies such as
MobileSAM's), without editing site-packages:

* ``use_fast_attention``: the ViT encoder's attention through ``scaled_dot_product_attention``, with
  SAM's decomposed relative position passed as an additive mask. Same numbers as stock (~1e-6).
* ``capture_encoder_attention``: the true head-averaged softmax of the global-attention blocks,
  recorded by the very forward pass that produces the features (no second encoder run), one head at
  a time so the full (heads, N, N) tensor never exists.
* ``capture_encoder_reductions``: only what the engine keeps of it (each global block's attention
  received from weighted queries, the last block's matrix), each global block run by a kernel that
  reduces the softmax where it takes it (``global_attention.LibraryAttention`` on CPU, ``TorchAttention``).
* ``capture_decoder_attention``: the mask decoder's final token-to-image softmax, i.e. where each
  output token (and so each returned mask) looked in the image embedding (``decoder_attention``,
  re-exported here).

Plus ``mask_attention_map(s)`` and ``mask_to_token_grid`` (``backend.attention_maps``: a mask's own map
(several masks' at once), a mask on the token grid); showing token maps on the original image
(``token_map_to_image``, ``colorize``, ``overlay``) is ``backend.heatmaps``'s; both re-exported here.

Patching (``module_patch``) swaps the attention module's class for a subclass whose forward differs; parameters,
``state_dict`` and ``isinstance`` checks are unchanged. A capture is a plain object owned by the
caller and is found by the forward through a ``ContextVar``: two threads (or asyncio tasks) running
the same or different models never see each other's captures, and with no capture active the patched
forward costs one dictionary lookup. The forward must run in the thread/context that entered the
``with`` block (wrap a worker's call in ``contextvars.copy_context().run`` if it is elsewhere).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, get_rel_pos
from torch import nn

# The decoder's capture and the drawing half (no torch, shared with the explain UI) live in their own
# modules; re-exported here so callers keep one import.
from .attention_maps import mask_attention_map, mask_attention_maps, mask_to_token_grid
from .decoder_attention import DecoderAttentionCapture, capture_decoder_attention, mask_token_maps
from .global_attention import GlobalAttentionKernel
from .heatmaps import colorize, normalize_map, overlay, token_map_to_image
from .module_patch import ForwardPatch, sinks_active, swap_in, swap_out

__all__ = [
    "EncoderBlockAttention",
    "EncoderAttentionCapture",
    "DecoderAttentionCapture",
    "supports_encoder_attention",
    "use_fast_attention",
    "use_stock_attention",
    "capture_encoder_attention",
    "capture_encoder_reductions",
    "EncoderReductions",
    "capture_decoder_attention",
    "mask_attention_map",
    "mask_attention_maps",
    "mask_token_maps",
    "mask_to_token_grid",
    "token_map_to_image",
    "normalize_map",
    "colorize",
    "overlay",
]

# Largest additive mask (elements) built per SDPA call; global blocks then go one head at a time.
# Besides bounding memory (stock vit_h holds 1 GiB per global block), smaller chunks are faster on
# CPU: measured on a vit_b global block, 1 head per call ran ~4x faster than all 12 heads at once.
_MASK_BUDGET = 1 << 22

# Active captures of the current thread/task: {attention module: sink}, one map per kind of patch. The
# value is replaced, never mutated, so each context only ever sees the captures it entered itself.
_ENCODER_SINKS: ContextVar[Mapping[object, _GlobalBlockSink]] = ContextVar(
    "sam_attention_encoder_sinks", default=MappingProxyType({})
)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderBlockAttention:
    """Head-averaged softmax attention of one global encoder block.

    Rows are queries, columns keys, both in row-major order over the token grid (padded region
    included: SAM pads the image bottom/right, and those tokens attend and are attended to too).
    """

    block_index: int
    num_heads: int
    grid: tuple[int, int]  # (H_tok, W_tok), 64 x 64 for a 1024 input
    # Attention received by each key: mean over queries of the head-averaged matrix, (B, H_tok, W_tok)
    # float32. Each map sums to 1.
    received: np.ndarray
    # The head-averaged matrix itself, (B, N, N) float16 with N = H_tok * W_tok; None unless kept.
    matrix: np.ndarray | None = None


@dataclass
class EncoderAttentionCapture:
    """Filled by ``capture_encoder_attention`` during the encoder forward; the last forward wins."""

    encoder_type: str
    block_indices: tuple[int, ...]
    keep_matrix: bool = True
    head_chunk: int = 1
    blocks: dict[int, EncoderBlockAttention] = field(default_factory=dict)

    @property
    def last(self) -> EncoderBlockAttention:
        """The deepest captured block (SAM's last block, a global one, by default)."""
        if not self.blocks:
            raise RuntimeError("no encoder attention was captured: did the encoder run inside the `with`?")
        return self.blocks[max(self.blocks)]


@dataclass
class EncoderReductions:
    """Filled by ``capture_encoder_reductions`` during the encoder forward: what the engine keeps."""

    block_indices: tuple[int, ...]  # the global blocks, the last one with the matrix
    # Global block -> attention each key receives: mean over heads of query_weights @ softmax, (B, N) float32.
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    column_mean: torch.Tensor | None = None  # last block: mean over queries of the head mean, (B, N) float32
    matrix: torch.Tensor | None = None  # last block: the head-averaged softmax, (B, N, N) float16


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def _is_vit_attention(module: object) -> bool:
    return all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scale", "use_rel_pos"))


def _vit_blocks(image_encoder: nn.Module) -> list[Block]:
    """SAM ViT blocks of the encoder (or structural copies), or NotImplementedError naming what the
    encoder is instead."""
    blocks = getattr(image_encoder, "blocks", None)
    if (
        isinstance(blocks, nn.ModuleList)
        and len(blocks) > 0
        and all(hasattr(b, "window_size") and _is_vit_attention(getattr(b, "attn", None)) for b in blocks)
    ):
        return list(blocks)
    kind = f"{type(image_encoder).__module__}.{type(image_encoder).__qualname__}"
    raise NotImplementedError(
        f"encoder attention needs SAM's ViT image encoder (ImageEncoderViT: blocks with windowed and "
        f"global attention); got {kind}. MobileSAM's TinyViT has only windowed attention (plus "
        f"convolutions), so there is no global attention map to fuse or capture; the mask decoder's "
        f"attention (capture_decoder_attention) works for it."
    )


def supports_encoder_attention(image_encoder: nn.Module) -> bool:
    """Whether ``use_fast_attention`` / ``capture_encoder_attention`` apply to this encoder."""
    try:
        _vit_blocks(image_encoder)
    except NotImplementedError:
        return False
    return True


def use_fast_attention(image_encoder: nn.Module) -> int:
    """Make every ViT attention of the encoder use SDPA; idempotent. Returns the number patched."""
    blocks = _vit_blocks(image_encoder)
    for block in blocks:
        swap_in(block.attn, _FastEncoderAttention)
    return len(blocks)


def use_stock_attention(image_encoder: nn.Module) -> None:
    """Undo ``use_fast_attention`` (and the patching done by captures)."""
    for block in _vit_blocks(image_encoder):
        swap_out(block.attn)


def _resolve_blocks(blocks: Sequence[Block], which: None | str | Sequence[int]) -> tuple[int, ...]:
    global_indices = [i for i, b in enumerate(blocks) if b.window_size == 0]
    if not global_indices:
        raise ValueError("the encoder has no global-attention blocks (window_size == 0) to capture")
    if which is None or which == "global":
        return tuple(global_indices)
    if which == "last":
        return (global_indices[-1],)
    if isinstance(which, str):
        raise ValueError(f"blocks must be None, 'global', 'last' or block indices; got {which!r}")
    resolved = []
    for i in which:
        j = i + len(blocks) if i < 0 else i
        if not 0 <= j < len(blocks):
            raise ValueError(f"block index {i} out of range for {len(blocks)} blocks")
        if blocks[j].window_size != 0:
            raise ValueError(
                f"block {j} uses windowed attention (window_size={blocks[j].window_size}); only global "
                f"blocks {global_indices} give whole-image attention"
            )
        resolved.append(j)
    return tuple(sorted(set(resolved)))


@contextlib.contextmanager
def capture_encoder_attention(
    image_encoder: nn.Module,
    blocks: None | str | Sequence[int] = None,
    *,
    keep_matrix: bool = True,
    head_chunk: int = 1,
) -> Iterator[EncoderAttentionCapture]:
    """Record the true attention of global blocks during the encoder forward run inside the block.

    ``blocks``: None/"global" for every global block (vit_b: 2, 5, 8, 11), "last" for the last one,
    or explicit (global) indices. The captured blocks compute their output from the recorded softmax,
    ``head_chunk`` heads at a time; the others run as they are (SDPA if ``use_fast_attention``).
    ``keep_matrix=False`` skips the (B, N, N) float16 matrix (32 MiB per block for N=4096), which
    ``mask_attention_map`` needs.

    The captured blocks' attention modules are left patched (fast SDPA path when no capture is
    active) so that another thread using the same encoder never races a class swap back.
    """
    vit_blocks = _vit_blocks(image_encoder)
    if head_chunk < 1:
        raise ValueError(f"head_chunk must be >= 1, got {head_chunk}")
    indices = _resolve_blocks(vit_blocks, blocks)
    capture = EncoderAttentionCapture(
        encoder_type=f"{type(image_encoder).__module__}.{type(image_encoder).__qualname__}",
        block_indices=indices,
        keep_matrix=keep_matrix,
        head_chunk=head_chunk,
    )
    with _blocks_sinking(vit_blocks, {i: _EncoderSink(capture, i) for i in indices}):
        yield capture


@contextlib.contextmanager
def capture_encoder_reductions(
    image_encoder: nn.Module, kernel: GlobalAttentionKernel, query_weights: torch.Tensor, bf16: bool
) -> Iterator[EncoderReductions]:
    """Run every global block's attention through ``kernel`` during the encoder forward inside the block,
    keeping the reductions the engine keeps (``encoder_graph.CapturingEncoder``'s outputs).

    Arguments:
      kernel: ``global_attention.LibraryAttention`` (CPU), ``TorchAttention`` (any device), or any
        ``GlobalAttentionKernel``.
      query_weights: (B, N), N = H_tok * W_tok: each query's weight in ``received`` (1/count on the tokens
        that saw real pixels, 0 on the padding).
      bf16: the kernel's products in bf16 (f32 sums).
    """
    vit_blocks = _vit_blocks(image_encoder)
    indices = _resolve_blocks(vit_blocks, "global")
    reductions = EncoderReductions(block_indices=indices)
    with _blocks_sinking(vit_blocks, {i: _KernelSink(reductions, i, kernel, query_weights, bf16) for i in indices}):
        yield reductions


def _blocks_sinking(vit_blocks: Sequence[Block], sinks: Mapping[int, _GlobalBlockSink]
                    ) -> contextlib.AbstractContextManager[None]:
    """Block index -> sink made active for this context: each block's attention patched to the capturing
    forward (left patched afterwards, see ``capture_encoder_attention``) and routed to its sink."""
    for i in sinks:
        swap_in(vit_blocks[i].attn, _FastEncoderAttention)
    return sinks_active(_ENCODER_SINKS, {vit_blocks[i].attn: sink for i, sink in sinks.items()})


class _GlobalBlockSink(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rel: tuple[torch.Tensor, torch.Tensor] | None, scale: float, size: tuple[int, int]) -> torch.Tensor:
        """The block's attention output (B, H, W, heads * d) from q, k, v (B, heads, N, d), recording what the
        capture keeps."""
        ...


def _merge_heads(out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, heads, N, d) -> (B, H, W, heads * d)."""
    b, heads, _, _ = out.shape
    return out.view(b, heads, *size, -1).permute(0, 2, 3, 1, 4).reshape(b, *size, -1)


class _KernelSink:
    def __init__(self, reductions: EncoderReductions, block_index: int, kernel: GlobalAttentionKernel,
                 query_weights: torch.Tensor, bf16: bool) -> None:
        self.reductions = reductions
        self.block_index = block_index
        self.kernel = kernel
        self.query_weights = query_weights
        self.bf16 = bf16

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rel: tuple[torch.Tensor, torch.Tensor] | None, scale: float, size: tuple[int, int]) -> torch.Tensor:
        b, heads, n, _ = q.shape
        h, w = size

        def channels(t: torch.Tensor) -> torch.Tensor:  # (B, heads, N, d) -> (B, N, heads * d), the kernel's layout
            return t.transpose(1, 2).reshape(b, n, -1)

        if rel is None:  # no relative positions: terms of zero
            rel_h, rel_w = q.new_zeros(b, heads, n, h), q.new_zeros(b, heads, n, w)
        else:
            rel_h, rel_w = rel[0].reshape(b, heads, n, h), rel[1].reshape(b, heads, n, w)
        last = self.block_index == self.reductions.block_indices[-1]
        out, received, *rest = self.kernel(channels(q), channels(k), channels(v), rel_h, rel_w, self.query_weights,
                                           heads, scale, self.bf16, last)
        self.reductions.received[self.block_index] = received
        if last:
            self.reductions.column_mean, self.reductions.matrix = rest
        return out.to(q.dtype).view(b, h, w, -1)


class _EncoderSink:
    def __init__(self, capture: EncoderAttentionCapture, block_index: int) -> None:
        self.capture = capture
        self.block_index = block_index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rel: tuple[torch.Tensor, torch.Tensor] | None, scale: float, size: tuple[int, int]) -> torch.Tensor:
        out, mean_attn = _attend_and_capture(q, k, v, rel, scale, size, self.capture.head_chunk)
        self.record(mean_attn, q.shape[1], size)
        return _merge_heads(out, size)

    def record(self, mean_attn: torch.Tensor, num_heads: int, grid: tuple[int, int]) -> None:
        # mean_attn: (B, N, N) float32, head-averaged softmax.
        b = mean_attn.shape[0]
        received = mean_attn.mean(dim=1).reshape(b, *grid)
        matrix = mean_attn.to(torch.float16).cpu().numpy() if self.capture.keep_matrix else None
        self.capture.blocks[self.block_index] = EncoderBlockAttention(
            block_index=self.block_index,
            num_heads=num_heads,
            grid=grid,
            received=received.cpu().numpy().astype(np.float32, copy=False),
            matrix=matrix,
        )


def _decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's add_decomposed_rel_pos terms for q of shape (B, heads, H*W, C), query size == key size.

    Returns rel_h (B, heads, H, W, H) and rel_w (B, heads, H, W, W), from the *unscaled* q exactly as
    SAM computes them; the attention logit is (q * scale) @ k^T + rel_h[..., :, None] + rel_w[..., None, :].
    """
    b, heads, _, c = q.shape
    h, w = size
    # The tables are parameters (fp32); under autocast q is bf16/fp16, and einsum wants one dtype.
    Rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(b * heads, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h.view(b, heads, h, w, h), rel_w.view(b, heads, h, w, w)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    b, heads, n, _ = q.shape
    chunk = max(1, _MASK_BUDGET // (b * n * n))
    if chunk >= heads:
        chunk = heads
    # Chunks are concatenated, not written into a preallocated output: the same one copy on torch; in
    # the graph OpenVINO converts, slice assignments became 24 generic f32 ScatterNDUpdates in vit_b
    # (~5% of the op time in bf16 on an AMX Xeon); with a Concat the whole encoder measured 0.99x.
    outs: list[torch.Tensor] = []
    # One mask buffer for all chunks: a fresh 64 MiB mask per head is faulted in page by page again
    # each time (glibc mmaps blocks that large); reusing it made a vit_b global block ~1.4x faster
    # (one thread, without REUSE_FREED_MEMORY).
    reuse = _no_autograd(q, k, v)
    buf = None
    for h0 in range(0, heads, chunk):
        s = slice(h0, h0 + chunk)
        mask = None
        if rel is not None:
            # SDPA computes softmax(q @ k^T * scale + mask); SAM adds the rel-pos terms (made from the
            # unscaled q) after scaling, so the mask is the terms themselves, unscaled.
            rel_h, rel_w = rel[0][:, s, ..., :, None], rel[1][:, s, ..., None, :]
            c = rel_h.shape[1]
            if reuse:
                if buf is None or buf.shape[1] != c:
                    buf = torch.empty((b, c, n, n), dtype=rel_h.dtype, device=q.device)
                h, w = rel_h.shape[2], rel_h.shape[3]
                mask = torch.add(rel_h, rel_w, out=buf.view(b, c, h, w, h, w)).view(b, c, n, n)
            else:
                mask = (rel_h + rel_w).reshape(b, c, n, n)
        o = F.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s], attn_mask=mask, scale=scale)
        if chunk == heads:
            return o
        outs.append(o)
    return torch.cat(outs, dim=1)


def _no_autograd(*tensors: torch.Tensor) -> bool:
    """Whether out= and in-place ops into reused buffers may be used: not under autograd (they are not
    differentiable), and not while torch.export traces the encoder for OpenVINO (a graph has no
    buffers to reuse, and export's functionalisation refuses the strided view of an out= result)."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _attend_and_capture(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    size: tuple[int, int],
    head_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock SAM attention, ``head_chunk`` heads at a time; also returns the head-mean softmax (fp32).

    Peak extra memory is one (B, head_chunk, N, N) buffer plus one (B, N, N) float32 accumulator.
    """
    b, heads, n, _ = q.shape
    h, w = size
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # No zero fill: the first head chunk is copied in, the others added.
    acc = torch.empty((b, n, n), dtype=torch.float32, device=q.device)
    # Without autograd, every step of a head writes into one reused buffer: the rel-pos mask, then
    # q @ k^T added onto it (baddbmm_), then the softmax in place. Fresh N x N tensors per head are
    # faulted in page by page each time: on a vit_b global block (one thread, CPU time, no
    # REUSE_FREED_MEMORY) a fresh softmax per head, a zero-filled accumulator and a whole-matrix
    # float32 copy for bf16's add made capture 1.5x (fp32) and 1.7x (bf16) dearer than this. out=
    # and in-place ops are not differentiable, so with autograd on, allocate.
    reuse = _no_autograd(q, k, v)
    buf = None
    for h0 in range(0, heads, head_chunk):
        s = slice(h0, min(h0 + head_chunk, heads))
        c = s.stop - s.start
        qs = (q[:, s] * scale).reshape(b * c, n, -1)
        kt = k[:, s].reshape(b * c, n, -1).transpose(1, 2)
        if reuse:
            if buf is None or buf.shape[0] != b * c:
                buf = torch.empty((b * c, n, n), dtype=q.dtype, device=q.device)
            if rel is None:
                logits = torch.bmm(qs, kt, out=buf)
            else:
                # SAM's logit: (q * scale) @ k^T + rel_h + rel_w, the rel-pos terms from the unscaled q.
                torch.add(rel[0][:, s, ..., :, None], rel[1][:, s, ..., None, :], out=buf.view(b, c, h, w, h, w))
                logits = buf.baddbmm_(qs, kt)
            # Row by row, so in place is exact on CPU (checked against stock in tests); GPUs keep the
            # allocating form, their caching allocator has no page faults to save.
            attn = torch.softmax(logits, dim=-1, out=logits) if logits.is_cpu else logits.softmax(dim=-1)
        else:
            if rel is None:
                logits = torch.bmm(qs, kt)
            else:
                logits = torch.baddbmm((rel[0][:, s, ..., :, None] + rel[1][:, s, ..., None, :]).reshape(b * c, n, n),
                                       qs, kt)
            attn = logits.softmax(dim=-1)
        out[:, s] = torch.bmm(attn, v[:, s].reshape(b * c, n, -1)).view(b, c, n, -1)
        _accumulate(acc, attn.detach().view(b, c, n, n), first=h0 == 0)
        del attn, logits
    return out, acc.div_(heads)


# Rows per step when a reduced-precision softmax is added into the float32 accumulator: a mixed-dtype
# add converts its whole input first, a fresh (B, N, N) float32 temporary per head; 2^21 elements
# (8 MiB) per step keeps that temporary small and cache-sized.
_ACCUMULATE_ELEMENTS = 1 << 21


def _accumulate(acc: torch.Tensor, attn: torch.Tensor, first: bool) -> None:
    """acc (B, N, N) float32 = (first ? 0 : acc) + attn.sum(heads); attn (B, c, N, N), any float dtype."""
    b, c, n, _ = attn.shape
    step = n if attn.dtype == torch.float32 and c == 1 else max(1, _ACCUMULATE_ELEMENTS // (b * c * n))
    for r0 in range(0, n, step):
        rows = attn[:, :, r0 : r0 + step]
        part = rows[:, 0] if c == 1 else rows.sum(dim=1, dtype=torch.float32)
        dst = acc[:, r0 : r0 + step]
        if first:
            dst.copy_(part)
        else:
            dst.add_(part)


class _FastEncoderAttention(ForwardPatch):
    """Forward for segment_anything.modeling.image_encoder.Attention: SDPA, or capture if active."""

    # The stock module's attributes this forward reads (declared for the type checker only).
    num_heads: int
    scale: float
    qkv: nn.Linear
    proj: nn.Linear
    use_rel_pos: bool
    rel_pos_h: nn.Parameter
    rel_pos_w: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        heads = self.num_heads
        # q, k, v: (B, heads, H*W, head_dim); SAM folds heads into the batch, SDPA takes them apart.
        q, k, v = self.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel = None
        if self.use_rel_pos:
            rel = _decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        sink = _ENCODER_SINKS.get().get(self)
        if sink is None:
            x = _merge_heads(_sdpa(q, k, v, rel, self.scale), (H, W))
        else:
            x = sink.attend(q, k, v, rel, self.scale, (H, W))
        return self.proj(x)
