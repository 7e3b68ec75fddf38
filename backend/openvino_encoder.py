"""SAM's image encoder on OpenVINO's CPU runtime: converted once per checkpoint, cached on disk.

Conversion goes through ``torch.export`` (seconds and about a GB for vit_b; tracing took minutes and
9-14 GB) and ``openvino.convert_model``; the result is saved as OpenVINO IR (f32 weights; f16 for bf16 inference) in
``cache_folder(config)``, named by a digest of the checkpoint's sha256, the architecture, the
OpenVINO version, the input side, the precision and the graph kind, so a warm start reads the file
and never converts again. The inference precision is always set explicitly (OpenVINO would pick bf16
by itself on CPUs with AMX or avx512_bf16): f32 gives the torch path's numbers to ~1e-5.

Two graph kinds: "plain" (the encoder: features) and "capture" (``encoder_graph.CapturingEncoder``:
features plus the explanation's reductions in the same pass). Only the kind the engine asks for is
converted and compiled; the other is made on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
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
from .encoder_graph import CapturingEncoder, global_block_indices
from .encoder_runtime import EncodedImage, EncoderAttention, describe_error, valid_tokens

if TYPE_CHECKING:
    from .config import EngineConfig
    from .encoder_runtime import ImageEncoder

logger = logging.getLogger(__name__)

GRAPH_VERSION = 3  # bump when encoder_graph's graph changes (3: matrix only at the last block): old files unused
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class ConversionError(RuntimeError):
    """The encoder could not be exported or converted to OpenVINO."""


def cache_folder(config: EngineConfig) -> Path:
    """Where converted encoders live: ``OPENVINO_CACHE_DIR`` if set, else ``openvino/`` beside the SAM
    checkpoint; when that folder can't be written, the user's cache folder (logged)."""
    if config.openvino_cache_dir is not None:
        return Path(config.openvino_cache_dir)
    beside = Path(config.sam_checkpoint_path).parent / "openvino"
    if _writable(beside):
        return beside
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grounded-sam" / "openvino"
    logger.info("%s is read-only; converted SAM encoders are cached in %s (set OPENVINO_CACHE_DIR to choose)",
                beside, fallback)
    return fallback


def _writable(folder: Path) -> bool:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class CacheKey:
    """Everything a converted encoder depends on; its digest names the file."""

    identity: Mapping[str, object]  # checkpoint sha256, variant, architecture overrides
    input_side: int  # the encoder's S x S input
    precision: str  # OpenVINO inference precision hint: f32, bf16, f16
    capture: bool  # graph kind: with the attention outputs or not
    openvino: str = ov.get_version()
    graph_version: int = GRAPH_VERSION

    def as_json(self) -> dict[str, object]:
        return {"identity": dict(self.identity), "input_side": self.input_side, "precision": self.precision,
                "capture": self.capture, "openvino": self.openvino, "graph_version": self.graph_version}

    @property
    def stem(self) -> str:
        digest = hashlib.sha256(json.dumps(self.as_json(), sort_keys=True, default=str).encode()).hexdigest()[:16]
        kind = "capture" if self.capture else "plain"
        return f"sam-{self.identity.get('sam_variant', 'encoder')}-{self.input_side}px-{self.precision}-{kind}-{digest}"


@dataclass(frozen=True)
class Conversion:
    """How one graph kind was obtained at load."""

    path: Path | None  # the IR's .xml (None: converted but the folder could not be written)
    converted: bool  # True: exported and converted in this load; False: read from the cache
    seconds: float  # export + convert (or read) time
    size_bytes: int  # IR on disk (.xml + .bin)


def convert(module: nn.Module, example: tuple[torch.Tensor, ...]) -> ov.Model:
    """torch.export of ``module`` at the example inputs' shapes, then openvino.convert_model."""
    try:
        with torch.no_grad():
            exported = torch.export.export(module, example)
        return ov.convert_model(exported)
    except Exception as exc:
        raise ConversionError(f"{type(module).__name__} did not convert ({describe_error(exc)})") from exc


def _ir_size(xml: Path) -> int:
    return sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")) if p.is_file())


def _read_cached(xml: Path, key: CacheKey) -> ov.Model:
    meta = json.loads(xml.with_suffix(".json").read_text())
    if meta.get("key") != json.loads(json.dumps(key.as_json(), default=str)):
        raise ValueError("its key file does not match")
    if xml.with_suffix(".bin").stat().st_size != meta.get("bin_bytes"):
        raise ValueError("its weights file has the wrong size")
    return ov.Core().read_model(xml)


