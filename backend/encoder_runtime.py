"""What runs SAM's image encoder (``RUNTIME``): torch, or the OpenVINO graph of ``openvino_encoder``.

``SamSegmenter.embed`` talks to an ``ImageEncoderRuntime`` only: the preprocessed image in, the
features and (if asked) the explanation's attention reductions out, so the decoder, masks and
explanations downstream are the same whichever runtime made them. ``build_encoder_runtime`` turns
the setting into one (auto: OpenVINO on CPU where the encoder converts, torch elsewhere), falling
back to torch with one log line naming the cause when OpenVINO can't serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import torch

from . import sam_attention

if TYPE_CHECKING:
    # No type information ships with these packages (mypy reads them as Any); the name says what is meant.
    from mobile_sam.modeling import TinyViT
    from segment_anything.modeling import ImageEncoderViT

    from .config import EngineConfig

    ImageEncoder: TypeAlias = ImageEncoderViT | TinyViT

logger = logging.getLogger(__name__)


@dataclass
class EncoderAttention:
    """The encoder's attention for one image, reduced right after the forward that produced it."""

    # Global block -> attention received by each token from the image's own (unpadded) tokens.
    received: dict[int, np.ndarray]
    # The last global block with its head-averaged matrix kept (float16), for per-mask maps.
    last_block: sam_attention.EncoderBlockAttention


@dataclass
class EncodedImage:
    """One encoder pass: the features, and the attention reductions when capture was asked and the
    encoder has global attention."""

    features: torch.Tensor  # 1 x C x 64 x 64 float32 on the segmenter's device
    attention: EncoderAttention | None


class ImageEncoderRuntime(Protocol):
    """Runs SAM's image encoder on one preprocessed image."""

    name: str  # "torch" or "openvino": what ``Engine.describe`` reports

    def encode(self, image: torch.Tensor, input_size: tuple[int, int], capture: bool) -> EncodedImage:
        """Encode one image.

        Arguments:
          image: 1 x 3 x S x S float32, normalised and padded (``SamSegmenter.preprocess``).
          input_size: (H, W) of the resized image inside the padded square.
          capture: also return the global blocks' attention (ignored by encoders without any).
        Returns:
          ``EncodedImage`` with 1 x C x h x w float32 features.
        """
        ...


def valid_tokens(grid: tuple[int, int], img_size: int, input_size: tuple[int, int]) -> np.ndarray:
    """(H_tok, W_tok) bool: the tokens that saw real pixels (a partial token at the edge counts)."""
    valid = np.zeros(grid, dtype=bool)
    patch = img_size // grid[0]
    valid[: -(-input_size[0] // patch), : -(-input_size[1] // patch)] = True
    return valid


class TorchImageEncoder:
    """The encoder's own forward under autocast; capture through ``sam_attention``'s sinks."""

    name = "torch"

    def __init__(self, image_encoder: ImageEncoder, dtype: torch.dtype = torch.float32) -> None:
        self.encoder = image_encoder
        self.dtype = dtype
        self.img_size = int(image_encoder.img_size)
        self.has_global_attention = sam_attention.supports_encoder_attention(image_encoder)

    @torch.inference_mode()
    def encode(self, image: torch.Tensor, input_size: tuple[int, int], capture: bool) -> EncodedImage:
        autocast = torch.autocast(image.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            if not (capture and self.has_global_attention):
                return EncodedImage(self.encoder(image).float(), None)
            with sam_attention.capture_encoder_attention(self.encoder, "global", keep_matrix=True) as recorded:
                features = self.encoder(image)
        return EncodedImage(features.float(), self._reduce(recorded, input_size))

    def _reduce(self, capture: sam_attention.EncoderAttentionCapture, input_size: tuple[int, int]) -> EncoderAttention:
        last = capture.last
        valid = valid_tokens(last.grid, self.img_size, input_size)
        received = {i: sam_attention.mask_attention_map(block, valid) for i, block in capture.blocks.items()}
        for block in capture.blocks.values():
            if block is not last:
                block.matrix = None  # only the last block's matrix is needed later (per-mask maps)
        return EncoderAttention(received=received, last_block=last)


def build_encoder_runtime(config: EngineConfig, image_encoder: ImageEncoder, device: torch.device,
                          dtype: torch.dtype) -> ImageEncoderRuntime:
    """The runtime ``config.runtime`` asks for on ``device``; torch when OpenVINO can't serve.

    auto: OpenVINO on CPU (where openvino imports and the encoder converts), torch on CUDA.
    openvino: OpenVINO on the CPU whatever ``device`` (the features are moved to ``device``).
    A failed import or conversion logs one line with the cause and returns the torch runtime. Once
    OpenVINO serves, ``image_encoder``'s torch weights are freed (the compiled graph has its own); the
    other graph kind, if ever asked for, is made from the checkpoint loaded again.
    """
    # SDPA for the windowed blocks: the torch path and the exported graph both run it.
    with_fast_attention(image_encoder)
    torch_runtime = TorchImageEncoder(image_encoder, dtype)
    if not wants_openvino(config.runtime, device):
        return torch_runtime
    try:
        from .openvino_cache import cache_folder
        from .openvino_encoder import OpenVinoImageEncoder
        from .weights import file_sha256

        return OpenVinoImageEncoder(
            image_encoder, dtype, device, capture=config.explanations, reload_torch=partial(load_image_encoder, config),
            cache_dir=cache_folder(config), identity=_identity(config, file_sha256(config.sam_checkpoint_path)))
    except Exception as exc:  # noqa: BLE001 - any failure to import, export, convert or compile
        logger.warning("RUNTIME=%s: SAM's image encoder runs on torch, because OpenVINO could not serve it: %s",
                       config.runtime, describe_error(exc))
        return torch_runtime


def wants_openvino(setting: str, device: torch.device) -> bool:
    """Whether RUNTIME=``setting`` asks for OpenVINO with the models on ``device`` (auto: on CPU only)."""
    return setting == "openvino" or (setting == "auto" and device.type == "cpu")


def expected_runtime(setting: str, device: torch.device) -> str:
    """The runtime ``build_encoder_runtime`` will pick, judged without loading anything: "openvino" when
    it is asked for and installed, else "torch" (a conversion that fails at load still falls back)."""
    import importlib.util

    return "openvino" if wants_openvino(setting, device) and importlib.util.find_spec("openvino") else "torch"


def load_image_encoder(config: EngineConfig) -> ImageEncoder:
    """SAM's image encoder from ``config``'s checkpoint, attention patched as ``build_encoder_runtime``
    patches it (the graph OpenVINO converts)."""
    from .models import build_sam

    return with_fast_attention(build_sam(config).image_encoder)


def with_fast_attention(encoder: ImageEncoder) -> ImageEncoder:
    """``encoder`` with SAM's attention patched where it has SAM's attention blocks (MobileSAM's
    TinyViT does not): the form the engine runs and OpenVINO converts."""
    if sam_attention.supports_encoder_attention(encoder):
        sam_attention.use_fast_attention(encoder)
    return encoder


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (bounded): enough to act on, in one log line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else 'no message'}"


def _identity(config: EngineConfig, sha256: str) -> dict[str, object]:
    """What makes a converted encoder this checkpoint's: the file's hash and the architecture built."""
    return {"sam_variant": config.sam_variant, "sam_arch": config.sam_arch, "checkpoint_sha256": sha256,
            "checkpoint": Path(config.sam_checkpoint_path).name}
