"""What runs Grounding DINO's image half (``RUNTIME``): torch, or its OpenVINO graph.

``GroundingDinoDetector.image_features`` talks to a ``DinoImageRuntime`` only: one preprocessed image
in, the projected features of its four levels out (``dino_image_graph.ImageLevels``), which the
engine caches per image and the text half reads for every prompt. Torch runs groundingdino's own
backbone under autocast (what it always ran); OpenVINO runs ``dino_image_graph.DinoImageGraph``
exported with a dynamic height and width, so ONE conversion serves every image size and aspect ratio
the resize produces. Converted and cached like the other graphs (``openvino_cache``);
``build_dino_image_runtime`` turns the setting into a runtime as ``dino_runtime`` does for the text
half: auto is OpenVINO on CPU, and a failure falls back to torch with one log line naming the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .dino_image_graph import LEVELS, DinoImageGraph, ImageLevels, unpadded_masks
from .dino_runtime import DinoGraphKey, with_openvino

if TYPE_CHECKING:
    from pathlib import Path

    import openvino as ov
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    from .config import EngineConfig
    from .openvino_cache import Conversion

logger = logging.getLogger(__name__)

# Bump when DinoImageGraph's inputs/outputs or arithmetic change: older cache files are unused. 3: Swin
# windows through one SDPA with fewer permutes (dino_image_graph._window_attention); 2 was taken by an
# experiment that was not kept (its files may sit in bench caches).
GRAPH_VERSION = 3
# Bounds of the export's dynamic image sides (pixels, after the resize). Below 65 px a side, the
# coarsest level (stride 64) is 1 token across, which export specialises; such slivers (an aspect
# ratio past 20:1 at the default sizes) run on torch. 8192 px matches the text half's level bound.
MIN_SIDE = 65
MAX_SIDE = 8192


class DinoImageRuntime(Protocol):
    """Runs Grounding DINO's image half on one preprocessed image."""

    name: str  # "torch" or "openvino": what ``Engine.describe`` reports

    def run(self, image: torch.Tensor) -> ImageLevels:
        """The projected features of every level.

        Arguments:
          image: 3 x H x W float32, resized and normalised (``GroundingDinoDetector.preprocess``), on
            the model's device.
        Returns:
          ``ImageLevels``: per level 1 x 256 x h_l x w_l features and positions in the engine's dtype
          (h_0 = ceil(H / 8), each next level half the last, rounded up), masks all False.
        """
        ...