def _save(model: ov.Model, xml: Path, key: CacheKey, seconds: float) -> Path | None:
    """Write the IR beside a key file, each renamed into place (.xml last: a present .xml is complete)."""
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".converting-") as tmp:
            part = Path(tmp) / xml.name
            ov.save_model(model, part, compress_to_fp16=False)  # f16 weights would change f32 numbers
            if key.precision != "f32":
                # bf16 inference rounds the weights further anyway: store them at half the size. (A model
                # fresh from convert_model keeps f32 whatever compress_to_fp16 says; one read back does not.)
                half = Path(tmp) / "f16" / xml.name
                ov.save_model(ov.Core().read_model(part), half, compress_to_fp16=True)
                part = half
            meta = {"key": key.as_json(), "bin_bytes": part.with_suffix(".bin").stat().st_size,
                    "convert_seconds": round(seconds, 2)}
            part.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
            for suffix in (".bin", ".json", ".xml"):
                os.replace(part.with_suffix(suffix), xml.with_suffix(suffix))
        return xml
    except OSError as exc:
        logger.warning("could not cache the converted SAM encoder in %s (%s); it converts again next start",
                       xml.parent, exc)
        return None


def load_or_convert(module: nn.Module, example: tuple[torch.Tensor, ...], key: CacheKey,
                    folder: Path) -> tuple[ov.Model, Conversion]:
    """The cached IR for ``key`` if present and sound, else a fresh conversion (then cached).

    An unreadable cache file (truncated, edited, another key) is converted again and replaced.
    Raises ConversionError when the module does not convert.
    """
    xml = folder / f"{key.stem}.xml"
    if xml.is_file():
        started = time.perf_counter()
        try:
            model = _read_cached(xml, key)
            return model, Conversion(xml, False, time.perf_counter() - started, _ir_size(xml))
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, a conversion replaces it
            logger.warning("cached OpenVINO encoder %s is unusable (%s); converting again", xml, describe_error(exc))
    started = time.perf_counter()
    model = convert(module, example)
    seconds = time.perf_counter() - started
    saved = _save(model, xml, key, seconds)
    logger.info("converted SAM's image encoder to OpenVINO in %.1f s (%s)", seconds, saved or "not cached")
    if saved is not None:
        model = ov.Core().read_model(saved)  # what every warm start will run (f16-stored weights at bf16)
    return model, Conversion(saved, True, seconds, _ir_size(saved) if saved else 0)


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
        self.dtype = dtype
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
        now. The module stays shared with ``Sam`` with its structure and shapes: each tensor becomes one
        zero broadcast to its shape (one element stored), so ``.eval()``/``.to()`` and code reading
        shapes still work (TinyViT rebuilds a buffer from its biases in ``eval``)."""
        from .heap import return_freed_memory

        def hollow(tensor: torch.Tensor) -> torch.Tensor:
            return torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)

        with torch.no_grad():
            for tensor in (*self.encoder.parameters(), *self.encoder.buffers()):
                tensor.data = hollow(tensor)
        self.torch_released = True
        return_freed_memory()  # the engine keeps freed memory for reuse: these pages are gone for good

    def _request(self, capture: bool) -> ov.InferRequest:
        request = self._compiled.get(capture)
        if request is not None:
            return request
        side = self.img_size
        image = torch.zeros(1, 3, side, side)
        encoder = self.encoder
        if self.torch_released and self._reload_torch is not None:
            # Loaded again for this one conversion (or cache read) and dropped after: the freed module
            # would convert to a graph of zeros if the cache file turned out unusable.
            try:
                encoder = self._reload_torch()
            except Exception as exc:  # noqa: BLE001 - whatever stops the reload, name it
                raise ConversionError(f"the torch encoder could not be loaded again ({describe_error(exc)})") from exc
        module: nn.Module = encoder
        example: tuple[torch.Tensor, ...] = (image,)
        if capture:
            grid = side // self._patch()
            module, example = CapturingEncoder(encoder), (image, torch.full((1, grid * grid), 1.0 / grid ** 2))
        key = CacheKey(self.identity, side, self.precision, capture)
        model, conversion = load_or_convert(module, example, key, self.cache_dir)
        del encoder, module
        started = time.perf_counter()
        compiled = self._core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision,  # explicit: OpenVINO would choose bf16 on AMX CPUs
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # the same cores torch is given
            "PERFORMANCE_HINT": "LATENCY",
        })
        self.compile_seconds[capture] = time.perf_counter() - started
        self.conversions[capture] = conversion
        request = compiled.create_infer_request()
        self._compiled[capture] = request
        return request

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
            valid = valid_tokens(grid, self.img_size, input_size).ravel()
            weights = (valid / valid.sum()).astype(np.float32)[None]
            request.infer([pixels, weights])
            outputs = [np.array(request.get_output_tensor(i).data) for i in range(len(self.global_blocks) + 3)]
        features, *received, column_mean, matrix = outputs
        last = sam_attention.EncoderBlockAttention(
            block_index=self.global_blocks[-1], num_heads=self.num_heads, grid=grid,
            received=column_mean.reshape(-1, *grid).astype(np.float32, copy=False),
            matrix=matrix.astype(np.float16, copy=False))
        maps = {i: r[0].reshape(grid).astype(np.float32, copy=False)
                for i, r in zip(self.global_blocks, received, strict=True)}
        attention = EncoderAttention(received=maps, last_block=last)
        return EncodedImage(torch.from_numpy(features).to(self.device), attention)
