"""The reference chain, as Grounded-SAM's demo and Label Studio's grounding_sam backend run it.

groundingdino.util.inference: load_model(config, checkpoint) / load_image(path) / predict(...), then
segment_anything's SamPredictor: set_image(image) once, then one predict_torch over all boxes
(transform.apply_boxes_torch, multimask_output=False). Nothing of the project's code is used here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def clock(device: str) -> float:
    """perf_counter once the GPU's queued work is done, so stage times are wall times."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class ReferenceResult:
    boxes_xyxy: np.ndarray  # N x 4 pixels
    masks: np.ndarray  # N x H x W bool
    stages: dict[str, float] = field(default_factory=dict)  # seconds


class ReferenceChain:
    def __init__(self, dino_config: Path, dino_checkpoint: Path, sam_checkpoint: Path, sam_variant: str = "vit_b",
                 sam_arch: dict | None = None, image_size: int = 800, max_size: int = 1333,
                 device: str = "cpu") -> None:
        import contextlib
        import os

        from groundingdino.util.inference import load_model
        from segment_anything import SamPredictor, sam_model_registry
        from segment_anything.build_sam import _build_sam

        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.dino = load_model(str(dino_config), str(dino_checkpoint), device=device)
        sam = (_build_sam(checkpoint=str(sam_checkpoint), **sam_arch) if sam_arch
               else sam_model_registry[sam_variant](checkpoint=str(sam_checkpoint)))
        self.predictor = SamPredictor(sam.to(device).eval())  # as Grounded-SAM's demo: sam.to(device)
        self.device = torch.device(device)
        self.image_size, self.max_size = image_size, max_size
        self._backbone_s = 0.0
        self.dino.backbone.register_forward_pre_hook(self._backbone_start)
        self.dino.backbone.register_forward_hook(self._backbone_end)

    def _clock(self) -> float:
        return clock(self.device.type)

    def _backbone_start(self, *_):
        self._t0 = self._clock()

    def _backbone_end(self, *_):
        self._backbone_s += self._clock() - self._t0

    def load_image(self, path: Path) -> tuple[np.ndarray, torch.Tensor]:
        """groundingdino's load_image (whose sizes are fixed at 800/1333) at this chain's sizes."""
        from groundingdino.util import inference

        if (self.image_size, self.max_size) == (800, 1333):
            return inference.load_image(str(path))
        import groundingdino.datasets.transforms as T
        from PIL import Image

        transform = T.Compose([T.RandomResize([self.image_size], max_size=self.max_size), T.ToTensor(),
                               T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        source = Image.open(path).convert("RGB")
        return np.asarray(source), transform(source, None)[0]

    def run(self, path: Path, prompt: str, box_threshold: float, text_threshold: float) -> ReferenceResult:
        from groundingdino.util.inference import predict
        from torchvision.ops import box_convert

        stages: dict[str, float] = {}
        t0 = self._clock()
        image, tensor = self.load_image(path)
        t1 = self._clock()
        self._backbone_s = 0.0
        boxes, _, _ = predict(self.dino, tensor, prompt, box_threshold, text_threshold, device=str(self.device))
        t2 = self._clock()
        h, w = image.shape[:2]
        xyxy = box_convert(boxes * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")
        self.predictor.set_image(image)
        t3 = self._clock()
        if len(xyxy):
            masks, _, _ = self.predictor.predict_torch(
                point_coords=None, point_labels=None,
                boxes=self.predictor.transform.apply_boxes_torch(xyxy, image.shape[:2]).to(self.device),
                multimask_output=False)
            masks = masks[:, 0].cpu().numpy()
        else:
            masks = np.zeros((0, h, w), dtype=bool)
        t4 = self._clock()
        stages["dino_backbone"] = self._backbone_s
        stages["dino_text_decoder"] = (t2 - t1) - self._backbone_s
        stages["sam_encoder"] = t3 - t2
        stages["sam_decoder_post"] = t4 - t3
        stages["other"] = t1 - t0
        return ReferenceResult(boxes_xyxy=xyxy.numpy(), masks=masks, stages=stages)