class TorchDinoImage:
    """groundingdino's backbone, input projections and positions (its own forward) under autocast."""

    name = "torch"

    def __init__(self, model: GroundingDINO, dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.dtype = dtype

    @torch.inference_mode()
    def run(self, image: torch.Tensor) -> ImageLevels:
        from groundingdino.util.misc import NestedTensor, nested_tensor_from_tensor_list

        model: Any = self.model  # groundingdino's GroundingDINO: its submodules are untyped
        samples = nested_tensor_from_tensor_list([image])
        with torch.autocast(image.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            features, poss = model.backbone(samples)
            srcs, masks = [], []
            for level, feature in enumerate(features):
                src, mask = feature.decompose()
                srcs.append(model.input_proj[level](src))
                masks.append(mask)
            for level in range(len(srcs), model.num_feature_levels):
                src = model.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
                mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
                poss.append(model.backbone[1](NestedTensor(src, mask)).to(src.dtype))
                srcs.append(src)
                masks.append(mask)
        return ImageLevels(srcs=srcs, masks=masks, poss=list(poss))


def example_image() -> torch.Tensor:
    """An input for export: sides neither multiples of 32 nor of the window (7), nor equal, so none is
    specialised and every padding step is exercised."""
    return torch.randn(1, 3, 299, 413, generator=torch.Generator().manual_seed(0))


def dynamic_shapes() -> tuple[dict[int, Any]]:
    """torch.export's dynamic sizes for ``DinoImageGraph.forward``'s image (height and width)."""
    from torch.export import Dim

    return ({2: Dim("height", min=MIN_SIDE, max=MAX_SIDE), 3: Dim("width", min=MIN_SIDE, max=MAX_SIDE)},)


# The Swin rewrite's sizes are ceil-divisions that torch.export's solver can't relate to each other
# (it can't prove 7 * ((n + 6) // 7) >= n): with this option those facts become runtime checks in the
# exported graph instead of refusing the export; OpenVINO computes the shapes from the ops themselves.
EXPORT_OPTIONS = {"prefer_deferred_runtime_asserts_over_guards": True}


class OpenVinoDinoImage:
    """``DinoImageRuntime`` on OpenVINO's CPU plugin; thread-safe (one inference at a time)."""

    name = "openvino"

    def __init__(self, model: GroundingDINO, dtype: torch.dtype, cache_dir: Path, identity: dict[str, object],
                 fallback: DinoImageRuntime) -> None:
        """Convert (or read from ``cache_dir``) and compile the image half.

        Arguments:
          model: Grounding DINO on the CPU, weights loaded (``detector.prepare``).
          dtype: float32 or bfloat16: OpenVINO's inference precision, and the features' dtype.
          cache_dir: the converted graphs' folder; identity: what names this checkpoint in its key.
          fallback: runs the images the graph does not serve (``fits``).
        Raises ConversionError when the model does not export or convert, ValueError for a model the
        graph does not cover.
        """
        import openvino as ov

        from .openvino_cache import PRECISION_HINTS, compile_for_cpu, load_or_convert

        if dtype not in PRECISION_HINTS:
            raise ValueError(f"no OpenVINO precision for {dtype}")
        self.precision = PRECISION_HINTS[dtype]
        self.dtype = dtype
        self.fallback = fallback
        self.conversion: Conversion
        key = DinoGraphKey("image", identity, self.precision, GRAPH_VERSION,
                           {"min_side": MIN_SIDE, "max_side": MAX_SIDE})
        graph, self.conversion = load_or_convert(DinoImageGraph(model).eval(), (example_image(),), key, cache_dir,
                                                 dynamic_shapes(), EXPORT_OPTIONS)
        started = time.perf_counter()
        compiled: ov.CompiledModel = compile_for_cpu(ov.Core(), graph, self.precision)
        self.compile_seconds = time.perf_counter() - started
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def fits(self, image: torch.Tensor) -> bool:
        """Whether the graph serves this 3 x H x W image: both sides within the export's bounds."""
        return all(MIN_SIDE <= side <= MAX_SIDE for side in image.shape[-2:])

    def run(self, image: torch.Tensor) -> ImageLevels:
        if not self.fits(image):
            logger.info("Grounding DINO's image half runs on torch for a %s x %s image: OpenVINO's graph serves "
                        "sides of %d to %d px", image.shape[-2], image.shape[-1], MIN_SIDE, MAX_SIDE)
            return self.fallback.run(image)
        pixels = image.detach().to("cpu", torch.float32)[None].numpy()
        with self._lock:
            self._request.infer([pixels])
            # Copied: the request reuses its output buffers on the next call.
            outputs = [torch.from_numpy(np.array(self._request.get_output_tensor(i).data)) for i in range(2 * LEVELS)]
        # In the engine's dtype, as torch's autocast leaves them: the cached features are the same kind
        # (and size in bytes) whichever runtime made them.
        srcs, poss = [t.to(self.dtype) for t in outputs[:LEVELS]], [t.to(self.dtype) for t in outputs[LEVELS:]]
        return ImageLevels(srcs=srcs, masks=unpadded_masks(srcs), poss=poss)


def build_dino_image_runtime(config: EngineConfig, model: GroundingDINO, device: torch.device,
                             dtype: torch.dtype) -> DinoImageRuntime:
    """The runtime ``config.runtime`` asks for on ``device``; torch when OpenVINO can't serve.

    ``model`` must already be on ``device`` (``detector.prepare``). auto: OpenVINO on CPU, torch on
    CUDA. openvino: OpenVINO where the model is on the CPU; on CUDA the image half stays on torch
    (logged), as the text half does. A failed import, export, conversion or compile logs one line
    with the cause and returns the torch runtime.
    """
    torch_runtime: DinoImageRuntime = TorchDinoImage(model, dtype)
    return with_openvino(config, device, "image", torch_runtime, lambda cache_dir, identity: OpenVinoDinoImage(
        model, dtype, cache_dir, identity, torch_runtime), logger)
