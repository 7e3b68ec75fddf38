"""Where SAM's mask decoder looked: the final token-to-image softmax of every decoder call.

``capture_decoder_attention`` patches the decoder's ``final_attn_token_to_image`` (segment_anything's or
a structural copy such as MobileSAM's) to record its head-averaged softmax while computing the stock
output op for op; ``mask_token_maps`` picks, per prompt, the map of the mask token behind the returned
mask. Re-exported by ``sam_attention``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from .module_patch import ForwardPatch, sinks_active, swap_in


@dataclass
class DecoderAttentionCapture:
    """Filled by ``capture_decoder_attention``: one entry per mask decoder call, in call order."""

    decoder_type: str
    num_mask_tokens: int
    # Each (B, num_tokens, H_emb * W_emb) float32: final token-to-image softmax, heads averaged.
    # B is the number of prompts; tokens are [iou_token, mask tokens..., prompt tokens...].
    calls: list[np.ndarray] = field(default_factory=list)

    @property
    def attention(self) -> np.ndarray:
        """All calls concatenated along the prompt axis: (B_total, num_tokens, H_emb * W_emb)."""
        if not self.calls:
            raise RuntimeError("no decoder attention was captured: did the decoder run inside the `with`?")
        if len(self.calls) == 1:
            return self.calls[0]
        if len({c.shape[1:] for c in self.calls}) != 1:
            raise ValueError(
                f"decoder calls have different token counts {[c.shape for c in self.calls]}; use .calls"
            )
        return np.concatenate(self.calls, axis=0)

# Active decoder captures of the current thread/task: {attention module: capture}.
_DECODER_SINKS: ContextVar[Mapping[object, DecoderAttentionCapture]] = ContextVar(
    "sam_attention_decoder_sinks", default=MappingProxyType({})
)


def _final_token_to_image(mask_decoder: MaskDecoder) -> nn.Module:
    attn = getattr(getattr(mask_decoder, "transformer", None), "final_attn_token_to_image", None)
    needed = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "_separate_heads", "_recombine_heads")
    if attn is None or not all(hasattr(attn, a) for a in needed) or not hasattr(mask_decoder, "num_mask_tokens"):
        kind = f"{type(mask_decoder).__module__}.{type(mask_decoder).__qualname__}"
        raise ValueError(
            f"expected a SAM MaskDecoder (transformer.final_attn_token_to_image with q/k/v/out "
            f"projections, num_mask_tokens); got {kind}"
        )
    return attn


class _CapturingTokenAttention(ForwardPatch):
    """Forward for segment_anything.modeling.transformer.Attention: stock, recording when active."""

    # The stock module's attributes and methods this forward uses (declared for the type checker only).
    num_heads: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    _separate_heads: Callable[[torch.Tensor, int], torch.Tensor]
    _recombine_heads: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sink = _DECODER_SINKS.get().get(self)
        if sink is None:
            return super().forward(q, k, v)  # type: ignore[misc]
        # Stock computation, op for op, with the softmax recorded on the way.
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)  # B x N_heads x N_tokens x N_image
        attn = attn / math.sqrt(c_per_head)
        attn = torch.softmax(attn, dim=-1)
        sink.calls.append(attn.detach().float().mean(dim=1).cpu().numpy())
        out = self._recombine_heads(attn @ v)
        return self.out_proj(out)


@contextlib.contextmanager
def capture_decoder_attention(mask_decoder: MaskDecoder) -> Iterator[DecoderAttentionCapture]:
    """Record the final token-to-image attention of every mask decoder call run inside the block.

    Works for any decoder built like SAM's (segment_anything, MobileSAM), matched by structure.
    """
    attn = _final_token_to_image(mask_decoder)
    capture = DecoderAttentionCapture(
        decoder_type=f"{type(mask_decoder).__module__}.{type(mask_decoder).__qualname__}",
        num_mask_tokens=int(mask_decoder.num_mask_tokens),
    )
    swap_in(attn, _CapturingTokenAttention)
    with sinks_active(_DECODER_SINKS, {attn: capture}):
        yield capture


def mask_token_maps(
    capture: DecoderAttentionCapture,
    multimask_output: bool = False,
    selected: Sequence[int] | None = None,
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Per prompt, the image-embedding attention of the mask token behind the returned mask.

    Token order is SAM's: iou token, then mask tokens. With ``multimask_output=False`` SAM returns
    mask token 0 (sequence index 1): result (B, h, w). With ``multimask_output=True`` it returns mask
    tokens 1..3 (sequence 2..4): result (B, 3, h, w), or (B, h, w) when ``selected`` gives, per
    prompt, the index (0..2) of the mask that was kept. Maps are softmax weights (each sums to 1).
    ``grid`` defaults to the square embedding (64 x 64 for SAM).
    """
    attn = capture.attention
    b, _, hw = attn.shape
    if grid is None:
        side = math.isqrt(hw)
        if side * side != hw:
            raise ValueError(f"{hw} image positions are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != hw:
        raise ValueError(f"grid {grid} does not hold {hw} positions")
    if not multimask_output:
        return attn[:, 1].reshape(b, *grid)
    maps = attn[:, 2 : 1 + capture.num_mask_tokens].reshape(b, -1, *grid)
    if selected is None:
        return maps
    chosen = np.asarray(selected, dtype=np.int64)
    if chosen.shape != (b,):
        raise ValueError(f"selected must hold one mask index per prompt ({b}), got shape {chosen.shape}")
    return maps[np.arange(b), chosen]
