"""SAM: boxes -> masks. The image is encoded once; every box of that image is decoded in one batch.

Same arithmetic as segment_anything's SamPredictor.set_image + predict_torch, but stateless: the
embedding is a value the caller holds (and caches), so threads never share per-image state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

DECODE_CHUNK = 32  # boxes per decoder call: bounds memory of full-resolution mask logits


@dataclass
class ImageEmbedding:
    """SAM's image-encoder output for one image, with the geometry needed to map masks back."""

    features: torch.Tensor  # 1 x C x 64 x 64
    original_size: tuple[int, int]  # H, W of the image
    input_size: tuple[int, int]  # H, W after resizing the long side to the encoder's img_size


class SamSegmenter:
    """Wraps a loaded Sam (segment_anything or MobileSAM) model."""

    def __init__(self, sam: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.sam = sam.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize (long side -> img_size), normalise, pad: the encoder's 1 x 3 x S x S input."""
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor), tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder once (the expensive step)."""
        x, input_size = self.preprocess(image)
        with self._autocast():
            features = self.sam.image_encoder(x)
        return ImageEmbedding(features=features.float(), original_size=tuple(image.shape[:2]), input_size=input_size)

    @torch.inference_mode()
    def segment(self, embedding: ImageEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N x H x W bool at the original size) and SAM's predicted IoUs (N) for N pixel boxes."""
        height, width = embedding.original_size
        if len(boxes_xyxy) == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32), device=self.device)
        boxes = self.transform.apply_boxes_torch(boxes, embedding.original_size)
        masks, ious = [], []
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        for chunk in boxes.split(DECODE_CHUNK):
            with self._autocast():
                sparse, dense = self.sam.prompt_encoder(points=None, boxes=chunk, masks=None)
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=embedding.features,
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            logits = self.sam.postprocess_masks(low_res.float(), embedding.input_size, embedding.original_size)
            masks.append((logits > self.sam.mask_threshold)[:, 0].cpu().numpy())
            ious.append(iou[:, 0].float().cpu().numpy())
        return np.concatenate(masks), np.concatenate(ious)
