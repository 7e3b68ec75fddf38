"""SAM's image encoder on OpenVINO's CPU runtime: converted once per checkpoint, cached on disk.

Conversion and the on-disk cache are ``openvino_cache``'s (torch.export, then OpenVINO IR named by a
digest of ``CacheKey``: the checkpoint's sha256, the architecture, the OpenVINO version, the input
side, the precision and the graph kind), so a warm start reads the file and never converts again.
The inference precision is always set explicitly (OpenVINO would pick bf16 by itself on CPUs with
AMX or avx512_bf16): f32 gives the torch path's numbers to ~1e-5.

Two graph kinds: "plain" (``encoder_graph.PlainEncoder``, or the encoder as it is when not SAM's ViT:
features) and "capture" (``encoder_graph.CapturingEncoder``:
features plus the explanation's reductions in the same pass). Only the kind the engine asks for is
converted and compiled; the other is made on first use. A bf16 capture graph on a CPU with AMX runs
its global blocks as the operations library's node (``global_attention``: no N x N tensor written per
head), where the library builds; elsewhere in OpenVINO's own ops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
import torch
from torch import nn

from . import sam_attention
from .encoder_graph import AttentionForm, CapturingEncoder, PlainEncoder, global_block_indices
from .encoder_runtime import EncodedImage, describe_error, query_weights, reduced_attention
from .openvino_cache import PRECISION_HINTS, Conversion, ConversionError, compile_for_cpu, key_digest, load_or_convert

if TYPE_CHECKING:
    from .encoder_runtime import ImageEncoder
    from .openvino_ops import OpsLibrary

logger = logging.getLogger(__name__)

# Bump when the converted graph changes (3: matrix only at the last block; 4: windowed attention's head
# chunks concatenated, sam_attention._sdpa; 5: every block in encoder_blocks' layouts, fewer permutes,
# global blocks one head at a time from per-head linears): old files are then unused.
GRAPH_VERSION = 5


@dataclass(frozen=True)
class CacheKey:
    """Everything a converted encoder depends on; its digest names the file."""

    identity: Mapping[str, object]  # checkpoint sha256, variant, architecture overrides
    input_side: int  # the encoder's S x S input
    precision: str  # OpenVINO inference precision hint: f32, bf16, f16
    capture: bool  # graph kind: with the attention outputs or not
    openvino: str = ov.get_version()
    graph_version: int = GRAPH_VERSION
    attention: AttentionForm = "explicit"  # the capture graph's global blocks: OpenVINO's ops or the library's
    what = "SAM's image encoder"  # for openvino_cache's log lines

    def as_json(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "identity": dict(self.identity), "input_side": self.input_side, "precision": self.precision,
            "capture": self.capture, "openvino": self.openvino, "graph_version": self.graph_version}
        if self.attention != "explicit":  # the explicit graphs keep the names they had
            fields["attention"] = self.attention
        return fields

    @property
    def stem(self) -> str:
        digest = key_digest(self.as_json())
        kind = "capture" if self.capture else "plain"
        return f"sam-{self.identity.get('sam_variant', 'encoder')}-{self.input_side}px-{self.precision}-{kind}-{digest}"


class OpenVinoImageEncoder:
    """``ImageEncoderRuntime`` on OpenVINO's CPU plugin; thread-safe (one inference at a time)."""

    name = "openvino"

    def __init__(self, image_encoder: ImageEncoder, dtype: torch.dtype, device: torch.device, capture: bool,
                 cache_dir: Path, identity: Mapping[str, object],
                 reload_torch: Callable[[], ImageEncoder] | None = None) -> None:
        """Convert (or read from ``cache_dir``) and compile the graph kind ``capture`` asks for.

        Arguments:
          image_encoder: SAM's ViT (or MobileSAM's TinyViT) encoder, weights loaded.
          dtype: float32, bfloat16 or float16: OpenVINO's inference precision.
          device: where the features are returned (inference runs on the CPU).
          capture: the graph kind compiled now (the other is made on first use).
          cache_dir: the converted graphs' folder; identity: what names this checkpoint in its keys.
          reload_torch: when given, ``image_encoder``'s weights are freed once the graph is compiled
            (the engine's case), and this loads the encoder again (from the checkpoint) should the other
            graph kind be asked for later: it is converted or read from the cache with those weights.
        Raises ConversionError when the encoder does not convert.
        """
        if dtype not in PRECISION_HINTS:
            raise ValueError(f"no OpenVINO precision for {dtype}")
        self.encoder = image_encoder
        self.device = device
        self.img_size = int(image_encoder.img_size)
        self.precision = PRECISION_HINTS[dtype]
        self.global_blocks = global_block_indices(image_encoder)
        self.num_heads = int(image_encoder.blocks[self.global_blocks[-1]].attn.num_heads) if self.global_blocks else 0
        self.cache_dir = cache_dir
        self.identity = dict(identity)
        self.conversions: dict[bool, Conversion] = {}
        self.compile_seconds: dict[bool, float] = {}
        self._compiled: dict[bool, ov.InferRequest] = {}
        self._attention_ops: tuple[OpsLibrary | None] | None = None  # found on the first capture graph
        self._lock = threading.Lock()
        self._core = ov.Core()
        self.torch_released = False
        self._reload_torch = reload_torch
        with self._lock:
            self._request(capture and bool(self.global_blocks))  # convert/compile now, not in the first task
            if reload_torch is not None:
                self._release_torch()

    def prepare(self, capture: bool) -> None:
        """Convert (or read) and compile the graph kind now rather than in the first encode asking for it."""
        with self._lock:
            self._request(capture and bool(self.global_blocks))

    def _release_torch(self) -> None:
        """Free the torch encoder's weights: the compiled graph holds its own copy (vit_b 360 MB, vit_h
        2.5 GB in f32), and an engine asks for one graph kind only (``config.explanations``), compiled by
        now. The module stays shared with ``Sam`` with its structure and shapes (``hollow_weights``;
        TinyViT rebuilds a buffer from its biases in ``eval``)."""
        from .heap import return_freed_memory
        from .models import hollow_weights

        hollow_weights(self.encoder)
        self.torch_released = True
        return_freed_memory()  # the engine keeps freed memory for reuse: these pages are gone for good

    def _request(self, capture: bool) -> ov.InferRequest:
        request = self._compiled.get(capture)
        if request is not None:
            return request
        encoder = self.encoder
        if self.torch_released and self._reload_torch is not None:
            # Loaded again for this one conversion (or cache read) and dropped after: the freed module
            # would convert to a graph of zeros if the cache file turned out unusable.
            try:
                encoder = self._reload_torch()
            except Exception as exc:  # noqa: BLE001 - whatever stops the reload, name it
                raise ConversionError(f"the torch encoder could not be loaded again ({describe_error(exc)})") from exc
        compiled, conversion = self._convert(encoder, capture, self._fused_attention_ops() if capture else None)
        del encoder
        self.conversions[capture] = conversion
        request = compiled.create_infer_request()
        self._compiled[capture] = request
        return request

    def _convert(self, encoder: ImageEncoder, capture: bool, ops: OpsLibrary | None
                 ) -> tuple[ov.CompiledModel, Conversion]:
        """The graph kind converted (or read from the cache) and compiled; a capture graph's global blocks
        as the library's node when ``ops`` is given. Such a graph that fails to convert or compile is made
        again with OpenVINO's own ops (one log line), rather than the encoder falling back to torch."""
        side = self.img_size
        image = torch.zeros(1, 3, side, side)
        # SAM's ViT in encoder_blocks' layouts; other encoders (MobileSAM's TinyViT) as they are.
        module: nn.Module = PlainEncoder(encoder) if sam_attention.supports_encoder_attention(encoder) else encoder
        example: tuple[torch.Tensor, ...] = (image,)
        attention: AttentionForm = "fused" if ops else "explicit"  # ops come with capture graphs only
        if capture:
            grid = side // self._patch()
            module = CapturingEncoder(encoder, attention=attention, bf16=self.precision == "bf16")
            example = (image, torch.full((1, grid * grid), 1.0 / grid ** 2))
        key = CacheKey(self.identity, side, self.precision, capture, attention=attention)
        try:
            model, conversion = load_or_convert(module, example, key, self.cache_dir, ops=ops)
            started = time.perf_counter()
            compiled = compile_for_cpu(self._core, model, self.precision)
        except (ConversionError, RuntimeError) as exc:
            if attention == "explicit":
                raise
            logger.warning("SAM's capture graph with the operations library's attention failed (%s); "
                           "making it with OpenVINO's own ops", describe_error(exc))
            self._attention_ops = (None,)
            return self._convert(encoder, capture, None)
        self.compile_seconds[capture] = time.perf_counter() - started
        return compiled, conversion

    def _fused_attention_ops(self) -> OpsLibrary | None:
        """The operations library when the capture graph's global blocks are to run as its node: bf16
        graphs on a CPU with AMX or AVX512-BF16, where the kernel's products run in bf16 (its f32 path is
        slower than OpenVINO's matmuls). None elsewhere, or where the library does not build (logged once)."""
        if self._attention_ops is None:
            from .models import cpu_flags
            from .openvino_ops import bf16_products, load_for

            ops = None
            if self.precision == "bf16" and bf16_products(cpu_flags()):
                ops = load_for(self.cache_dir, "SAM's capture graph keeps OpenVINO's own attention ops")
            self._attention_ops = (ops,)
        return self._attention_ops[0]

    def _patch(self) -> int:
        return int(self.encoder.patch_embed.proj.kernel_size[0])

    def encode(self, image: torch.Tensor, input_size: tuple[int, int], capture: bool) -> EncodedImage:
        capture = capture and bool(self.global_blocks)
        pixels = image.detach().to("cpu", torch.float32).numpy()
        with self._lock:
            request = self._request(capture)
            if not capture:
                request.infer([pixels])
                features = np.array(request.get_output_tensor(0).data)  # copied: the request reuses its buffers
                return EncodedImage(torch.from_numpy(features).to(self.device), None)
            grid_side = self.img_size // self._patch()
            grid = (grid_side, grid_side)
            request.infer([pixels, query_weights(grid, self.img_size, input_size)])
            outputs = [np.array(request.get_output_tensor(i).data) for i in range(len(self.global_blocks) + 3)]
        features, *received, column_mean, matrix = outputs
        attention = reduced_attention(self.global_blocks, self.num_heads, grid, received, column_mean, matrix)
        return EncodedImage(torch.from_numpy(features).to(self.device), attention)
