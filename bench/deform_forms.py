"""Grounding DINO text half's export forms on OpenVINO bf16, interleaved: graph versions 3 and 4 (grid_sample),
the fused deformable operation, and version 5 (that and the text-side fusion attention: the default).

    python -m bench.deform_forms [--cache DIR] [--rounds 9] [--skip core|text]

core: one deformable attention module (projections included; groundingdino's init plus noise), both
forms converted with dynamic query, key and level sizes, run at 800x1066's bucket sizes (18,071 tokens,
every token a query at its own pixel, as in the encoder). text: the whole text half
(``DinoTextGraph``) exported once per form from bench/cache.py's real-size random weights
(``FORMS``: grid_sample with version 3's deformable attention patched in, and as it is; the fused
``gsam::deformable_attention`` node of ``backend/openvino_ops.py``, with groundingdino's fusion attention
and with ``fusion_attention.text_image_attention``), on real image features
at two aspect ratios (padded to their size buckets, as the runtime runs them). Each conversion is
compiled bf16 (timed) and f32 (to show the forms change only rounding: bench.dino_text's accuracy
columns against torch fp32). Per round each form in turn, alternating the order; medians and minima;
then one call per form with per-op counters, by op type.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from backend.dino_fast import DeformableCore, FastDeformableAttention, LevelShapes, sampling_locations


def version3_core(value: torch.Tensor, sizes: Sequence[tuple[int, int]], sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> torch.Tensor:
    """Graph version 3's grid_sample_attention (groundingdino's input layouts): value (bs, keys, heads, C),
    locations (bs, Q, heads, levels, points, 2), weights (bs, Q, heads, levels, points) -> (bs, Q, heads * C)."""
    bs, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in sizes], dim=1)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(bs * heads, 1, levels, points, queries)
    out = None
    for level, (h, w) in enumerate(sizes):
        level_value = values[level].flatten(2).transpose(1, 2).reshape(bs * heads, channels, h, w)
        sampled = F.grid_sample(level_value, grids[:, :, level].flatten(0, 1), mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        summed = (sampled * weights[:, :, level]).sum(2)
        out = summed if out is None else out + summed
    assert out is not None
    return out.view(bs, heads * channels, queries).transpose(1, 2).contiguous()


def version3_forward(self: Any, query: torch.Tensor, key: Any = None, value: Any = None, query_pos: Any = None,
                     key_padding_mask: Any = None, reference_points: Any = None, spatial_shapes: Any = None,
                     level_start_index: Any = None, **kwargs: Any) -> torch.Tensor:
    """FastDeformableAttention.forward as graph version 3 exported it (grid_sample path only)."""
    if value is None:
        value = query
    if query_pos is not None:
        query = query + query_pos
    if not self.batch_first:
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
    bs, num_query, _ = query.shape
    _, num_value, _ = value.shape
    value = self.value_proj(value)
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], float(0))
    value = value.view(bs, num_value, self.num_heads, -1)
    offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
    weights = self.attention_weights(query).view(
        bs, num_query, self.num_heads, self.num_levels * self.num_points).softmax(-1)
    weights = weights.view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
    levels = spatial_shapes
    assert isinstance(levels, LevelShapes) and levels.core == "grid_sample"
    locations = sampling_locations(offsets, reference_points, levels.tensor)  # unchanged since version 3
    output = self.output_proj(version3_core(value, levels.sizes, locations, weights))
    return output if self.batch_first else output.permute(1, 0, 2)


# name -> (the graph's deformable core, text-side fusion attention or not, a context that patches the
# module while it is exported)
FORMS: dict[str, tuple[DeformableCore, bool, Callable[[], Any]]] = {
    "version 3": ("grid_sample", False, lambda: mock.patch.object(FastDeformableAttention, "forward",
                                                                  version3_forward)),
    "version 4": ("grid_sample", False, nullcontext),
    "fused": ("fused", False, nullcontext),
    "version 5": ("fused", True, nullcontext),
}
BASE = "version 4"  # the ratios' denominator: the form the runtime ran before the fused operation


def _ops() -> Any:
    from backend.openvino_ops import load

    return load(Path(tempfile.gettempdir()) / "grounded-sam-bench-ops")


def _interleave(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    for call in calls.values():  # warm-up: each form's kernels for these sizes
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 else list(calls)[::-1]):
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return times


def _by_type(compiled_model: Any, arrays: list[np.ndarray]) -> dict[str, float]:
    import openvino as ov

    core = ov.Core()
    request = core.compile_model(compiled_model, "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}).create_infer_request()
    request.infer(arrays)
    request.infer(arrays)
    by_type: dict[str, float] = {}
    for info in request.get_profiling_info():
        by_type[info.node_type] = by_type.get(info.node_type, 0.0) + info.real_time.total_seconds()
    return by_type


def _report(title: str, times: dict[str, list[float]], profiles: dict[str, dict[str, float]]) -> None:
    base = statistics.median(times[BASE])
    for name, t in times.items():
        # Each round's forms ran back to back: its ratio sees the same background load.
        paired = statistics.median(a / b for a, b in zip(t, times[BASE], strict=True))
        print(f"{title:10} {name:10} median {1000 * statistics.median(t):7.0f} ms  min {1000 * min(t):7.0f} ms  "
              f"{statistics.median(t) / base:5.2f}x of {BASE} (median of per-round ratios {paired:.2f}x)",
              flush=True)
    for name, by_type in profiles.items():
        top = sorted(by_type.items(), key=lambda kv: -kv[1])[:8]
        print(f"{title:10} {name:10} per-op counters, op time {1000 * sum(by_type.values()):.0f} ms: "
              + ", ".join(f"{op} {1000 * s:.0f}" for op, s in top), flush=True)


def bench_core(rounds: int) -> None:
    """The deformable attention module alone, both forms, at 800x1066's bucket sizes."""
    import openvino as ov
    from groundingdino.models.GroundingDINO.ms_deform_attn import MultiScaleDeformableAttention
    from torch.export import Dim

    from backend.dino_graph import _reference_points
    from backend.openvino_cache import convert

    class Module(torch.nn.Module):
        def __init__(self, attention: torch.nn.Module, core: DeformableCore) -> None:
            super().__init__()
            self.attention = attention
            self.core = core

        def forward(self, query: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                    level0: torch.Tensor, level1: torch.Tensor, level2: torch.Tensor,
                    level3: torch.Tensor) -> torch.Tensor:
            sizes = tuple((level.shape[0], level.shape[1]) for level in (level0, level1, level2, level3))
            one = torch.ones((), dtype=torch.long)
            tensor = torch.stack([torch.stack([one * h, one * w]) for h, w in sizes])
            return self.attention(query, value=value, key_padding_mask=mask, reference_points=reference,
                                  spatial_shapes=LevelShapes(sizes, tensor, self.core))

    def inputs(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        keys = sum(h * w for h, w in sizes)
        return [torch.randn(1, keys, 256, generator=generator), torch.randn(1, keys, 256, generator=generator),
                torch.zeros(1, keys, dtype=torch.bool), _reference_points(sizes, torch.ones(1, len(sizes), 2)),
                *(torch.zeros(h, w) for h, w in sizes)]

    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(256, 8, 4, 4, batch_first=True)
    with torch.no_grad():  # init_weights leaves the offsets' and weights' projections zero
        attention.sampling_offsets.weight.normal_(0, 0.02)
        attention.attention_weights.weight.normal_(0, 0.05)
    attention.__class__ = FastDeformableAttention
    traced = [(24, 37), (12, 19), (6, 10), (3, 5)]
    sides = [(Dim(f"h{i}", min=1, max=1024), Dim(f"w{i}", min=1, max=1024)) for i in range(4)]
    dynamic = ({1: Dim.AUTO}, {1: Dim.AUTO}, {1: Dim.AUTO}, {1: Dim.AUTO}, *({0: h, 1: w} for h, w in sides))
    sizes = [(100, 136), (50, 68), (25, 34), (13, 17)]  # 800x1066's bucket
    arrays = [t.numpy() for t in inputs(sizes)]
    models, requests = {}, {}
    for name, (core, text_side, form) in FORMS.items():
        if text_side:  # the same deformable attention module as the form without it
            continue
        with form():
            models[name] = convert(Module(attention, core).eval(), tuple(inputs(traced)), dynamic,
                                   ops=_ops() if core == "fused" else None)
        requests[name] = ov.Core().compile_model(models[name], "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    with torch.no_grad():
        reference = Module(attention, "gather")(*(torch.from_numpy(a) for a in arrays)).numpy()
    for name, request in requests.items():
        request.infer(arrays)
        print(f"core: {name} bf16 max |difference| from torch fp32: "
              f"{np.abs(request.get_output_tensor(0).data - reference).max():.3f}", flush=True)
    times = _interleave({name: (lambda r=request: r.infer(arrays)) for name, request in requests.items()}, rounds)
    _report("core", times, {name: _by_type(model, arrays) for name, model in models.items()})


def bench_text(cache: Path, rounds: int) -> None:
    """The whole text half, both forms, on real image features at two aspect ratios."""
    import openvino as ov
    from PIL import Image

    from backend.config import EngineConfig
    from backend.detector import Caption, GroundingDinoDetector, prepare
    from backend.dino_graph import DinoTextGraph
    from backend.dino_runtime import TorchDinoText, _numpy, bucket_sizes, dynamic_shapes, example_inputs
    from backend.models import build_grounding_dino
    from backend.openvino_cache import compile_for_cpu, convert
    from bench.dino_text import PROMPT, SHAPES, compare
    from bench.measure import photos

    cpu = torch.device("cpu")
    config = EngineConfig.from_file(cache / "engine-vit_b.json", openvino_cache_dir=cache / "openvino").replace(
        runtime="torch")
    model = prepare(build_grounding_dino(config), cpu)
    torch_fp32 = TorchDinoText(model)
    detector = GroundingDinoDetector(model, cpu, torch.float32, config.dino_image_size, config.dino_max_size,
                                     torch_fp32)
    caption = Caption.build(PROMPT, detector.tokenizer)
    inputs = {}
    for label, size in SHAPES.items():
        photo = np.asarray(Image.fromarray(photos(1)[0]).resize(size[::-1]))
        inputs[label] = detector.text_inputs(detector.image_features(photo), caption)
    compiled: dict[tuple[str, str], Any] = {}
    models = {}
    for name, (core, text_side, form) in FORMS.items():
        started = time.perf_counter()
        with form():
            models[name] = convert(DinoTextGraph(model, core=core, text_side_fusion=text_side).eval(),
                                   example_inputs(model).flat(), dynamic_shapes(),
                                   ops=_ops() if core == "fused" else None)
        for precision in ("bf16", "f32"):
            compiled[(name, precision)] = compile_for_cpu(ov.Core(), models[name], precision)
        print(f"text: {name} converted and compiled in {time.perf_counter() - started:.0f} s", flush=True)
    arrays = {label: [_numpy(t) for t in x.padded(bucket_sizes(x.sizes)).flat()] for label, x in inputs.items()}
    tokens = [i for idx in caption.phrase_tokens for i in idx]

    def raw(logits: Any, boxes: Any) -> SimpleNamespace:
        return SimpleNamespace(token_probs=torch.as_tensor(np.asarray(logits))[0].sigmoid(),
                               boxes_cxcywh=torch.as_tensor(np.asarray(boxes))[0])

    for label, x in inputs.items():
        reference = raw(*torch_fp32.run(x))
        for (name, precision), model_compiled in compiled.items():
            out = model_compiled(arrays[label])
            accuracy = compare(raw(out[0], out[1]), reference, tokens)
            print(f"text {label}: {name} {precision} against torch fp32: " + ", ".join(
                f"{key} {value:.2g}" for key, value in accuracy.items()), flush=True)
    for label in inputs:
        requests = {name: compiled[(name, "bf16")].create_infer_request() for name in FORMS}
        times = _interleave({name: (lambda r=request, a=arrays[label]: r.infer(a))
                             for name, request in requests.items()}, rounds)
        profiles = ({name: _by_type(m, arrays[label]) for name, m in models.items()} if label == "800x1066" else {})
        _report(f"text {label}", times, profiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "grounded-sam-bench-cache")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip", choices=["core", "text"], action="append", default=[])
    args = parser.parse_args()
    from bench.runtime import lscpu

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    cpu = lscpu()
    print(f"# {cpu['model']} | flags {' '.join(cpu['flags'])} | {torch.get_num_threads()} threads | "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    if "core" not in args.skip:
        bench_core(args.rounds)
    print(f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    if "text" not in args.skip:
        bench_text(args.cache, args.rounds)
    print(f"load avg {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
