"""What runs Grounding DINO's text half (``RUNTIME``): torch, or its OpenVINO graph.

``GroundingDinoDetector.raw_predictions`` talks to a ``DinoTextRuntime`` only: one image's projected
features and one caption's encoding in (``dino_graph.DinoTextInputs``), token logits and boxes out.
Both runtimes run ``dino_graph.DinoTextGraph``: torch under autocast, OpenVINO as its ``torch.export``
graph with every size dynamic (the four feature levels' h and w, the caption's token count), so ONE
conversion serves every image aspect ratio and prompt; OpenVINO runs the image features padded to
a few size buckets (``bucket_sizes``), as it compiles kernels for each new set of sizes. Its
deformable attention is one node of the project's own operations library (``openvino_ops``, built on
first use), or grid_sample where that library can't be built (logged). The graph is cached like SAM's
encoder (``openvino_cache``). ``build_dino_text_runtime`` turns the setting into a
runtime exactly as SAM's ``build_encoder_runtime`` does: auto is OpenVINO on CPU, and a failure falls
back to torch with one log line naming the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from .dino_fast import DeformableCore
from .dino_graph import LEVELS, DinoTextGraph, DinoTextInputs
from .encoder_runtime import describe_error

if TYPE_CHECKING:
    import openvino as ov
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    from .config import EngineConfig
    from .openvino_cache import Conversion
    from .openvino_ops import OpsLibrary

logger = logging.getLogger(__name__)

# Bump when DinoTextGraph's inputs/outputs or arithmetic change (3: points on grid rows; 4: the deformable
# attention's value maps and sampling grids laid out for grid_sample, dino_fast.level_maps / sampling_grids;
# 5: the fusion layers' image-side projections moved onto the text, dino_fast.text_image_attention;
# 6: the fusion's products as 2-D matmuls, its masks as added -inf and, with the operations library, its
# softmaxes as one node, fusion_attention.fusion_softmax; the box head on the selected tokens only; 7: the
# DeformableAttention node masks the padding's values and softmaxes its weights itself; 8: the fusion
# block's gamma_v folded into its output matrix).
GRAPH_VERSION = 8
# Bounds of the export's dynamic sizes. A feature level is at most max_size / 8 tokens on a side (1333 px
# -> 167); the bound leaves room for larger DINO_MAX_SIZE settings. Captions hold at most 256 tokens.
MAX_LEVEL_SIDE = 1024
MAX_TOKENS = 256


class DinoTextRuntime(Protocol):
    """Runs Grounding DINO's text half on one image's features and one caption."""

    name: str  # "torch" or "openvino": what ``Engine.describe`` reports

    def run(self, inputs: DinoTextInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The last decoder layer's predictions.

        Arguments:
          inputs: ``DinoTextInputs`` (features 1 x 256 x h_l x w_l per level, caption of T tokens).
        Returns:
          (logits 1 x Q x T float32, -inf on padding tokens; boxes 1 x Q x 4 float32, normalised cxcywh),
          on the CPU.
        """
        ...


class TorchDinoText:
    """``DinoTextGraph`` on torch (embedding_bag deformable attention) under autocast."""

    name = "torch"

    def __init__(self, model: GroundingDINO, dtype: torch.dtype = torch.float32) -> None:
        self.graph = DinoTextGraph(model).eval()
        self.dtype = dtype

    @torch.inference_mode()
    def run(self, inputs: DinoTextInputs) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = inputs.input_ids.device.type
        with torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits, boxes = self.graph(*inputs.flat())
        return logits.float().cpu(), boxes.float().cpu()


@dataclass(frozen=True)
class DinoGraphKey:
    """Everything one converted half of Grounding DINO depends on; its digest names the cache file.

    The text half here and the image half (``dino_image_runtime``) differ only in ``half`` and in
    the bounds of their exported sizes."""

    half: str  # "text" or "image"
    identity: dict[str, object]  # checkpoint sha256, variant, architecture overrides (text encoder)
    precision: str  # OpenVINO inference precision hint: f32, bf16
    graph_version: int
    bounds: dict[str, int]  # the export's dynamic size bounds, by name
    form: str = ""  # which of a half's graph forms ("" where it has one; the text half: its DeformableCore)
    openvino: str = ""  # filled by __post_init__: the installed version

    def __post_init__(self) -> None:
        if not self.openvino:
            import openvino as ov

            object.__setattr__(self, "openvino", ov.get_version())

    @property
    def what(self) -> str:  # for openvino_cache's log lines
        return f"Grounding DINO's {self.half} half"

    def as_json(self) -> dict[str, object]:
        return {"identity": dict(self.identity), "precision": self.precision, "graph_version": self.graph_version,
                **self.bounds, **({"form": self.form} if self.form else {}), "openvino": self.openvino}

    @property
    def stem(self) -> str:
        from .openvino_cache import key_digest

        variant = self.identity.get("dino_variant", "model")
        return f"dino-{variant}-{self.half}-{self.precision}-{key_digest(self.as_json())}"


