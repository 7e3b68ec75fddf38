"""The engine: image + prompt -> labelled masks (Grounding DINO -> SAM)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .cache import LruCache
from .config import EngineConfig
from .detector import Caption, DinoImageFeatures, GroundingDinoDetector, RawPredictions, parse_prompt
from .explainer import build_explanation
from .heap import FreedMemoryBound, freed_memory_is_reused, reuse_freed_memory
from .images import ImageInput, image_digest, load_rgb
from .segmenter import ImageEmbedding, SamSegmenter
from .types import Detection, Explanation, Segment

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

logger = logging.getLogger(__name__)

class Engine:
    """Loads both models once; ``segment`` is safe to call from many threads."""

    def __init__(self, config: EngineConfig, detector: GroundingDinoDetector | None = None,
                 segmenter: SamSegmenter | None = None) -> None:
        self.config = config
        if detector is None or segmenter is None:
            from .models import build_grounding_dino, build_sam, resolve_device, resolve_dtype
            from .weights import ensure_ready

            ensure_ready(config)
            device = resolve_device(config.device)
            if device.type == "cpu" and config.reuse_freed_memory:
                reuse_freed_memory()
            dtype = resolve_dtype(config.precision, device)
            if detector is None:
                from .detector import prepare
                from .dino_image_runtime import build_dino_image_runtime
                from .dino_runtime import build_dino_text_runtime
                from .dino_weights import release_torch_weights

                def load_dino() -> GroundingDINO:
                    return prepare(build_grounding_dino(config), device)

                dino = load_dino()
                detector = GroundingDinoDetector(dino, device, dtype, config.dino_image_size, config.dino_max_size,
                                                 build_dino_text_runtime(config, dino, device, dtype),
                                                 build_dino_image_runtime(config, dino, device, dtype))
                # Both halves on OpenVINO: its graphs hold their own weights, so torch's are freed (and
                # loaded again the same way should an input need them).
                release_torch_weights(detector, load_dino)
            if segmenter is None:
                from .encoder_runtime import build_encoder_runtime

                sam = build_sam(config)
                segmenter = SamSegmenter(sam, device, dtype,
                                         build_encoder_runtime(config, sam.image_encoder, device, dtype))
        self.detector = detector
        self.segmenter = segmenter
        # The runtimes that serve (after any fallback to torch), not the setting.
        self.model_version = model_version(config, runtime_label(self.segmenter.encoder.name,
                                                                 self.detector.text_runtime.name,
                                                                 self.detector.image_runtime.name))
        # Bounded in bytes as well as entries: a feature map's size follows the image's aspect ratio,
        # an explanation's the number of masks. EMBEDDING_CACHE_BYTES is shared by the two models.
        per_model = config.embedding_cache_bytes // 2
        self._dino_features: LruCache[DinoImageFeatures] = LruCache(config.embedding_cache_size, per_model)
        self._sam_embeddings: LruCache[ImageEmbedding] = LruCache(config.embedding_cache_size, per_model)
        self._explanations: LruCache[Explanation] = LruCache(config.explanation_cache_size,
                                                             config.explanation_cache_bytes)
        # Grounding DINO's scores of every query for an image + caption (~0.9 MiB): they don't depend on
        # the thresholds, so moving a threshold re-runs neither model's encoders nor DINO's text half,
        # only the selection and SAM's mask decoder. A quarter of the explanation budget.
        self._dino_predictions: LruCache[RawPredictions] = LruCache(config.explanation_cache_size,
                                                                    config.explanation_cache_bytes // 4)
        # One encoder run at a time per model: concurrent runs would only split the same cores, and
        # explanation capture swaps module forwards for the duration of a run.
        self.dino_lock = threading.Lock()
        self.sam_lock = threading.Lock()
        # Where freed memory is kept for reuse (backend/heap.py), what is kept stays bounded.
        self.freed_memory = FreedMemoryBound(config.freed_memory_kept) if freed_memory_is_reused() else None

    @classmethod
    def from_env(cls) -> Engine:
        return cls(EngineConfig.from_env())

    # -- per-image features (cached by image content) ---------------------------------------
    def dino_features(self, image: np.ndarray, digest: str | None = None) -> DinoImageFeatures:
        def compute() -> DinoImageFeatures:
            with self.dino_lock:
                return self.detector.image_features(image)

        return self._dino_features.get_or_compute(digest or image_digest(image), compute)

    def sam_embedding(self, image: np.ndarray, digest: str | None = None) -> ImageEmbedding:
        def compute() -> ImageEmbedding:
            with self.sam_lock:
                return self.segmenter.embed(image, capture_attention=self.config.explanations)

        return self._sam_embeddings.get_or_compute(digest or image_digest(image), compute)

    def dino_predictions(self, features: DinoImageFeatures, digest: str) -> Callable[[Caption], RawPredictions]:
        """A caption's ``RawPredictions`` over the image ``digest`` names (``features``), cached."""
        def predictions(caption: Caption) -> RawPredictions:
            return self._dino_predictions.get_or_compute(
                (digest, caption.model_inputs), lambda: self.detector.raw_predictions(features, caption))

        return predictions

    # -- the pipeline ----------------------------------------------------------------------
    def load_image(self, image: ImageInput) -> np.ndarray:
        return load_rgb(image, max_pixels=self.config.max_image_pixels)

    def detect(self, image: ImageInput, prompt: str | Sequence[str], box_threshold: float | None = None,
               text_threshold: float | None = None) -> list[Detection]:
        rgb = self.load_image(image)
        digest, phrases, box_threshold, text_threshold = self._explanation_key(rgb, prompt, box_threshold,
                                                                               text_threshold)
        features = self.dino_features(rgb, digest)
        return self.detector.detect(features, phrases, box_threshold, text_threshold, self.config.nms_iou,
                                    self.config.max_detections, self.dino_predictions(features, digest))

    def segment(self, image: ImageInput, prompt: str | Sequence[str], box_threshold: float | None = None,
                text_threshold: float | None = None) -> list[Segment]:
        """Labelled masks for every phrase of ``prompt`` found in ``image`` (best score first)."""
        return list(self.explain(image, prompt, box_threshold, text_threshold).segments)

    def explain(self, image: ImageInput, prompt: str | Sequence[str], box_threshold: float | None = None,
                text_threshold: float | None = None) -> Explanation:
        """The segments with the attention that made them; cached per image, prompt and thresholds."""
        return self.explain_and_tell(image, prompt, box_threshold, text_threshold)[0]

    def explain_and_tell(self, image: ImageInput, prompt: str | Sequence[str], box_threshold: float | None = None,
                         text_threshold: float | None = None) -> tuple[Explanation, bool]:
        """``explain``, and whether the explanation came from the cache: the image decoded and its
        pixels hashed once (asking ``cached_explanation`` first hashes them twice: ~40 ms for a 12 MP
        photo)."""
        rgb = self.load_image(image)
        key = self._explanation_key(rgb, prompt, box_threshold, text_threshold)
        cached = self._explanations.get(key)
        if cached is not None:
            return cached, True
        return self._explanations.get_or_compute(key, lambda: self._explain_and_settle(rgb, key)), False

    def _explain_and_settle(self, rgb: np.ndarray, key: tuple) -> Explanation:
        try:
            return self._explain(rgb, *key)
        finally:  # the task's activations are freed by now, whether it ran to the end or not
            if self.freed_memory is not None:
                self.freed_memory.after_task()

    def cached_explanation(self, image: ImageInput, prompt: str | Sequence[str], box_threshold: float | None = None,
                           text_threshold: float | None = None) -> Explanation | None:
        """The explanation if this image + prompt + thresholds ran already, without running anything."""
        return self._explanations.get(self._explanation_key(self.load_image(image), prompt, box_threshold,
                                                            text_threshold))

    def _explanation_key(self, rgb: np.ndarray, prompt, box_threshold, text_threshold) -> tuple:
        box_threshold = self.config.box_threshold if box_threshold is None else _unit(box_threshold, "box_threshold")
        text_threshold = (self.config.text_threshold if text_threshold is None
                          else _unit(text_threshold, "text_threshold"))
        return image_digest(rgb), tuple(parse_prompt(prompt)), box_threshold, text_threshold

    def _explain(self, rgb: np.ndarray, digest: str, phrases: tuple[str, ...], box_threshold: float,
                 text_threshold: float) -> Explanation:
        features = self.dino_features(rgb, digest)
        detections = self.detector.detect(features, phrases, box_threshold, text_threshold, self.config.nms_iou,
                                          self.config.max_detections, self.dino_predictions(features, digest))
        embedding = self.sam_embedding(rgb, digest)
        decoded = self.segmenter.segment(embedding, np.array([d.prompt_box for d in detections]).reshape(-1, 4),
                                         capture_attention=self.config.explanations)
        segments = [Segment.from_detection(d, m, float(i)) for d, m, i in
                    zip(detections, decoded.masks, decoded.ious, strict=True)]
        encoder = self.segmenter.sam.image_encoder
        patch = self.segmenter.img_size // embedding.features.shape[-1]
        return build_explanation(self.model_version, segments, embedding, decoded, int(encoder.img_size), patch)

    def describe(self) -> dict[str, str]:
        return {
            "sam": f"{self.config.sam_variant} ({self.config.sam_checkpoint_path.name})",
            "grounding_dino": f"{self.config.dino_variant} ({self.config.dino_checkpoint_path.name})",
            "device": str(self.segmenter.device),
            "dtype": str(self.segmenter.dtype).replace("torch.", ""),
            "sam_encoder_runtime": self.segmenter.encoder.name,
            "dino_text_runtime": self.detector.text_runtime.name,
            "dino_image_runtime": self.detector.image_runtime.name,
        }


