"""SAM: boxes -> masks. The image is encoded once; every box of that image is decoded in one batch.

Same arithmetic as segment_anything's SamPredictor.set_image + predict_torch, but stateless: the
embedding is a value the caller holds (and caches), so threads never share per-image state. The boxes
are decoded by ``box_decoder.BoxDecoder`` (the image side once for all of them).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from . import sam_attention
from .box_decoder import BoxDecoder
from .encoder_runtime import EncoderAttention, ImageEncoderRuntime, TorchImageEncoder

if TYPE_CHECKING:
    from .models import SamModel

DECODE_CHUNK = 32  # boxes per decoder call: bounds the decoder's activations


@dataclass
class ImageEmbedding:
    """SAM's image-encoder output for one image, with the geometry needed to map masks back."""

    features: torch.Tensor  # 1 x C x 64 x 64
    original_size: tuple[int, int]  # H, W of the image
    input_size: tuple[int, int]  # H, W after resizing the long side to the encoder's img_size
    attention: EncoderAttention | None = None
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, eq=False)
class SamMaskLogits:
    """One mask as SAM's decoder made it: logits on its low-resolution grid over the padded square
    input. ``resized`` upsamples as ``Sam.postprocess_masks`` does (bilinear to the input square, crop
    the padding, bilinear to the asked size) and thresholds, so the full-size mask is the reference
    chain's, made only when something is sent; what is kept is 256 KiB per mask whatever the image
    size."""

    logits: np.ndarray  # float32, 256 x 256 for a 1024 input
    input_size: tuple[int, int]  # H, W SAM saw after resizing (before padding)
    original_size: tuple[int, int]  # H, W of the image
    img_size: int  # SAM's square input side
    threshold: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return self.original_size

    @functools.cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.resized(*self.original_size)))

    def resized(self, height: int, width: int) -> np.ndarray:
        """The mask at ``height`` x ``width``: bool.

        OpenCV's bilinear resize is torch's ``F.interpolate(mode="bilinear", align_corners=False)`` (the
        same half-pixel source positions, clamped at the edges, two taps per axis) up to float rounding
        (~1e-6 of the logits; ~2e-4 at 40x stretches): a pixel's side of the threshold changes only
        where its logit is that close to it. 5x faster at 12 MP (one mask 86 -> 16 ms on 2 cores).
        """
        square = cv2.resize(self.logits, (self.img_size, self.img_size), interpolation=cv2.INTER_LINEAR)
        cropped = np.ascontiguousarray(square[: self.input_size[0], : self.input_size[1]])
        full = cv2.resize(cropped, (width, height), interpolation=cv2.INTER_LINEAR)
        return full.reshape(height, width) > self.threshold


@dataclass
class Decoded:
    """N boxes' masks (kept at SAM's low resolution), predicted IoUs, and (if captured) decoder maps."""

    masks: list[SamMaskLogits]  # N
    ious: np.ndarray  # N
    decoder_maps: np.ndarray | None  # N x 64 x 64: where each mask token looked


class _ResizeLongestSide(ResizeLongestSide):
    """SAM's resize, but a side never shrinks to 0 px (a 4000x1 image's short side rounds to 0 at
    1024); the masks are cropped and scaled back with the same shape, so they still line up."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(newh, 1), max(neww, 1)


class SamSegmenter:
    """Wraps a loaded Sam (segment_anything or MobileSAM) model."""

    def __init__(self, sam: SamModel, device: torch.device, dtype: torch.dtype = torch.float32,
                 encoder: ImageEncoderRuntime | None = None) -> None:
        """``encoder``: what runs the image encoder (``encoder_runtime.build_encoder_runtime``); default
        the model's own forward on ``device``."""
        self.sam = sam.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.transform = _ResizeLongestSide(sam.image_encoder.img_size)
        self.img_size = int(sam.image_encoder.img_size)
        self.has_global_attention = sam_attention.supports_encoder_attention(sam.image_encoder)
        if self.has_global_attention:
            # SDPA with the relative position as an additive mask: same numbers (~1e-6), ~1.7x faster.
            sam_attention.use_fast_attention(sam.image_encoder)
        self.encoder = encoder if encoder is not None else TorchImageEncoder(sam.image_encoder, dtype)
        # The prompts' decoder in the compute dtype (its own copy of the decoder's weights where that differs).
        self.box_decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder, dtype)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize (long side -> img_size), normalise, pad: the encoder's 1 x 3 x S x S input."""
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor), tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed(self, image: np.ndarray, capture_attention: bool = False) -> ImageEmbedding:
        """Run the image encoder once (the expensive step), recording its global attention if asked.

        The capture *is* the forward pass (its softmax makes the features), so explanations cost no
        second encoder run; the matrices are reduced before returning.
        """
        x, input_size = self.preprocess(image)
        encoded = self.encoder.encode(x, input_size, capture_attention)
        notes: tuple[str, ...] = ()
        if capture_attention and not self.has_global_attention:
            notes = (f"{type(self.sam.image_encoder).__name__} has no global attention: encoder maps are not "
                     "available for this SAM variant; the mask decoder's maps are.",)
        return ImageEmbedding(features=encoded.features, original_size=tuple(image.shape[:2]),
                              input_size=input_size, attention=encoded.attention, notes=notes)

    @torch.inference_mode()
    def segment(self, embedding: ImageEmbedding, boxes_xyxy: np.ndarray, capture_attention: bool = False) -> Decoded:
        """Masks for N pixel boxes, decoded in batches from one embedding."""
        if len(boxes_xyxy) == 0:
            grid = embedding.features.shape[-2:]
            return Decoded([], np.zeros((0,), dtype=np.float32),
                           np.zeros((0, *grid), dtype=np.float32) if capture_attention else None)
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32), device=self.device)
        boxes = self.transform.apply_boxes_torch(boxes, embedding.original_size)
        masks, ious = [], []
        with contextlib.ExitStack() as stack:
            capture = (stack.enter_context(sam_attention.capture_decoder_attention(self.box_decoder.mask_decoder))
                       if capture_attention else None)
            for chunk in boxes.split(DECODE_CHUNK):
                low_res, iou = self.box_decoder(embedding.features, chunk)
                masks += [SamMaskLogits(logits, embedding.input_size, embedding.original_size, self.img_size,
                                        float(self.sam.mask_threshold))
                          for logits in low_res.cpu().numpy()]
                ious.append(iou.cpu().numpy())
        decoder_maps = None
        if capture is not None:
            grid_h, grid_w = embedding.features.shape[-2:]
            decoder_maps = sam_attention.mask_token_maps(capture, multimask_output=False, grid=(grid_h, grid_w))
        return Decoded(masks, np.concatenate(ious), decoder_maps)