def text_key(identity: dict[str, object], precision: str, core: DeformableCore,
             fused_softmax: bool = False) -> DinoGraphKey:
    """The text half's key: this graph version, its bounds and its form (the deformable attention's, and
    whether the fusion softmaxes are the library's node)."""
    return DinoGraphKey("text", identity, precision, GRAPH_VERSION,
                        {"max_level_side": MAX_LEVEL_SIDE, "max_tokens": MAX_TOKENS},
                        form=core + ("+fusion_softmax" if fused_softmax else ""))


def example_inputs(model: GroundingDINO, sizes: tuple[tuple[int, int], ...] = ((24, 37), (12, 19), (6, 10), (3, 5)),
                   tokens: int = 7) -> DinoTextInputs:
    """Inputs of the right kinds for export: every size distinct and > 1, so none is specialised."""
    generator = torch.Generator().manual_seed(0)
    channels = int(model.transformer.d_model)
    srcs = tuple(torch.randn(1, channels, h, w, generator=generator) for h, w in sizes)
    ids = torch.randint(1000, 2000, (1, tokens), generator=generator)
    return DinoTextInputs(
        srcs=srcs, masks=tuple(torch.zeros(1, h, w, dtype=torch.bool) for h, w in sizes),
        poss=tuple(torch.randn(1, channels, h, w, generator=generator) for h, w in sizes),
        input_ids=ids, token_type_ids=torch.zeros_like(ids), text_token_mask=torch.ones_like(ids, dtype=torch.bool),
        text_self_attention_masks=torch.ones(1, tokens, tokens, dtype=torch.bool),
        position_ids=torch.arange(tokens)[None])


