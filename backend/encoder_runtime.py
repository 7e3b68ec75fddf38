"""What runs SAM's image encoder (``RUNTIME``): torch, or the OpenVINO graph of ``openvino_encoder``.

``SamSegmenter.embed`` talks to an ``ImageEncoderRuntime`` only: the preprocessed image in, the
features and (if asked) the explanation's attention reductions out, so the decoder, masks and
explanations downstream are the same whichever runtime made them. ``build_encoder_runtime`` turns
the setting into one (auto: OpenVINO on CPU where the encoder converts, torch elsewhere), falling
back to torch with one log line naming the cause when OpenVINO can't serve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import torch

from . import sam_attention
from .global_attention import GlobalAttentionKernel, TorchAttention

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


def query_weights(grid: tuple[int, int], img_size: int, input_size: tuple[int, int]) -> np.ndarray:
    """(1, N) float32: 1/count on the tokens that saw real pixels, 0 on the padding (each query's weight in
    the attention a key receives)."""
    valid = valid_tokens(grid, img_size, input_size).ravel()
    return (valid / valid.sum()).astype(np.float32)[None]


def reduced_attention(global_blocks: Sequence[int], num_heads: int, grid: tuple[int, int],
                      received: Sequence[np.ndarray], column_mean: np.ndarray, matrix: np.ndarray) -> EncoderAttention:
    """``EncoderAttention`` from the capture's reductions (``encoder_graph.CapturingEncoder``'s outputs).

    Arguments:
      received: per global block, (1, N) float32, the attention each key receives from the weighted queries.
      column_mean: (1, N) float32, the last block's mean over all queries; matrix: (1, N, N) float16.
    """
    last = sam_attention.EncoderBlockAttention(
        block_index=global_blocks[-1], num_heads=num_heads, grid=grid,
        received=column_mean.reshape(-1, *grid).astype(np.float32, copy=False),
        matrix=matrix.astype(np.float16, copy=False))
    maps = {i: r[0].reshape(grid).astype(np.float32, copy=False) for i, r in zip(global_blocks, received, strict=True)}
    return EncoderAttention(received=maps, last_block=last)


class TorchImageEncoder:
    """The encoder's own forward under autocast; capture through ``sam_attention``'s sinks.

    With ``kernel`` (the operations library's global attention, ``global_attention.LibraryAttention``) a
    capture on CPU runs each global block through it and keeps only the reductions, as the OpenVINO
    capture graph does; on GPUs ``global_attention.TorchAttention`` does the same in torch ops; on a CPU
    without the kernel the global blocks record their head-averaged softmax in torch.
    """

    name = "torch"

    def __init__(self, image_encoder: ImageEncoder, dtype: torch.dtype = torch.float32,
                 kernel: GlobalAttentionKernel | None = None) -> None:
        self.encoder = image_encoder
        self.dtype = dtype
        self.img_size = int(image_encoder.img_size)
        self.has_global_attention = sam_attention.supports_encoder_attention(image_encoder)
        self.kernel = kernel if self.has_global_attention else None

    @torch.inference_mode()
    def encode(self, image: torch.Tensor, input_size: tuple[int, int], capture: bool) -> EncodedImage:
        autocast = torch.autocast(image.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            if not (capture and self.has_global_attention):
                return EncodedImage(self.encoder(image).float(), None)
            kernel = self.kernel_for(image.device)
            if kernel is not None:
                return self._encode_reduced(image, input_size, kernel)
            with sam_attention.capture_encoder_attention(self.encoder, "global", keep_matrix=True) as recorded:
                features = self.encoder(image)
        return EncodedImage(features.float(), self._reduce(recorded, input_size))

    def kernel_for(self, device: torch.device) -> GlobalAttentionKernel | None:
        """What runs the global blocks of a capture on ``device``: the library's kernel on CPU where given;
        on GPUs ``TorchAttention`` (the reductions on the device; torch's own capture would copy every
        global block's N x N matrix to the host and reduce it there); None: torch's own capture (CPUs
        without the kernel, where it reuses one buffer per head)."""
        if not self.has_global_attention:
            return None
        if device.type == "cpu":
            return self.kernel
        return TorchAttention()

    def _encode_reduced(self, image: torch.Tensor, input_size: tuple[int, int],
                        kernel: GlobalAttentionKernel) -> EncodedImage:
        grid_side = self.img_size // int(self.encoder.patch_embed.proj.kernel_size[0])
        grid = (grid_side, grid_side)
        weights = torch.from_numpy(query_weights(grid, self.img_size, input_size)).to(image.device)
        with sam_attention.capture_encoder_reductions(self.encoder, kernel, weights,
                                                      bf16=self.dtype == torch.bfloat16) as got:
            features = self.encoder(image)
        if got.column_mean is None or got.matrix is None:
            raise RuntimeError("the encoder's last global block did not run inside the capture")
        blocks = got.block_indices
        attention = reduced_attention(blocks, int(self.encoder.blocks[blocks[-1]].attn.num_heads), grid,
                                      [got.received[i].cpu().numpy() for i in blocks], got.column_mean.cpu().numpy(),
                                      got.matrix.cpu().numpy())
        return EncodedImage(features.float(), attention)

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
    if not wants_openvino(config.runtime, device):
        kernel = None
        if config.explanations:
            from .openvino_cache import cache_folder

            kernel = torch_capture_kernel(cache_folder(config), image_encoder, device, dtype)
        return TorchImageEncoder(image_encoder, dtype, kernel)
    torch_runtime = TorchImageEncoder(image_encoder, dtype)
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


def torch_capture_kernel(cache_dir: Path, image_encoder: ImageEncoder, device: torch.device,
                         dtype: torch.dtype) -> GlobalAttentionKernel | None:
    """The operations library's global attention for the torch runtime's explanations: on CPU in bf16
    where its products run in bf16 (AMX, AVX512-BF16: ``openvino_ops.bf16_products``); None elsewhere
    (torch's own capture runs: on GPUs, and where the kernel's f32 path would be slower than torch's), or
    when the library does not build in ``cache_dir``/ops (one log line)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not sam_attention.supports_encoder_attention(image_encoder):
        return None
    try:
        from .global_attention import LibraryAttention
        from .models import cpu_flags
        from .openvino_ops import bf16_products, load_for

        if not bf16_products(cpu_flags()):
            return None
        library = load_for(cache_dir, "explanations on the torch runtime write each head's softmax out")
        return LibraryAttention(library.path) if library else None
    except (ImportError, OSError, AttributeError) as exc:
        logger.warning("explanations on the torch runtime write each head's softmax out (slower, same results), "
                       "because the operations library's kernel is not available: %s", describe_error(exc))
        return None


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
