"""Grounding DINO's torch weights once both its halves run on OpenVINO: freed, and loaded again on demand.

Each compiled OpenVINO graph holds its own copy of the weights, so keeping the torch model beside
them only serves the inputs the graphs don't (an image side under 65 px after the resize, a
caption or feature map past the export's bounds): SwinT-OGC's 172M parameters, ~690 MB in f32. The
engine frees them (``release_torch_weights``), and the first such input loads the model again from
the checkpoint (one log line) and keeps it. SAM's encoder does the same (``openvino_encoder``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    from .detector import GroundingDinoDetector
    from .dino_graph import DinoTextInputs
    from .dino_image_graph import ImageLevels

logger = logging.getLogger(__name__)


class ReloadedDino:
    """The torch Grounding DINO, loaded again by ``reload`` the first time an input needs it, then kept."""

    def __init__(self, reload: Callable[[], GroundingDINO]) -> None:
        self._reload = reload
        self._model: GroundingDINO | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self, why: str) -> GroundingDINO:
        """The model (loaded now if it isn't); ``why`` names the input in the one log line a load writes."""
        with self._lock:
            if self._model is None:
                logger.info("Grounding DINO's torch weights are loaded again (kept from now on): %s", why)
                self._model = self._reload()
            return self._model


class ReloadingDinoText:
    """``DinoTextRuntime`` on torch over ``ReloadedDino``: the text half's fallback once its weights are freed."""

    name = "torch"

    def __init__(self, weights: ReloadedDino, dtype: torch.dtype) -> None:
        self.weights = weights
        self.dtype = dtype

    def run(self, inputs: DinoTextInputs) -> tuple[torch.Tensor, torch.Tensor]:
        from .dino_runtime import TorchDinoText

        sizes = ", ".join(f"{h}x{w}" for h, w in inputs.sizes)
        model = self.weights.get(f"the text half's graph does not serve feature maps {sizes} with "
                                 f"{inputs.input_ids.shape[1]} tokens")
        return TorchDinoText(model, self.dtype).run(inputs)


class ReloadingDinoImage:
    """``DinoImageRuntime`` on torch over ``ReloadedDino``: the image half's fallback once its weights are freed."""

    name = "torch"

    def __init__(self, weights: ReloadedDino, dtype: torch.dtype) -> None:
        self.weights = weights
        self.dtype = dtype

    def run(self, image: torch.Tensor) -> ImageLevels:
        from .dino_image_runtime import TorchDinoImage

        height, width = image.shape[-2:]
        model = self.weights.get(f"the image half's graph does not serve a {height}x{width} px input")
        return TorchDinoImage(model, self.dtype).run(image)


def release_torch_weights(detector: GroundingDinoDetector, reload: Callable[[], GroundingDINO]) -> bool:
    """Free ``detector.model``'s weights where both of its halves run on OpenVINO, making ``reload``
    (the model from its checkpoint, ``detector.prepare``d) what their fallbacks and
    ``detector.torch_model`` use from then on. Returns whether the weights were freed (False: a half
    runs on torch, which needs them)."""
    from .dino_image_runtime import OpenVinoDinoImage
    from .dino_runtime import OpenVinoDinoText
    from .heap import return_freed_memory
    from .models import hollow_weights

    text, image = detector.text_runtime, detector.image_runtime
    if not (isinstance(text, OpenVinoDinoText) and isinstance(image, OpenVinoDinoImage)):
        return False
    weights = ReloadedDino(reload)
    text.fallback = ReloadingDinoText(weights, detector.dtype)
    image.fallback = ReloadingDinoImage(weights, detector.dtype)
    detector.reloaded = weights
    hollow_weights(detector.model)
    return_freed_memory()  # the engine keeps freed memory for reuse: these pages are gone for good
    return True