def bucket_sizes(sizes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The level sizes an image's features are padded to before OpenVINO runs them: the two coarsest
    levels as they are, every finer level 2x the next coarser one (at least its own size).

    OpenVINO compiles kernels for each new set of input sizes (seconds, ``bench/README.md``), and
    nearly every image aspect ratio is a new set. The backbone halves each level, rounding up, so
    this is the image padded to a multiple of the second-coarsest stride (32 px on SwinT-OGC): at
    the default 800 px short side, 18 buckets per orientation whatever the long side, for at most 3
    more tokens per row or column of the finest level (~1.4% more image tokens at 800x1066, none on
    an 800 px side). ``DinoTextInputs.padded`` says why the predictions do not change.
    """
    anchor = len(sizes) - 2
    anchor_h, anchor_w = sizes[anchor]
    return tuple((max(h, anchor_h << (anchor - level)), max(w, anchor_w << (anchor - level))) if level < anchor
                 else (h, w) for level, (h, w) in enumerate(sizes))


def dynamic_shapes() -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export's dynamic sizes for ``DinoTextGraph.forward``'s inputs (one tuple: *flat)."""
    from torch.export import Dim

    tokens = Dim("tokens", min=2, max=MAX_TOKENS)
    heights = [Dim(f"h{level}", min=1, max=MAX_LEVEL_SIDE) for level in range(LEVELS)]
    widths = [Dim(f"w{level}", min=1, max=MAX_LEVEL_SIDE) for level in range(LEVELS)]
    maps = tuple({2: h, 3: w} for h, w in zip(heights, widths, strict=True))
    masks = tuple({1: h, 2: w} for h, w in zip(heights, widths, strict=True))
    text = ({1: tokens}, {1: tokens}, {1: tokens}, {1: tokens, 2: tokens}, {1: tokens})
    return ((*maps, *masks, *maps, *text),)


class OpenVinoDinoText:
    """``DinoTextRuntime`` on OpenVINO's CPU plugin; thread-safe (one inference at a time)."""

    name = "openvino"

    def __init__(self, model: GroundingDINO, dtype: torch.dtype, cache_dir: Path, identity: dict[str, object],
                 fallback: DinoTextRuntime) -> None:
        import openvino as ov

        from .openvino_cache import PRECISION_HINTS, compile_for_cpu, load_or_convert
        from .openvino_ops import load_for

        if dtype not in PRECISION_HINTS:
            raise ValueError(f"no OpenVINO precision for {dtype}")
        self.precision = PRECISION_HINTS[dtype]
        self.num_queries = int(model.transformer.num_queries)
        # groundingdino's query selection takes the top num_queries image tokens: an image with fewer
        # tokens (a sliver a few pixels wide) fails torch.topk, but OpenVINO's TopK would return padding.
        # Such inputs go to torch, which raises as it always did.
        self.fallback = fallback
        self.ops: OpsLibrary | None = load_for(cache_dir,
                                               "Grounding DINO's deformable attention runs as OpenVINO GridSample")
        example = example_inputs(model)
        self.conversion: Conversion
        compiled_model, self.conversion = load_or_convert(
            DinoTextGraph(model, core=self.core, fused_softmax=self.fused_softmax).eval(), example.flat(),
            text_key(identity, self.precision, self.core, self.fused_softmax), cache_dir, dynamic_shapes(),
            ops=self.ops)
        started = time.perf_counter()
        if self.ops and self.precision == "bf16":
            compiled_model = self.ops.narrow_io(compiled_model)
        compiled: ov.CompiledModel = compile_for_cpu(ov.Core(), compiled_model, self.precision)
        self.compile_seconds = time.perf_counter() - started
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.bucketed = True  # pad the image features to ``bucket_sizes`` (bench/ turns it off to compare)

    @property
    def core(self) -> DeformableCore:
        """The deformable attention's form in the graph: the library's node where it loaded."""
        return "fused" if self.ops else "grid_sample"

    @property
    def fused_softmax(self) -> bool:
        """Whether the fusion layers' softmaxes are the library's node: where it loaded and its kernels run
        their AVX-512 paths (``openvino_ops.vector_kernels``)."""
        from .models import cpu_flags
        from .openvino_ops import vector_kernels

        return self.ops is not None and vector_kernels(cpu_flags())

    def fits(self, inputs: DinoTextInputs) -> bool:
        """Whether the graph serves these sizes: at least as many image tokens as queries, and every
        dynamic size within the export's bounds (a GROUNDING_DINO_MAX_SIZE past ~8000 px, say)."""
        sides = [side for src in inputs.srcs for side in src.shape[2:]]
        return (sum(src.shape[2] * src.shape[3] for src in inputs.srcs) >= self.num_queries
                and max(sides) <= MAX_LEVEL_SIDE and inputs.input_ids.shape[1] <= MAX_TOKENS)

    def run(self, inputs: DinoTextInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fits(inputs):
            return self.fallback.run(inputs)
        padded = bucket_sizes(inputs.sizes)
        if self.bucketed and max(side for size in padded for side in size) <= MAX_LEVEL_SIDE:
            inputs = inputs.padded(padded)
        arrays = [_numpy(t) for t in inputs.flat()]
        with self._lock:
            self._request.infer(arrays)
            # Copied: the request reuses its output buffers on the next call.
            logits = np.array(self._request.get_output_tensor(0).data)
            boxes = np.array(self._request.get_output_tensor(1).data)
        return torch.from_numpy(logits), torch.from_numpy(boxes)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """The graph's inputs are f32 / int64 / bool, as exported (bf16 features are widened)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def build_dino_text_runtime(config: EngineConfig, model: GroundingDINO, device: torch.device,
                            dtype: torch.dtype) -> DinoTextRuntime:
    """The runtime ``config.runtime`` asks for on ``device``; torch when OpenVINO can't serve.

    ``model`` must already be on ``device`` with ``dino_fast.use_fast_inference`` applied
    (``detector.prepare``). auto: OpenVINO on CPU, torch on CUDA. openvino: OpenVINO where the model
    is on the CPU; on CUDA the text half stays on torch (logged: its weights live on the GPU, and
    the backbone's features come from there). A failed import, export, conversion or compile logs
    one line with the cause and returns the torch runtime.
    """
    torch_runtime: DinoTextRuntime = TorchDinoText(model, dtype)
    return with_openvino(config, device, "text", torch_runtime, lambda cache_dir, identity: OpenVinoDinoText(
        model, dtype, cache_dir, {**identity, "text_encoder": Path(config.text_encoder).name}, torch_runtime))


R = TypeVar("R")


def with_openvino(config: EngineConfig, device: torch.device, half: str, torch_runtime: R,
                  openvino: Callable[[Path, dict[str, object]], R], log: logging.Logger = logger) -> R:
    """``openvino(cache folder, checkpoint identity)`` where ``config.runtime`` asks for OpenVINO and it
    serves, else ``torch_runtime``: the one decision for both of Grounding DINO's halves.

    auto: OpenVINO on CPU, torch elsewhere; openvino on CUDA stays on torch (logged). Any failure to
    import, export, convert or compile logs one line naming ``half`` and the cause (on ``log``: the
    calling half's module logger).
    """
    if config.runtime == "torch" or (config.runtime == "auto" and device.type != "cpu"):
        return torch_runtime
    try:
        from .openvino_cache import cache_folder
        from .weights import file_sha256

        if device.type != "cpu":
            raise ValueError(f"the OpenVINO graph runs on the CPU; the model is on {device}")
        identity: dict[str, object] = {
            "dino_variant": config.dino_variant, "dino_arch": config.dino_arch,
            "checkpoint_sha256": file_sha256(config.dino_checkpoint_path),
            "checkpoint": config.dino_checkpoint_path.name}
        return openvino(cache_folder(config), identity)
    except Exception as exc:  # noqa: BLE001 - any failure to import, export, convert or compile
        log.warning("RUNTIME=%s: Grounding DINO's %s half runs on torch, because OpenVINO could not serve "
                       "it: %s", config.runtime, half, describe_error(exc))
        return torch_runtime