def _unit(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")
    return value


def model_version(config: EngineConfig, runtime: str | None = None) -> str:
    """A stable string for a model + settings: same files and settings -> same version everywhere.

    The precision is the one in effect ("auto" is fp32 on CPU, bf16 on most GPUs): outputs differ.
    So do the runtimes of SAM's image encoder and Grounding DINO's two halves: off torch the version ends
    in ``-<runtime_label>`` (torch's versions are those from before there was a choice, so predictions
    stored then still count).

    Arguments:
        config: the engine's settings.
        runtime: ``runtime_label`` of the runtimes that serve (after any fallback); None before the
            models load: what RUNTIME resolves to here (``expected_runtime``).
    Returns:
        ``grounded-sam-<sam>-<dino>-<10 hex digits>``, plus ``-openvino`` when all three parts run on
        OpenVINO (``-sam-openvino-dino-torch`` and the like when they differ).
    """
    from .models import effective_precision

    settings = {
        "sam": config.sam_variant, "sam_arch": config.sam_arch, "dino": config.dino_variant,
        "dino_arch": config.dino_arch, "box": config.box_threshold, "text": config.text_threshold,
        "nms": config.nms_iou, "max": config.max_detections, "dino_size": config.dino_image_size,
        "sam_file": _file_fingerprint(config.sam_checkpoint_path),
        "dino_file": _file_fingerprint(config.dino_checkpoint_path),
        "precision": effective_precision(config),
        "sam_prompt": "unclipped-box",  # SAM is prompted with DINO's box before clipping
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    runtime = runtime or _expected_runtime(config)
    return f"grounded-sam-{config.sam_variant}-{config.dino_variant}-{digest}" + (
        "" if runtime == "torch" else f"-{runtime}")


def runtime_label(sam_encoder: str, dino_text: str, dino_image: str) -> str:
    """One name for the runtimes of SAM's encoder and Grounding DINO's text and image halves: the
    runtime itself when all agree, else who runs on what ("sam-openvino-dino-torch"; DINO's halves are
    named apart only when they differ: "sam-openvino-dino-image-torch-text-openvino")."""
    if sam_encoder == dino_text == dino_image:
        return sam_encoder
    dino = dino_text if dino_image == dino_text else f"image-{dino_image}-text-{dino_text}"
    return f"sam-{sam_encoder}-dino-{dino}"


def _expected_runtime(config: EngineConfig) -> str:
    from .encoder_runtime import expected_runtime
    from .models import ModelLoadError, resolve_device

    try:
        device = resolve_device(config.device)
    except ModelLoadError:
        return "torch"  # the engine can't load here (effective_precision names the setting likewise)
    sam_encoder = expected_runtime(config.runtime, device)
    # Grounding DINO's halves run where its weights are: OpenVINO only with the model on the CPU.
    dino = sam_encoder if device.type == "cpu" else "torch"
    return runtime_label(sam_encoder, dino, dino)


def _file_fingerprint(path) -> str:
    """Size plus a hash of the first and last MiB: tells checkpoints apart without reading GBs."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
    except OSError:
        return "missing"
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"
